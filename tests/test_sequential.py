"""Sequential evaluation: a checkpoint scored on part of its images is dropped only when even the top of
its intervals could not make it a kept step. Checked on synthetic runs, where every checkpoint's
per-image values are drawn around a known curve, against scoring every image."""

import pytest

from lorafactory.config import load_settings
from lorafactory.evaluate.schedule import look_parts, small_parts_warning
from lorafactory.testing.metric_tables import IMAGES, METRICS, replay, scored, synthetic_run


@pytest.mark.parametrize("n", [1, 5, 8, 9, 28, 37, 64])
@pytest.mark.parametrize("every", [2, 3, 8])
def test_each_part_holds_at_most_every_images_spread_over_the_whole_suite(n, every):
    parts = look_parts(n, every)
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert len(parts) == -(-n // every) and all(0 < len(part) <= every for part in parts)
    for looked in range(1, len(parts) + 1):  # every look sees each stretch of the suite alike
        seen = sorted(i for part in parts[:looked] for i in part)
        stretches = [sum(lo <= i < lo + len(parts) for i in seen) for lo in range(0, n, len(parts))]
        assert all(count == looked for count in stretches[:-1]) and stretches[-1] <= looked


def test_parts_smaller_than_the_render_batch_are_pointed_out():
    e = load_settings().evaluate  # parts of 8, batches of 8
    assert small_parts_warning(e, 37) is None
    wide = e.model_copy(update={"batch_size": 16})
    assert small_parts_warning(wide, 37) == (
        "evaluate.batch_size is 16 but sequential evaluation renders parts of at most 8 images, so no batch is full; "
        "set evaluate.sequential_every = 16"
    )
    assert small_parts_warning(wide, 8) is None  # one part: the whole suite in one batch
    assert small_parts_warning(wide.model_copy(update={"sequential": False}), 37) is None
    assert small_parts_warning(e.model_copy(update={"batch_size": 4}), 37) is None  # two full batches a part


@pytest.mark.parametrize("seed", range(12))
def test_sequential_choice_matches_scoring_every_image_within_the_intervals(seed):
    e = load_settings().evaluate
    run = synthetic_run(seed)
    everything = replay(run, e, sequential=False, coarse=False)
    sequential = replay(run, e, sequential=True, coarse=False)
    assert 2 <= len(sequential.ruled) <= len(run) - 3  # it saves work, and keeps what selection needs
    assert not sequential.ruled & set(sequential.kept) and not everything.ruled
    if sequential.best != everything.best:  # a different pick only among steps the intervals cannot tell apart
        a, b = (
            scored(run[sequential.best]).intervals["ccip_recscore"],
            scored(run[everything.best]).intervals["ccip_recscore"],
        )
        assert a[0] <= b[1] and b[0] <= a[1]


def test_over_many_runs_the_same_step_is_chosen_and_a_third_of_the_images_are_saved():
    e = load_settings().evaluate
    runs = [synthetic_run(seed) for seed in range(100, 140)]
    outcomes = [(replay(r, e, False, False), replay(r, e, True, False)) for r in runs]
    assert sum(full.best == seq.best for full, seq in outcomes) >= 0.9 * len(runs)
    assert sum(seq.images for _, seq in outcomes) <= 0.67 * sum(full.images for full, _ in outcomes)
    assert all(full.images == len(r) * IMAGES for r, (full, _) in zip(runs, outcomes))
    looks = {7, 14, 21}  # 28 images in parts of at most 8: four of 7
    assert all(seq.rendered[s] in looks for _, seq in outcomes for s in seq.ruled)
    assert all(seq.rendered[s] == IMAGES for _, seq in outcomes for s in seq.rendered.keys() - seq.ruled)


def test_another_draw_renders_the_same_checkpoints_with_other_noise():
    run, again = synthetic_run(3), synthetic_run(3, draw=1)
    assert run.keys() == again.keys()
    for step in run:
        for metric in METRICS:
            assert (run[step][metric] != again[step][metric]).any()
            assert abs(run[step][metric].mean() - again[step][metric].mean()) < 0.15  # the curve is the same


def test_nothing_is_ruled_out_before_there_are_as_many_scored_steps_as_are_kept():
    from lorafactory.evaluate.select import ruled_out

    e = load_settings().evaluate
    hopeless = {"ccip_recscore": 0.0, "bikini_plus": 0.0, "ai_corrupt": 0.0}
    tight = {m: (0.0, 0.01) for m in METRICS}
    good = {"ccip_recscore": 0.9, "bikini_plus": 0.4, "ai_corrupt": 0.95}
    assert not ruled_out({100: good, 200: good}, 300, hopeless, tight, e, keep=3)  # 3 steps are kept
    assert ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, e, keep=3)
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, e, keep=4)  # the run keeps 4
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, e, 3, frozenset({300}))
    wide = {m: (0.0, 1.0) for m in METRICS}
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, wide, e, keep=3)  # it could still win
    by_loss = load_settings(overrides=['evaluate.selection="validation_loss"']).evaluate
    assert not ruled_out({100: good, 200: good, 300: good}, 400, hopeless, tight, by_loss, keep=3)
