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
    def loss(
        self,
        scheduler,
        prediction_type: str,
        predict: Callable[[torch.Tensor, torch.Tensor, Example], torch.Tensor],
        device: torch.device,
    ) -> dict[str, float]:
        """Mean loss per timestep (``t200``…) and over all (``mean``); ``predict(noisy, timestep, example)``."""
        totals = {t: 0.0 for t in self.timesteps}
        for example, noises in zip(self.examples, self.noise):
            latents = example.latent.unsqueeze(0).to(device)
            for t, noise in zip(self.timesteps, noises):
                noise = noise.unsqueeze(0).to(device)
                timestep = torch.tensor([t], device=device)
                prediction = predict(scheduler.add_noise(latents, noise, timestep), timestep, example)
                totals[t] += per_sample_mse(
                    prediction, target_for(scheduler, latents, noise, timestep, prediction_type)
                ).item()
        result = {f"t{t}": total / len(self.examples) for t, total in totals.items()}
        result["mean"] = sum(totals.values()) / (len(self.examples) * len(self.timesteps))
        return result
