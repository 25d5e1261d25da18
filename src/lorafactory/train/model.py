"""Loading the base model from a diffusers folder, a single checkpoint file or a hub id (SD1.x or SDXL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lorafactory.errors import ConfigError, first_line
from lorafactory.hubfetch import hub_failure, say_if_downloading

Family = Literal["sd1", "sdxl"]
# Graphs one compiled transformer block may have: a run's block widths and shapes (strides, sides of 1, grad
# mode for training and rendering in one process). torch's default, 8, is met within a few steps on a few
# buckets without symbolic sizes; past it dynamo gives up on the new shapes and they run eager, with no error.
COMPILED_GRAPHS_PER_BLOCK = 64


@dataclass
class BaseComponents:
    family: Family
    tokenizers: list[Any]  # one per text encoder: CLIP-L (SD1), CLIP-L + CLIP-G (SDXL)
    text_encoders: list[Any]
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA GPU is visible; set train.device = 'cpu' or 'auto'")
    return torch.device(name)


def host_tensor(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (token ids, loss weights, size conditioning, latents) as a tensor on ``device``. On CUDA the
    copy goes through pinned memory without blocking: a plain copy from pageable memory waits for the GPU to
    finish all queued work, so a step's inputs would stall the host mid-step."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights; trainable parameters always stay in float32."""
    if mixed_precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def family_of(pipe: Any) -> Family:
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd1"


def _single_file_is_sdxl(path: Path) -> bool:
    """SDXL checkpoints hold a second text encoder under ``conditioner.embedders.1``."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32, config: str = "") -> Any:
    """An SD1.x or SDXL pipeline from a folder, a ``.safetensors``/``.ckpt`` file or a hub id.

    A single file's component configs come from ``config`` (a diffusers folder or hub id) when given;
    otherwise diffusers infers them from the file's keys and fetches them from the hub once.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors import SafetensorError

    diffusers_logging.disable_progress_bar()  # stages show their own progress
    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {}
    if dtype != torch.float32:
        kwargs["dtype"] = dtype  # diffusers' name since 0.40; the older torch_dtype warns of its removal
    try:
        if path.is_file():
            cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
            pipe = cls.from_single_file(str(path), **kwargs, **({"config": config} if config else {}))
        elif path.is_dir() or not (path.suffix in (".safetensors", ".ckpt") or base_model.startswith((".", "/", "~"))):
            say_if_downloading(base_model, "model_index.json", "base model")
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else base_model, **kwargs)
        else:
            raise ConfigError(
                f"base model {base_model} does not exist; set train.base_model to a model folder, file or hub id"
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # also a garbage single file
        hub = hub_failure(exc, base_model)
        if hub is not None:
            raise hub from exc
        reason = first_line(exc)
        raise ConfigError(f"cannot load base model {base_model!r}: {reason}; check train.base_model") from exc
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ConfigError(
            f"base model {base_model!r} is a {type(pipe).__name__}; lorafactory trains SD1.x and SDXL models"
        )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def compile_blocks(unet: Any, backend: str, dynamic: bool | None) -> None:
    """torch.compile each of the UNet's transformer blocks in place (regional: the blocks of one width share a
    graph, so one compile serves them all). ``dynamic=True``: sizes symbolic from the first call; ``None``:
    torch's default, sizes compiled as constants until one changes. The graphs are traced at the first call,
    with the LoRA layers in place then; parameter names, state dicts and exports stay as they are.

    Duck sizing is turned off for the process (the switch torch's own guard messages name): with it, sizes
    that happen to be equal in the first call (a square bucket's sides) share one symbol, and the first bucket
    where they differ compiles that width again."""
    from torch._dynamo import config as dynamo
    from torch.fx.experimental import _config as shapes

    dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_GRAPHS_PER_BLOCK)
    shapes.use_duck_shape = False
    unet.compile_repeated_blocks(backend=backend, dynamic=dynamic)


def load_base(base_model: str, config: str = "") -> BaseComponents:
    pipe = load_pipeline(base_model, config=config)
    family = family_of(pipe)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return BaseComponents(family, tokenizers, encoders, pipe.unet, pipe.vae, dict(pipe.scheduler.config))
