"""kohya-format LoRA files with the real alpha and the metadata UIs and LoRA managers read.

Keys: ``lora_unet_<module path with '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}``.
The delta a UI applies is ``up @ down * alpha / rank``, so the stored alpha is the trained one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from lorafactory.workspace import write_bytes_atomic


def unet_lora_tensors(unet: torch.nn.Module, alpha: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The UNet's peft LoRA layers as kohya tensors (float32, contiguous, on CPU)."""
    from peft.tuners.lora import LoraLayer

    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
        tensors[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def bundle_tensors(trigger: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """A1111's LoRA-embedding bundle keys for an SD1 embedding (one key per embedding)."""
    return {f"bundle_emb.{trigger}.string_to_param.*": vectors.detach().float().cpu().contiguous()}


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors alone (metadata excluded), so later metadata edits keep it valid."""
    return hashlib.sha256(save(tensors)).hexdigest()


def lora_metadata(
    *,
    output_name: str,
    trigger: str,
    rank: int,
    alpha: float,
    steps: int,
    resolution: int,
    clip_skip: int,
    num_train_images: int,
    tag_frequency: dict[str, dict[str, int]],
    base_model_name: str,
    seed: int,
    tensors: dict[str, torch.Tensor],
) -> dict[str, str]:
    """kohya ``ss_*`` keys plus ``modelspec.*`` and ``trained_words``; every value is a string."""
    metadata: dict[str, Any] = {
        "ss_base_model_version": "sd_v1",
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_steps": steps,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_clip_skip": clip_skip,
        "ss_num_train_images": num_train_images,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_seed": seed,
        "ss_training_comment": "pivotal tuning by lorafactory; trigger word " + trigger,
        "sshs_model_hash": tensors_hash(tensors),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "trained_words": json.dumps([trigger]),
    }
    return {key: str(value) for key, value in metadata.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write through a temporary file so a crash never leaves a truncated model behind."""
    write_bytes_atomic(path, save(tensors, metadata=metadata))


