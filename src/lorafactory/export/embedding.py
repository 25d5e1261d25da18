"""Textual-inversion files: AUTOMATIC1111 ``.pt`` and a single-tensor ``.safetensors``.

A1111 takes the trigger word from the file name, so both files are named ``<trigger>.*``.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from lorafactory.export.kohya import write_safetensors
from lorafactory.workspace import write_bytes_atomic


def write_a1111_pt(path: Path, trigger: str, vectors: torch.Tensor, step: int, base_model_name: str) -> None:
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.detach().float().cpu().contiguous()},
        "name": trigger,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": base_model_name,
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_embedding_safetensors(path: Path, vectors: torch.Tensor) -> None:
    """``{"emb_params": [N, dim]}``: read by A1111, ComfyUI and diffusers."""
    write_safetensors(path, {"emb_params": vectors.detach().float().cpu().contiguous()})
