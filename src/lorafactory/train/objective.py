"""The denoising objective: noise (with offset), targets and per-sample loss weights (min-SNR)."""

from __future__ import annotations

import torch


def sample_noise(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator, offset: float
) -> torch.Tensor:
    """Gaussian noise for latents of ``shape`` [B, C, h, w]; ``offset`` adds a per-channel constant (noise offset)."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
    return noise


def target_for(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights: ``min(SNR, γ)/SNR`` for ε-prediction, ``min(SNR, γ)/(SNR + 1)`` for v-prediction."""
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
