"""kohya-format LoRA files with the real alpha and the metadata UIs and LoRA managers read.

Keys: ``lora_unet_<module path with '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}``.
The delta a UI applies is ``up @ down * alpha / rank``, so the stored alpha is the trained one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save

from lorafactory.workspace import write_bytes_atomic


def sgm_module_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet attention module path in SDXL's original (SGM/LDM) naming.

    ``down_blocks.i.attentions.j`` -> ``input_blocks.{i*(L+1)+j+1}.1``, ``mid_block.attentions.0`` ->
    ``middle_block.1``, ``up_blocks.i.attentions.j`` -> ``output_blocks.{i*(L+1)+j}.1``, L = layers per block.
    """
    parts = name.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        index = int(parts[1]) * (layers_per_block + 1) + int(parts[3]) + 1
        return ".".join(["input_blocks", str(index), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        index = int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["output_blocks", str(index), "1", *parts[4:]])
    raise ValueError(f"no SDXL original name for UNet module {name!r}; only attention blocks are mapped")


def _same(weight: torch.Tensor) -> torch.Tensor:
    return weight


def lora_tensors(
    module: torch.nn.Module,
    prefix: str,
    alpha: float,
    rename=lambda name: name,
    adapter: str = "default",
    source: Callable[[torch.Tensor], torch.Tensor] = _same,
) -> dict[str, torch.Tensor]:
    """A module's peft LoRA layers as kohya tensors (float32, contiguous, on CPU); ``source`` gives what to
    export for a layer's weight (a trainer's float32 master of a half-precision working copy)."""
    from peft.tuners.lora import LoraLayer

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        key = prefix + rename(name).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = _plain(source(layer.lora_A[adapter].weight))
        tensors[f"{key}.lora_up.weight"] = _plain(source(layer.lora_B[adapter].weight))
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def unet_lora_tensors(
    unet: torch.nn.Module, alpha: float, family: str = "sd1", source: Callable[[torch.Tensor], torch.Tensor] = _same
) -> dict[str, torch.Tensor]:
    """SD1 keys use diffusers module names (what kohya's SD1 UNet copies); SDXL keys use the original
    model's names, which A1111 requires for SDXL and every other loader accepts."""
    if family == "sdxl":
        layers = int(getattr(unet.config, "layers_per_block", 2))
        return lora_tensors(unet, "lora_unet_", alpha, lambda name: sgm_module_name(name, layers), source=source)
    return lora_tensors(unet, "lora_unet_", alpha, source=source)


def text_encoder_lora_tensors(
    encoders: list[torch.nn.Module], alpha: float, source: Callable[[torch.Tensor], torch.Tensor] = _same
) -> dict[str, torch.Tensor]:
    """``lora_te_`` (SD1) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the CLIP path under ``text_model``."""
    prefixes = ["lora_te_"] if len(encoders) == 1 else ["lora_te1_", "lora_te2_"]
    tensors: dict[str, torch.Tensor] = {}
    for prefix, encoder in zip(prefixes, encoders):
        tensors.update(
            lora_tensors(
                encoder,
                prefix,
                alpha,
                lambda name: name if name.startswith("text_model.") else "text_model." + name,
                source=source,
            )
        )
    return tensors


def bundle_tensors(trigger: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111's LoRA-embedding bundle keys: one ``string_to_param`` key for SD1, ``clip_l`` + ``clip_g`` for SDXL."""
    if set(vectors) == {"clip_l"}:
        return {f"bundle_emb.{trigger}.string_to_param.*": _plain(vectors["clip_l"])}
    return {f"bundle_emb.{trigger}.{key}": _plain(tensor) for key, tensor in vectors.items()}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu().contiguous()


PLAIN_LORA_SUFFIX = "_lora"  # the plain LoRA is released as <trigger>_lora: its own name and alias in A1111


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors alone (metadata excluded), so later metadata edits keep it valid."""
    return hashlib.sha256(save(tensors)).hexdigest()


ARCHITECTURES = {
    "sd1": ("sd_v1", "stable-diffusion-v1/lora"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
}


def lora_metadata(
    *,
    family: str = "sd1",
    output_name: str,
    trigger: str,
    rank: int,
    alpha: float,
    steps: int,
    epoch: int = 0,
    resolution: int,
    clip_skip: int,
    max_token_length: int = 75,
    num_train_images: int,
    tag_frequency: dict[str, dict[str, int]],
    base_model_name: str,
    seed: int,
    tensors: dict[str, torch.Tensor],
) -> dict[str, str]:
    """kohya ``ss_*`` keys plus ``modelspec.*`` and ``trained_words``; every value is a string."""
    metadata: dict[str, Any] = {
        "ss_base_model_version": ARCHITECTURES[family][0],
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": max_token_length,
        "ss_num_train_images": num_train_images,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_seed": seed,
        "ss_training_comment": "pivotal tuning by lorafactory; trigger word " + trigger,
        "sshs_model_hash": tensors_hash(tensors),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[family][1],
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
