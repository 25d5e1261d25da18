"""The train settings checked against the base model's architecture before any stage runs, so a
LoRA target that names no layer is refused at once, not after the crawl. Only the model's config
files are read (the layers are built on the meta device, without memory or weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafactory.config import TrainSettings
from lorafactory.errors import ConfigError


def _config(base_model: str, component: str) -> dict | None:
    """A component's config.json from a diffusers folder or the local hub cache; None when only
    loading the model would tell (a single file, or a hub id not downloaded yet)."""
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        path = folder / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    if folder.suffix in (".safetensors", ".ckpt"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(base_model, f"{component}/config.json", local_files_only=True)).read_text()
        )
    except Exception:  # noqa: BLE001 - not in the cache, or not a hub id: the train stage will say
        return None


def _unmatched(targets: list[str], module_names: list[str]) -> list[str]:
    """Targets that no module name ends with (peft's rule for a list of target names)."""
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in module_names)]


def _names(build) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in build().named_modules()]


def check_targets(t: TrainSettings) -> None:
    """Refuse LoRA targets that name no layer of the base model's UNet (and text encoder, when it trains)."""
    unet = _config(t.base_model, "unet")
    if unet is not None:
        from diffusers import UNet2DConditionModel

        missing = _unmatched(list(t.lora_targets), _names(lambda: UNet2DConditionModel.from_config(unet)))
        if missing:
            raise ConfigError(
                f"train.lora_targets {missing} matched no UNet layer; use names such as to_q, to_k, to_v"
            )
    text = _config(t.base_model, "text_encoder") if t.text_encoder_lora_rank else None
    if text is not None:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**{k: v for k, v in text.items() if not k.startswith("_")})
        missing = _unmatched(list(t.text_encoder_lora_targets), _names(lambda: CLIPTextModel(config)))
        if missing:
            raise ConfigError(
                f"train.text_encoder_lora_targets {missing} matched no text-encoder layer; "
                "use names such as q_proj, k_proj, v_proj"
            )
