"""The trigger word's multi-vector embedding, spliced in where its tokens appear.

The trigger becomes N added tokens, ``trigger``, ``trigger_1`` ... ``trigger_{N-1}``: the same
names diffusers' ``load_textual_inversion`` and A1111 use for an N-vector embedding, so a
prompt expands identically in training and at inference. The base embedding matrix is
neither resized nor trained: the N rows live in their own float32 parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.errors import ConfigError


def token_names(trigger: str, vectors: int) -> list[str]:
    return [trigger] + [f"{trigger}_{i}" for i in range(1, vectors)]


def expand_trigger(text: str, trigger: str, vectors: int) -> str:
    """Replace the trigger with its N token names, as diffusers' ``maybe_convert_prompt`` does."""
    return text.replace(trigger, " ".join(token_names(trigger, vectors))) if vectors > 1 else text


class SplicedTokenEmbedding(nn.Module):
    """Token embedding whose ids from ``first_id`` on read from ``vectors`` instead of the frozen table."""

    def __init__(self, base: nn.Embedding, first_id: int, vectors: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = vectors

    @property
    def weight(self) -> torch.Tensor:  # read by code that asks the embedding for its dtype or device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        known = input_ids.clamp(max=self.base.num_embeddings - 1)
        out = self.base(known)
        added = input_ids >= self.first_id
        index = (input_ids - self.first_id).clamp(0, self.vectors.shape[0] - 1)
        return torch.where(added.unsqueeze(-1), self.vectors[index].to(out.dtype), out)


def _init_vectors(
    tokenizer, table: nn.Embedding, vectors: int, init_text: str, generator: torch.Generator
) -> torch.Tensor:
    dim = table.embedding_dim
    if init_text.strip():
        ids = tokenizer(init_text, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"train.embedding_init {init_text!r} has no tokens; use a few words or leave it empty")
        rows = table.weight.detach().float()[torch.tensor(ids)]
        return rows[torch.arange(vectors) % rows.shape[0]].clone()
    return torch.randn(vectors, dim, generator=generator) * 0.017


def install_trigger(tokenizer, text_encoder, trigger: str, vectors: int, init_text: str, seed: int) -> nn.Parameter:
    """Add the trigger's tokens and splice a trainable [vectors, dim] parameter into the text encoder."""
    names = token_names(trigger, vectors)
    clash = [name for name in names if name in tokenizer.get_vocab()]
    if clash:
        raise ConfigError(
            f"trigger {trigger!r} is already a token of the base model; choose another character.trigger"
        )
    first_id = len(tokenizer)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(first_id, first_id + vectors)):
        raise ConfigError(f"trigger {trigger!r} could not be added as new tokens; choose another character.trigger")
    embeddings = text_encoder.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    parameter = nn.Parameter(_init_vectors(tokenizer, embeddings, vectors, init_text, generator).float())
    text_core(text_encoder).embeddings.token_embedding = SplicedTokenEmbedding(embeddings, first_id, parameter)
    return parameter


def text_core(text_encoder):
    """The module holding embeddings and final_layer_norm (``.text_model`` before transformers 5.6)."""
    return getattr(text_encoder, "text_model", text_encoder)


def encode_text(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Conditioning for the UNet; ``clip_skip`` in the A1111 convention (2 = penultimate layer)."""
    if clip_skip <= 1:
        return text_encoder(input_ids).last_hidden_state
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    return text_core(text_encoder).final_layer_norm(hidden)
