"""A checkpoint's LoRA merged into the base weights for rendering (``evaluate.merge_lora``), then taken out
exactly.

Rendered beside the base layers, each LoRA layer adds two thin matrix products and an addition to every
sampler step; merged (as AUTOMATIC1111 and ComfyUI apply a LoRA) the UNet runs at the base model's cost.
Unmerging subtracts in the weights' dtype, which drifts in half precision, so the base weights are copied
to host memory the first time a layer is merged and copied back instead.
"""

from __future__ import annotations

import torch


class MergedLora:
    """Merges one adapter of a module's peft LoRA layers into their base weights; ``restore()`` puts the
    base weights back bit for bit."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self._pristine: dict[torch.nn.Module, torch.Tensor] = {}  # base layer -> its weight, on the host
        self._merged: list = []

    def merge(self, module: torch.nn.Module) -> None:
        """Merge the adapter into every LoRA layer of ``module`` that has it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in module.modules():
            if not isinstance(layer, BaseTunerLayer) or self.adapter not in getattr(layer, "lora_A", {}):
                continue
            base = layer.get_base_layer()
            if base not in self._pristine:
                self._pristine[base] = base.weight.detach().to("cpu", copy=True)
            layer.merge(adapter_names=[self.adapter])
            self._merged.append(layer)

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights as they were before any merge; the layers compute the adapter beside them again."""
        for layer in self._merged:
            base = layer.get_base_layer()
            base.weight.copy_(self._pristine[base])
            layer.merged_adapters.clear()
        self._merged = []
