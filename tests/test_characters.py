"""Character clusters at season scale: chunked HDBSCAN, centroid merges, and the reference's hygiene."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from lorafactory.dataset.characters import cluster_characters
from lorafactory.testing.features import character_features, cosine_difference
from lorafactory.testing.standin_hub import CCIP_THRESHOLD


@pytest.mark.parametrize("chunk", [150, 2000])
def test_clusters_match_the_true_characters_whatever_the_chunking(chunk):
    """8 characters in 3 outfits each, 1,200 crops and 30 one-off strays: chunks of 150 crops
    (clustered apart, then merged) find the same characters as one chunk of everything."""
    features, truth = character_features(8, 1200, strays=30, seed=3)
    episodes = np.arange(len(features)) * 6 // len(features)  # six episodes in order
    result = cluster_characters(features, cosine_difference, CCIP_THRESHOLD, groups=episodes, chunk=chunk)
    known = truth >= 0
    assert adjusted_rand_score(truth[known], result.labels[known]) >= 0.95
    assert (result.labels[~known] == -1).all()  # a stray never joins a character
    assert result.sizes == sorted(result.sizes, reverse=True) and len(result.sizes) == 8
    assert result.sizes == np.bincount(result.labels[result.labels >= 0]).tolist()


def test_the_real_ccip_path_clusters_the_same():
    """Through imgutils' CCIP metric model (the stand-in hub's, in this test kit)."""
    from lorafactory.vision.ccip import differences

    features, truth = character_features(4, 300, seed=5)
    result = cluster_characters(
        features, lambda a, b: differences(a, b, "ccip-caformer-24-randaug-pruned"), CCIP_THRESHOLD, chunk=100
    )
    assert adjusted_rand_score(truth, result.labels) >= 0.95


def test_too_few_crops_are_all_noise():
    features, _ = character_features(2, 4, seed=1)
    result = cluster_characters(features, cosine_difference, CCIP_THRESHOLD)
    assert result.sizes == [] and (result.labels == -1).all()
