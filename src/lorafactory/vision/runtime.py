"""Where imgutils runs its ONNX models: on CUDA when onnxruntime-gpu is installed (unless ``ONNX_MODE``
says otherwise), else on the CPU. With the CPU runtime on a GPU machine, scoring a checkpoint's images
keeps the GPU waiting, so the evaluate stage records the provider and says how to move them."""

from __future__ import annotations

import os

import torch

CPU_PROVIDER = "CPUExecutionProvider"
GPU_RUNTIME_FIX = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def onnx_provider() -> str:
    """The onnxruntime execution provider imgutils opens its models with."""
    from imgutils.utils import get_onnx_provider

    return get_onnx_provider(os.environ.get("ONNX_MODE") or None)


def vision_on_cpu_warning(device: torch.device) -> str | None:
    """A one-line warning when ``device`` is a GPU but imgutils' models would run on the CPU without the user
    having asked for it (``ONNX_MODE=cpu`` is a choice, not a mistake); None otherwise."""
    if device.type != "cuda" or os.environ.get("ONNX_MODE") or onnx_provider() != CPU_PROVIDER:
        return None
    return (
        "the vision models that score evaluation images run on the CPU (onnxruntime has no CUDA provider) "
        f"while the GPU waits; to run them on the GPU: {GPU_RUNTIME_FIX}"
    )
