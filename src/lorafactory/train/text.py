"""Text conditioning for SD1 (one CLIP encoder) and SDXL (CLIP-L + CLIP-G, plus the pooled embedding).

The trigger's vectors are spliced into every encoder: ``clip_l`` [N, 768] for SD1; ``clip_l`` and
``clip_g`` [N, 1280] for SDXL, the names A1111, ComfyUI and kohya use in embedding files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafactory.train.embedding import encode_text, expand_trigger, install_trigger
from lorafactory.train.model import Family, host_tensor

ENCODER_KEYS = ("clip_l", "clip_g")


CHUNK = 75  # prompt tokens per CLIP pass; with BOS and EOS that fills the 77 positions
BREAK = float("-inf")  # the weight of a fragment that ends the current chunk (A1111's BREAK)
Fragments = list[tuple[str, float]]  # a prompt as (text, attention weight) pieces


@dataclass
class Conditioning:
    hidden: torch.Tensor  # [B, 77 * chunks, D] cross-attention states
    pooled: torch.Tensor | None  # [B, P] for SDXL's added conditioning (from the first chunk), None for SD1


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def weighted_tokens(tokenizer, fragments: Fragments) -> tuple[list[int], list[float]]:
    """Token ids and their attention weights; a BREAK pads to the end of the chunk, as A1111 does."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in fragments:
        if weight == BREAK:
            fill = CHUNK - len(ids) % CHUNK
            ids += [tokenizer.eos_token_id] * fill
            weights += [1.0] * fill
            continue
        part = _tokens(tokenizer, text)
        ids += part
        weights += [weight] * len(part)
    return ids, weights


def token_chunks(
    tokenizer, tokens: list[tuple[list[int], list[float]]], max_chunks: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and weights in chunks of 75, as AUTOMATIC1111 and kohya handle long prompts: each
    chunk is ``BOS + 75 tokens + EOS`` (padded; BOS, EOS and padding weigh 1), every text gets as
    many chunks as the longest one needs (at most ``max_chunks``; what lies beyond is cut), and a
    prompt that fits in 75 tokens gives exactly the usual single 77-token sequence.

    The chunks come stacked along the batch, chunk by chunk: ids [chunks * B, 77], row ``c * B + b``
    the chunk c of text b, so one encoder pass reads them all. The weights are None when every token
    weighs 1 (decided here, so the GPU is never asked)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    count = max(1, *(-(-len(ids) // CHUNK) for ids, _ in tokens))
    count = min(count, max_chunks) if max_chunks else count
    rows, multipliers = [], []
    for index in range(count):
        window = slice(index * CHUNK, (index + 1) * CHUNK)
        for ids, weights in tokens:
            part, part_weights = ids[window], weights[window]
            rows.append([bos, *part, eos] + [pad] * (CHUNK - len(part)))
            multipliers.append([1.0, *part_weights, 1.0] + [1.0] * (CHUNK - len(part)))
    plain = all(weight == 1.0 for row in multipliers for weight in row)
    return host_tensor(rows, device), None if plain else host_tensor(multipliers, device)


def emphasise(hidden: torch.Tensor, multipliers: torch.Tensor | None) -> torch.Tensor:
    """A1111's emphasis: each token's states times its weight, then rescaled so the mean of each
    prompt's chunk stays what it was (per prompt, so an image never depends on its batch). Where a
    mean is too close to zero for the ratio to mean anything (a random test model's encoder, whose
    final norm has no bias), the weighted states are kept as they are."""
    if multipliers is None:
        return hidden
    before = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * multipliers.to(hidden.dtype).unsqueeze(-1)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    floor = 1e-3 * hidden.abs().mean(dim=(1, 2), keepdim=True)
    usable = (before.abs() > floor) & (after.abs() > floor) & (before * after > 0)
    return torch.where(usable, weighted * (before / torch.where(usable, after, torch.ones_like(after))), weighted)


def encode_prompts(
    family: Family,
    tokenizers: list,
    encoders: list,
    texts: list[str],
    clip_skip: int,
    device: torch.device,
    max_chunks: int | None = 1,
) -> Conditioning:
    """Conditioning for already-expanded prompts (trigger tokens in place), chunked past 75 tokens."""
    return encode_weighted(
        family, tokenizers, encoders, [[(text, 1.0)] for text in texts], clip_skip, device, max_chunks
    )


def encode_weighted(
    family: Family,
    tokenizers: list,
    encoders: list,
    prompts: list[Fragments],
    clip_skip: int,
    device: torch.device,
    max_chunks: int | None = None,
) -> Conditioning:
    """Conditioning for prompts given as weighted fragments (A1111 emphasis), chunked past 75 tokens.
    SDXL's pooled embedding comes from the first chunk, unweighted, as in A1111.

    All chunks go through each encoder in one pass, stacked along the batch (CLIP attends within a
    sequence only): a second chunk costs no second pass of host work, forward or backward."""
    per_encoder, pooled = [], None
    layer = -max(clip_skip, 2)  # SDXL is conditioned on the penultimate layer, without the final norm
    count = len(prompts)
    for tokenizer, encoder in zip(tokenizers, encoders):
        tokens = [weighted_tokens(tokenizer, fragments) for fragments in prompts]
        ids, multipliers = token_chunks(tokenizer, tokens, max_chunks, device)
        if family == "sd1":
            hidden = encode_text(encoder, ids, clip_skip)
        else:
            out = encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[layer]
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds[:count]
        hidden = emphasise(hidden, multipliers)  # per row: per text and chunk
        per_encoder.append(torch.cat(hidden.split(count), dim=1))  # [B, 77 * chunks, D]
    return Conditioning(torch.cat(per_encoder, dim=-1), pooled)


class TextEncoders:
    """The base model's tokenizers and encoders with the trigger installed in each."""

    def __init__(
        self,
        family: Family,
        tokenizers: list,
        encoders: list,
        trigger: str,
        vectors: int,
        init_text: str,
        clip_skip: int,
        seed: int,
        max_chunks: int = 1,
    ) -> None:
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders
        self.trigger, self.n_vectors, self.clip_skip, self.max_chunks = trigger, vectors, clip_skip, max_chunks
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
            return encode_prompts(
                self.family, self.tokenizers, self.encoders, texts, self.clip_skip, device, self.max_chunks
            )
