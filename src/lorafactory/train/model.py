"""Loading the base model's components from a diffusers folder, a single file or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafactory.errors import ConfigError


@dataclass
class BaseComponents:
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA GPU is visible; set train.device = 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights; trainable parameters always stay in float32."""
    if mixed_precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_pipeline(base_model: str, torch_dtype: torch.dtype = torch.float32) -> Any:
    """A StableDiffusionPipeline from a folder, a ``.safetensors``/``.ckpt`` file or a hub id."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # stages show their own progress

    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype != torch.float32:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if path.is_file():
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        if path.is_dir():
            return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
        if path.suffix in (".safetensors", ".ckpt") or base_model.startswith((".", "/", "~")):
            raise ConfigError(f"base model {base_model} does not exist; set train.base_model to a model folder, file or hub id")
        return StableDiffusionPipeline.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load base model {base_model!r}: {str(exc).splitlines()[0]}; check train.base_model") from exc


def load_base(base_model: str) -> BaseComponents:
    pipe = load_pipeline(base_model)
    return BaseComponents(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler_config=dict(pipe.scheduler.config),
    )
