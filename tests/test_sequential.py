"""Sequential evaluation: a checkpoint scored on half of its images is dropped only when even the top of
its intervals could not make it a kept step. Checked on synthetic metric tables, where every
checkpoint's per-image values are drawn around a known curve, against scoring every image."""

import numpy as np
import pytest

from lorafactory.config import load_settings
from lorafactory.evaluate.metrics import bootstrap_interval
from lorafactory.evaluate.select import ruled_out, select_steps

METRICS = ("ccip_recscore", "bikini_plus", "ai_corrupt")
IMAGES = 28  # the default prompt suite's images per checkpoint


def _curves(steps: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fidelity rises then saturates, prompt adherence falls as the LoRA overfits, corruption is flat."""
    middle, rate = rng.uniform(0.2, 0.5), rng.uniform(6, 14)
    position = steps / steps.max()
    return {
        "ccip_recscore": 0.15 + 0.75 / (1 + np.exp(-rate * (position - middle))),
        "bikini_plus": 0.45 - 0.2 * position**2,
        "ai_corrupt": np.full(len(steps), 0.95),
    }


def _images(curves: dict[str, np.ndarray], rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    noise = {"ccip_recscore": 0.2, "bikini_plus": 0.08, "ai_corrupt": 0.03}
    return [
        {m: np.clip(curves[m][i] + rng.normal(0, noise[m], IMAGES), 0, 1) for m in METRICS}
        for i in range(len(curves["ccip_recscore"]))
    ]


def _row(values: dict[str, np.ndarray], chosen: slice) -> tuple[dict, dict]:
    row = {m: float(values[m][chosen].mean()) for m in METRICS}
    intervals = {m: bootstrap_interval(list(values[m][chosen]), 400, seed=1) for m in METRICS}
    return row, intervals


def _sequential(steps: list[int], images: list[dict], e) -> tuple[dict, set[int]]:
    """What the evaluator does: latest step first; half of the images, then the rest unless ruled out."""
    table, ruled = {}, set()
    for step, values in sorted(zip(steps, images), key=lambda pair: -pair[0]):
        probe, intervals = _row(values, slice(0, None, 2))
        if ruled_out(table, step, probe, intervals, e, frozenset(ruled)):
            ruled.add(step)
            table[step] = probe  # in the normalisation, as the evaluator keeps it, but never kept
        else:
            table[step] = _row(values, slice(None))[0]
    return table, ruled


@pytest.mark.parametrize("seed", range(12))
def test_sequential_choice_matches_scoring_every_image_within_the_intervals(seed):
    e = load_settings().evaluate
    rng = np.random.default_rng(seed)
    steps = list(range(100, 2100, 100))
    images = _images(_curves(np.array(steps, dtype=float), rng), rng)
    full = {step: _row(values, slice(None))[0] for step, values in zip(steps, images)}
    intervals = {step: _row(values, slice(None))[1] for step, values in zip(steps, images)}
    chosen_full = select_steps(full, e)
    table, ruled = _sequential(steps, images, e)
    chosen = select_steps(table, e, frozenset(ruled))
    assert 2 <= len(ruled) <= len(steps) - 3  # it saves work, and keeps what selection needs
    assert not ruled & set(chosen.kept)
    if chosen.best != chosen_full.best:  # a different pick only among steps the intervals cannot tell apart
        a, b = intervals[chosen.best]["ccip_recscore"], intervals[chosen_full.best]["ccip_recscore"]
        assert a[0] <= b[1] and b[0] <= a[1]


def test_nothing_is_ruled_out_before_there_are_as_many_scored_steps_as_are_kept():
    e = load_settings().evaluate
    hopeless = {"ccip_recscore": 0.0, "bikini_plus": 0.0, "ai_corrupt": 0.0}
    tight = {m: (0.0, 0.01) for m in METRICS}
    good = {"ccip_recscore": 0.9, "bikini_plus": 0.4, "ai_corrupt": 0.95}
    assert not ruled_out({100: good, 200: good}, 300, hopeless, tight, e)  # 3 steps are kept
    assert ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, e)
    wide = {m: (0.0, 1.0) for m in METRICS}
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, wide, e)  # it could still win
    by_loss = load_settings(overrides=['evaluate.selection="validation_loss"']).evaluate
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, by_loss)


def test_over_many_runs_the_same_step_is_chosen_and_a_fifth_of_the_images_are_saved():
    e = load_settings().evaluate
    same, saved = 0, 0
    runs, steps = 40, list(range(100, 2100, 100))
    for seed in range(100, 100 + runs):
        rng = np.random.default_rng(seed)
        images = _images(_curves(np.array(steps, dtype=float), rng), rng)
        full = select_steps({step: _row(values, slice(None))[0] for step, values in zip(steps, images)}, e)
        table, ruled = _sequential(steps, images, e)
        same += select_steps(table, e, frozenset(ruled)).best == full.best
        saved += len(ruled) * (IMAGES // 2)
    assert same >= 0.9 * runs
    assert saved / (runs * len(steps) * IMAGES) >= 0.2
