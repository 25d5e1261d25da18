"""Textual-inversion files: AUTOMATIC1111 ``.pt`` and ``.safetensors``, for SD1 and SDXL.

A1111 takes the trigger word from the file name, so both files are named ``<trigger>.*``.
The ``.pt`` uses torch's legacy (non-zip) serialization: the zip format of torch 2.x adds records
(``.format_version``, ``.storage_alignment``) that A1111's restricted loader refuses.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from lorafactory.export.kohya import write_safetensors
from lorafactory.workspace import write_bytes_atomic


def _plain(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().float().cpu().contiguous() for key, tensor in vectors.items()}


def write_a1111_pt(
    path: Path, trigger: str, vectors: dict[str, torch.Tensor], step: int, base_model_name: str
) -> None:
    """SD1: A1111's own layout (``string_to_param``); SDXL: ``{"clip_l", "clip_g"}``, which A1111 also reads."""
    tensors = _plain(vectors)
    if set(tensors) == {"clip_l"}:
        data = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": tensors["clip_l"]},
            "name": trigger,
            "step": step,
            "sd_checkpoint": None,
            "sd_checkpoint_name": base_model_name,
        }
    else:
        data = tensors
    buffer = io.BytesIO()
    torch.save(data, buffer, _use_new_zipfile_serialization=False)
    write_bytes_atomic(path, buffer.getvalue())


def write_embedding_safetensors(path: Path, vectors: dict[str, torch.Tensor]) -> None:
    """SD1: ``{"emb_params": [N, 768]}``; SDXL: ``{"clip_l": [N, 768], "clip_g": [N, 1280]}``.

    Both are read by A1111, ComfyUI and diffusers (SDXL: one ``load_textual_inversion`` per encoder).
    """
    tensors = _plain(vectors)
    write_safetensors(path, {"emb_params": tensors["clip_l"]} if set(tensors) == {"clip_l"} else tensors)
