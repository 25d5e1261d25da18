"""Validation loss on held-out images with fixed noise and fixed timesteps, comparable across steps.

The noise comes from its own seeded generator, so validating never moves the training RNG.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorafactory.train.data import Example
from lorafactory.train.objective import per_sample_mse, target_for


class ValidationSet:
    def __init__(self, examples: list[Example], timesteps: list[int], seed: int) -> None:
        self.examples = examples
        self.timesteps = timesteps
        generator = torch.Generator().manual_seed(seed + 7919)
        self.noise = [[torch.randn(ex.latent.shape, generator=generator) for _ in timesteps] for ex in examples]

    def __bool__(self) -> bool:
        return bool(self.examples)

    @torch.no_grad()
    def loss(self, unet, scheduler, prediction_type: str, condition: Callable[[list[str]], torch.Tensor], caption: Callable[[Example], str]) -> dict[str, float]:
        """Mean loss per timestep (``t200``…) and over all (``mean``)."""
        device = next(p.device for p in unet.parameters())
        dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)
        totals = {t: 0.0 for t in self.timesteps}
        for example, noises in zip(self.examples, self.noise):
            hidden = condition([caption(example)])
            latents = example.latent.unsqueeze(0).to(device)
            for t, noise in zip(self.timesteps, noises):
                noise = noise.unsqueeze(0).to(device)
                timestep = torch.tensor([t], device=device)
                noisy = scheduler.add_noise(latents, noise, timestep)
                prediction = unet(noisy.to(dtype), timestep, hidden).sample
                totals[t] += per_sample_mse(prediction, target_for(scheduler, latents, noise, timestep, prediction_type)).item()
        result = {f"t{t}": total / len(self.examples) for t, total in totals.items()}
        result["mean"] = sum(totals.values()) / (len(self.examples) * len(self.timesteps))
        return result
