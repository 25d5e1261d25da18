"""Optimizers and learning-rate schedules, with the LoRA and the embedding in separate groups."""

from __future__ import annotations

import torch

from lorafactory.config import TrainSettings
from lorafactory.errors import ConfigError


def build_optimizer(
    t: TrainSettings,
    lora_params: list[torch.nn.Parameter],
    embedding_params: list[torch.nn.Parameter],
    text_lora_params: list[torch.nn.Parameter],
    device: torch.device,
):
    """One parameter group each for the UNet LoRA, the trigger embedding and the text-encoder LoRA."""
    groups = [
        {"params": lora_params, "lr": t.unet_lr, "weight_decay": t.weight_decay, "name": "lora"},
        {
            "params": embedding_params,
            "lr": t.embedding_lr,
            "weight_decay": t.embedding_weight_decay,
            "name": "embedding",
        },
    ]
    if text_lora_params:
        groups.append(
            {"params": text_lora_params, "lr": t.text_encoder_lr, "weight_decay": t.weight_decay, "name": "text_lora"}
        )
    if t.optimizer == "adamw":
        fused = t.fused_optimizer and device.type in ("cuda", "cpu")  # one kernel for every tensor, not one each
        return torch.optim.AdamW(groups, fused=fused or None)
    if t.optimizer == "adamw8bit":
        return _adamw8bit(groups, device)
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise ConfigError(
            "train.optimizer = 'prodigy' needs prodigyopt; pip install prodigyopt, or use 'adamw'"
        ) from exc
    return Prodigy(groups)


def _adamw8bit(groups: list[dict], device: torch.device):
    """bitsandbytes' 8-bit AdamW; on CPU it needs bitsandbytes 0.48 or later (its CPU backend)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError(
            "train.optimizer = 'adamw8bit' needs bitsandbytes; pip install 'lorafactory[adamw8bit]', or use 'adamw'"
        ) from exc
    version = tuple(int(part) for part in bnb.__version__.split(".")[:2] if part.isdigit())
    if device.type == "cpu" and version < (0, 48):
        raise ConfigError(
            (
                "train.optimizer = 'adamw8bit' on CPU needs bitsandbytes >= "
                f"0.48 (found {bnb.__version__}); upgrade it or use 'adamw'"
            )
        )
    return bnb.optim.AdamW8bit(groups)


def build_scheduler(t: TrainSettings, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
