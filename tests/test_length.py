"""How long a run trains: the reference's v1.5 size rule, a fixed count, and the quality gate's retrains."""

import math

import pytest

from conftest import demo_settings
from lorafactory.config import load_settings
from lorafactory.pipeline import retrain_settings
from lorafactory.progress import SilentProgress
from lorafactory.train.length import planned_schedule, samples_per_step
from lorafactory.train.trainer import train


def _train(*overrides):
    return load_settings(overrides=["train.save_every=40", *overrides]).train


def planned_steps(t, images: int) -> int:
    return planned_schedule(t, images)[0]


@pytest.mark.parametrize(
    "images, steps",
    # the reference's worked values at batch 4: 40 epochs, at least 800 steps, at most max(10 epochs, 10,000)
    [(1, 800), (50, 800), (80, 800), (200, 2000), (500, 5000), (1000, 10000), (2000, 10000), (8000, 20000)],
)
def test_the_default_rule_gives_the_reference_v15_step_counts(images, steps):
    assert planned_steps(_train("train.batch_size=4"), images) == steps


def test_steps_count_samples_over_accumulation_and_processes_and_end_on_a_checkpoint():
    one = _train("train.batch_size=4")
    spread = _train("train.batch_size=2", "train.gradient_accumulation=2", "train.num_processes=2")
    assert samples_per_step(spread) == 8 and planned_steps(spread, 400) == planned_steps(one, 400) // 2 == 2000
    assert planned_steps(_train("train.batch_size=4"), 203) == 2040  # 2030 rounded up to the 40-step grid
    assert planned_steps(load_settings(overrides=["train.batch_size=4"]).train, 203) == 2100  # save_every 100
    assert planned_steps(_train("train.max_steps=777"), 5000) == 777  # a fixed count wins


def test_a_retrain_scales_the_planned_steps_as_it_scales_a_fixed_count():
    settings = load_settings(overrides=["train.batch_size=4", "train.save_every=10"])
    for images in (30, 200, 3000):
        planned = planned_steps(settings.train, images)
        assert planned_steps(retrain_settings(settings, 1).train, images) == pytest.approx(planned * 1.5, abs=10)
        assert planned_steps(retrain_settings(settings, 2).train, images) == pytest.approx(planned * 2.25, abs=10)
    fixed = load_settings(overrides=["train.max_steps=100"])
    assert retrain_settings(fixed, 1).train.max_steps == 150


@pytest.mark.parametrize(
    "images, steps, interval",
    # at batch 4 the default 100-step interval gives at most 40 checkpoints up to 4,000 steps; beyond, it widens
    [(50, 800, 100), (200, 2000, 100), (400, 4000, 100), (410, 4100, 200), (1000, 10000, 300), (8000, 20000, 500)],
)
def test_a_long_run_keeps_within_max_checkpoints_on_a_wider_grid(images, steps, interval):
    t = load_settings(overrides=["train.batch_size=4"]).train
    assert planned_schedule(t, images) == (steps, interval)  # the step count stays the size rule's
    assert math.ceil(steps / interval) <= t.max_checkpoints < math.ceil(steps / (interval - t.save_every or 1))


def test_max_checkpoints_0_or_a_fixed_step_count_keeps_save_every():
    assert planned_schedule(_train("train.batch_size=4", "train.max_checkpoints=5"), 1000) == (10000, 2000)
    assert planned_schedule(_train("train.batch_size=4", "train.max_checkpoints=0"), 1000) == (10000, 40)
    assert planned_schedule(_train("train.max_steps=8000", "train.max_checkpoints=5"), 1000) == (8000, 40)


def test_a_run_without_max_steps_trains_the_planned_count_on_the_planned_grid(kit, prepared, tmp_path):
    dataset = prepared.artifact("prepare")
    settings = demo_settings(
        kit,
        "http://127.0.0.1:1",
        "train.epochs=0.25",
        "train.min_steps=10",
        "train.save_every=2",
        "train.max_checkpoints=3",
    )
    settings.train.max_steps = None  # the preset fixes it; a user's settings leave it unset
    images = prepared.manifest("prepare").counts["dataset"]
    assert planned_schedule(settings.train, images) == (10, 4)  # 5 checkpoints at every 2 steps: too many
    result = train(settings, "akane_hoshino", dataset, tmp_path, SilentProgress())
    assert result.counts["steps"] == 10 and sorted(result.checkpoints) == [4, 8, 10]  # and the last step
