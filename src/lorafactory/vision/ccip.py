"""CCIP character similarity: batched feature extraction and pairwise differences."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

FEATURE_DIM = 768  # the CCIP models' feature width


def extract_features(
    images: Sequence[Image.Image], model_name: str, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
) -> np.ndarray:
    """[N, FEATURE_DIM] float32 features (N may be 0); ``on_batch(n)`` is called after each batch of n images."""
    from imgutils.metrics import ccip_batch_extract_features

    chunks = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        chunks.append(np.asarray(ccip_batch_extract_features(batch, model=model_name), dtype=np.float32))
        if on_batch:
            on_batch(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, FEATURE_DIM), dtype=np.float32)


def differences(a: np.ndarray, b: np.ndarray, model_name: str) -> np.ndarray:
    """[len(a), len(b)] CCIP differences (smaller = more likely the same character); ``b is a``
    computes the square matrix once."""
    from imgutils.metrics import ccip_batch_differences

    if b is a:
        return np.asarray(ccip_batch_differences(list(a), model=model_name))
    both = np.concatenate([a, b])
    matrix = np.asarray(ccip_batch_differences(list(both), model=model_name))
    return matrix[: len(a), len(a) :]


def default_threshold(model_name: str) -> float:
    from imgutils.metrics import ccip_default_threshold

    return float(ccip_default_threshold(model_name))


def cluster(features: np.ndarray, model_name: str) -> np.ndarray:
    """OPTICS cluster labels over CCIP features (-1 = noise), with the model's own parameters."""
    from imgutils.metrics import ccip_clustering

    return np.asarray(ccip_clustering(list(features), method="optics", model=model_name))
