"""Text conditioning for SD1 (one CLIP encoder) and SDXL (CLIP-L + CLIP-G, plus the pooled embedding).

The trigger's vectors are spliced into every encoder: ``clip_l`` [N, 768] for SD1; ``clip_l`` and
``clip_g`` [N, 1280] for SDXL, the names A1111, ComfyUI and kohya use in embedding files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafactory.train.embedding import encode_text, expand_trigger, install_trigger
from lorafactory.train.model import Family

ENCODER_KEYS = ("clip_l", "clip_g")


@dataclass
class Conditioning:
    hidden: torch.Tensor  # [B, 77, D] cross-attention states
    pooled: torch.Tensor | None  # [B, P] for SDXL's added conditioning, None for SD1


def encode_prompts(family: Family, tokenizers: list, encoders: list, texts: list[str], clip_skip: int, device: torch.device) -> Conditioning:
    """Conditioning for already-expanded prompts (trigger tokens in place)."""
    if family == "sd1":
        ids = _ids(tokenizers[0], texts, device)
        return Conditioning(encode_text(encoders[0], ids, clip_skip), None)
    hidden, pooled = [], None
    layer = -max(clip_skip, 2)  # SDXL is conditioned on the penultimate layer, without the final norm
    for tokenizer, encoder in zip(tokenizers, encoders):
        out = encoder(_ids(tokenizer, texts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[layer])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def _ids(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)


class TextEncoders:
    """The base model's tokenizers and encoders with the trigger installed in each."""

    def __init__(self, family: Family, tokenizers: list, encoders: list, trigger: str, vectors: int, init_text: str, clip_skip: int, seed: int) -> None:
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders
        self.trigger, self.n_vectors, self.clip_skip = trigger, vectors, clip_skip
        self.vectors: dict[str, nn.Parameter] = {
            key: install_trigger(tokenizer, encoder, trigger, vectors, init_text, seed + i)
            for i, (key, tokenizer, encoder) in enumerate(zip(ENCODER_KEYS, tokenizers, encoders))
        }

    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors.values())

    def to(self, device: torch.device) -> None:
        for parameter in self.vectors.values():
            parameter.data = parameter.data.to(device)  # stays float32 while frozen weights may be half precision

    def freeze_vectors(self) -> None:
        for parameter in self.vectors.values():
            parameter.requires_grad_(False)

    def __call__(self, captions: list[str], device: torch.device) -> Conditioning:
        texts = [expand_trigger(caption, self.trigger, self.n_vectors) for caption in captions]
        trainable = any(p.requires_grad for encoder in self.encoders for p in encoder.parameters())
        # after the pivot nothing in the text encoders trains: skip their backward pass
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return encode_prompts(self.family, self.tokenizers, self.encoders, texts, self.clip_skip, device)
