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


def _clusters_and_truth(characters, crops, seed):
    features, truth = character_features(characters, crops, seed=seed)
    result = cluster_characters(features, cosine_difference, CCIP_THRESHOLD)
    samples = [features[result.labels == label][:32] for label in range(len(result.sizes))]
    majority = [int(np.bincount(truth[result.labels == label]).argmax()) for label in range(len(result.sizes))]
    return features, truth, samples, majority


def test_clusters_are_named_from_reference_sets_and_never_wrongly():
    """Six characters on screen; reference sets for four of them, one of a character not in the show,
    and one mixing two characters: the four are named, the rest stay unknown."""
    from lorafactory.dataset.naming import name_clusters

    features, truth, samples, majority = _clusters_and_truth(6, 900, seed=11)
    rng = np.random.default_rng(0)

    def references(character, count=12):
        return features[rng.choice(np.flatnonzero(truth == character), count, replace=False)]

    cast = {f"character {c}": references(c) for c in (0, 1, 2, 3)}
    cast["not in this show"] = character_features(1, 12, seed=99)[0]
    cast["mixed up"] = np.concatenate([references(4, 6), references(5, 6)])
    named = name_clusters(samples, cast, cosine_difference, CCIP_THRESHOLD)
    given = {result.cluster: result.name for result in named}
    for cluster, character in enumerate(majority):
        expected = f"character {character}" if character < 4 else None
        assert given[cluster] == expected, (cluster, character, named[cluster])
    assert all(r.score >= 0.6 and r.score - r.runner_up >= 0.2 for r in named if r.name)


def test_two_clusters_of_one_character_share_its_name():
    from lorafactory.dataset.naming import name_clusters

    features, truth = character_features(2, 200, seed=4)
    one = features[truth == 0]
    halves = [one[: len(one) // 2], one[len(one) // 2 :], features[truth == 1]]
    named = name_clusters(halves, {"A": one[:10], "B": features[truth == 1][:10]}, cosine_difference, CCIP_THRESHOLD)
    assert [r.name for r in named] == ["A", "A", "B"]
