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
        predict: Callable[[torch.Tensor, torch.Tensor, list[Example]], torch.Tensor],
        device: torch.device,
        batch_size: int,
    ) -> dict[str, float]:
        """Mean loss per timestep (``t200``…) and over all (``mean``); ``predict(noisy, timesteps, examples)``.

        Every (image, timestep) pair of one latent shape goes through the UNet in batches of ``batch_size``,
        and the losses are read back once: a checkpoint's validation costs a few batched passes, not one
        pass (and one wait for the GPU) per pair."""
        pairs = [(i, j) for i in range(len(self.examples)) for j in range(len(self.timesteps))]
        by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, j in pairs:
            by_shape.setdefault(tuple(self.examples[i].latent.shape), []).append((i, j))
        losses: dict[tuple[int, int], torch.Tensor] = {}
        for members in by_shape.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                latents = torch.stack([self.examples[i].latent for i, _ in chunk]).to(device)
                noise = torch.stack([self.noise[i][j] for i, j in chunk]).to(device)
                timesteps = torch.tensor([self.timesteps[j] for _, j in chunk], device=device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                prediction = predict(noisy, timesteps, [self.examples[i] for i, _ in chunk])
                target = target_for(scheduler, latents, noise, timesteps, prediction_type)
                losses.update(zip(chunk, per_sample_mse(prediction, target)))
        values = dict(zip(pairs, torch.stack([losses[pair] for pair in pairs]).tolist()))
        totals = {t: sum(values[(i, j)] for i in range(len(self.examples))) for j, t in enumerate(self.timesteps)}
        result = {f"t{t}": total / len(self.examples) for t, total in totals.items()}
        result["mean"] = sum(totals.values()) / (len(self.examples) * len(self.timesteps))
        return result
