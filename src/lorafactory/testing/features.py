"""Synthetic CCIP-like features of known characters, for clustering tests and benchmarks.

Each character is a random direction; each of its outfits shifts it a little; each crop adds its
own noise. With the CCIP difference ``(1 - cos) / 2`` (the stand-in model's) crops of one character
fall mostly under the default threshold and crops of two characters far above it.
"""

from __future__ import annotations

import numpy as np


def character_features(
    characters: int,
    crops: int,
    outfits: int = 3,
    dims: int = 768,
    outfit_shift: float = 0.4,
    noise: tuple[float, float] = (0.3, 0.7),
    strays: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``crops`` float32 features of ``characters`` (sizes uneven, as a show's cast is) plus
    ``strays`` one-off background people; the true character of each (-1 for strays)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((characters, dims)))
    shifts = _unit(rng.standard_normal((characters, outfits, dims))) * outfit_shift
    weights = rng.dirichlet(np.full(characters, 2.0))
    truth = rng.choice(characters, size=crops, p=weights)
    outfit = rng.integers(0, outfits, size=crops)
    scale = rng.uniform(*noise, size=(crops, 1)) / np.sqrt(dims)
    features = centres[truth] + shifts[truth, outfit] + rng.standard_normal((crops, dims)) * scale
    if strays:
        features = np.concatenate([features, rng.standard_normal((strays, dims))])
        truth = np.concatenate([truth, np.full(strays, -1)])
    lengths = rng.uniform(8.0, 12.0, size=(len(features), 1))  # CCIP features are not unit length
    return (_unit(features) * lengths).astype(np.float32), truth


def cosine_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``clip((1 - cos) / 2, 0, 1)``: the stand-in CCIP metric, in NumPy."""
    return np.clip((1.0 - _unit(a) @ _unit(b).T) / 2.0, 0.0, 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
