"""Step selection, evaluation metrics and the prompt suite, on synthetic inputs."""

import numpy as np
import pytest

from lorafactory.config import EvaluateSettings, PromptSpec
from lorafactory.dataset.clusters import outfit_clusters
from lorafactory.evaluate.metrics import bikini_plus, bootstrap_interval, prompt_tags, tag_weights, vendi_score
from lorafactory.evaluate.prompts import is_male, jobs, prompt_specs
from lorafactory.evaluate.select import fbeta, keep_count, normalise, select_steps


def _row(ccip=None, bp=None, aic=None, loss=None):
    return {"ccip_recscore": ccip, "bikini_plus": bp, "ai_corrupt": aic, "validation_loss": loss}


def test_reference_rule_balances_fidelity_and_control():
    # step 400 has the best fidelity but has lost prompt control (overfit); 300 balances both
    table = {
        100: _row(0.40, 0.90, 0.99),
        200: _row(0.70, 0.86, 0.99),
        300: _row(0.82, 0.84, 0.98),
        400: _row(0.85, 0.60, 0.97),
    }
    e = EvaluateSettings(keep=2, gate_recscore=0)
    selection = select_steps(table, e)
    assert selection.kept == [300, 400]
    c, b = (
        normalise({s: r["ccip_recscore"] for s, r in table.items()}),
        normalise({s: r["bikini_plus"] for s, r in table.items()}, 0.015),
    )
    assert selection.scores[300] == pytest.approx(fbeta(c[300], b[300], 3.0))
    assert "CCIP RecScore 0.820" in selection.reason and selection.gate_passed
    # with fidelity weighted far more, the overfit step wins
    assert select_steps(table, EvaluateSettings(keep=1, fidelity_beta=50, gate_recscore=0)).best == 400


def test_ties_go_to_higher_fidelity_then_the_earlier_step():
    table = {10: _row(0.5, 0.5, 0.9), 20: _row(0.5, 0.5, 0.9), 30: _row(0.5, 0.5, 0.9)}
    assert select_steps(table, EvaluateSettings(gate_recscore=0)).kept == [10, 20, 30]
    by_recscore = select_steps(
        {10: _row(0.7), 20: _row(0.7), 30: _row(0.2)}, EvaluateSettings(selection="recscore", keep=1, gate_recscore=0)
    )
    assert by_recscore.kept == [10] and "highest CCIP RecScore 0.700" in by_recscore.reason


def test_corruption_ladder_drops_broken_steps():
    table = {
        s: _row(0.5 + s / 1000, 0.8, aic)
        for s, aic in zip(range(10, 100, 10), [0.99, 0.97, 0.96, 0.5, 0.94, 0.93, 0.92, 0.91, 0.2])
    }
    selection = select_steps(table, EvaluateSettings(keep=3, gate_recscore=0))
    assert 90 not in selection.kept and 40 not in selection.kept
    assert selection.excluded[90] == "below the AI-corruption threshold"
    # lowered from 1.0 towards 3 * keep = 9 passing steps, stopped by the floor (0.8) with 7
    assert "7 of 9 steps pass AI-corruption ≥ 0.80" in selection.reason and selection.best == 80


def test_missing_metrics_are_never_zeros():
    table = {10: _row(0.6, None, None), 20: _row(None, None, None), 30: _row(0.8, None, None)}
    selection = select_steps(table, EvaluateSettings(gate_recscore=0))
    assert selection.best == 30 and selection.excluded == {20: "CCIP RecScore missing"}
    assert "BikiniPlus missing for every step" in selection.reason and "AI-corruption missing" in selection.reason
    partial = select_steps({10: _row(0.6, 0.9, 0.95), 20: _row(0.9, None, 0.95)}, EvaluateSettings(gate_recscore=0))
    assert partial.kept == [10] and partial.excluded == {
        20: "BikiniPlus missing"
    }  # not ranked as if BikiniPlus were 0
    nothing = select_steps({10: _row(), 20: _row()}, EvaluateSettings())
    assert nothing.kept == [20] and "fell back to the last step 20" in nothing.reason and not nothing.gate_passed


def test_quality_gate_and_validation_loss_rule():
    table = {10: _row(0.30, 0.9, 0.99, loss=0.20), 20: _row(0.50, 0.9, 0.99, loss=0.15)}
    failed = select_steps(table, EvaluateSettings(gate_recscore=0.55))
    assert (
        not failed.gate_passed
        and "best CCIP RecScore 0.500 is below evaluate.gate_recscore 0.55" == failed.gate_reason
    )
    assert select_steps(table, EvaluateSettings(gate_recscore=0.5)).gate_passed
    by_loss = select_steps(table, EvaluateSettings(selection="validation_loss", gate_recscore=0))
    assert by_loss.best == 20 and by_loss.reason.startswith("lowest validation loss 0.150")


def test_keep_count_follows_the_reference():
    assert [keep_count(n, 0) for n in (1, 3, 9, 15, 30)] == [1, 3, 3, 5, 5]
    assert keep_count(10, 2) == 2


def test_vendi_bootstrap_and_bikini_plus():
    assert vendi_score(np.ones((4, 8))) == pytest.approx(1.0)
    assert vendi_score(np.eye(5)) == pytest.approx(5.0)
    assert bootstrap_interval([0.5], 100) is None and bootstrap_interval([0.1, 0.9], 0) is None
    low, high = bootstrap_interval([0.2, 0.4, 0.6, 0.8], 500, seed=1)
    assert 0.2 <= low < 0.5 < high <= 0.8
    vocabulary = {"bikini", "beach", "watermark", "red_hair"}
    assert prompt_tags("best quality, akane, bikini, Beach, red hair", vocabulary, {"red_hair"}) == ["bikini", "beach"]
    scores = {"bikini": 0.9, "watermark": 0.2}
    assert bikini_plus(scores, ["bikini", "beach"], ["watermark"], {}) == pytest.approx((0.9 + 0.0 + 0.8) / 3)
    assert bikini_plus({"bikini": 0.9}, [], [], {}) is None
    # weights 1.5 ** (ln(count) - p75): log counts 0, 1, 2, 3 -> p75 = 2.25
    weights = tag_weights({"rare": 1, "beach": round(np.e), "watermark": round(np.e**2), "bikini": round(np.e**3)})
    assert weights["bikini"] == pytest.approx(1.5 ** (np.log(20) - np.percentile(np.log([1, 3, 7, 20]), 75)))
    assert weights["rare"] < weights["beach"] < weights["watermark"] < weights["bikini"]
    w = weights
    expected = (0.9 * w["bikini"] + 0.0 * w["beach"] + 0.8 * w["watermark"]) / (
        w["bikini"] + w["beach"] + w["watermark"]
    )
    assert bikini_plus(scores, ["bikini", "beach"], ["watermark"], weights) == pytest.approx(expected)


def test_prompt_suite_sets_clusters_and_seeds():
    female_tags = [["1girl", "maid"]] * 6 + [["1girl", "school_uniform", "skirt"]] * 6
    e = EvaluateSettings()
    specs = prompt_specs(e, female_tags, ignore_tags={"1girl"})
    names = [s.name for s in specs]
    assert {"portrait", "bikini", "maid", "crossed_arms"} <= set(names) and not any(n.startswith("n_") for n in names)
    assert [s.prompt for s in specs if s.name.startswith("pattern_")] == ["maid", "school uniform, skirt"] or [
        s.prompt for s in specs if s.name.startswith("pattern_")
    ] == ["school uniform, skirt", "maid"]
    assert any(n.startswith("n_") for n in (s.name for s in prompt_specs(EvaluateSettings(nsfw=True), female_tags)))
    male = prompt_specs(e, [["1boy"]] * 3 + [["1girl"]])
    assert (
        is_male([["1boy"]] * 3 + [["1girl"]])
        and "swim" in [s.name for s in male]
        and "bikini" not in [s.name for s in male]
    )
    custom = EvaluateSettings(
        prompt_set="custom", cluster_prompts=False, prompts=[PromptSpec(name="a", prompt="smile", count=2)]
    )
    work = jobs(custom, prompt_specs(custom, female_tags), "akane")
    assert [(j.filename, j.prompt) for j in work] == [
        ("a_0.png", "best quality, masterpiece, highres, solo, (akane:1.1), smile"),
        ("a_1.png", "best quality, masterpiece, highres, solo, (akane:1.1), smile"),
    ]
    assert work[1].seed == work[0].seed + 1
    more = custom.model_copy(update={"prompts": [PromptSpec(name="b", prompt="x"), *custom.prompts]})
    assert [j.seed for j in jobs(more, prompt_specs(more, []), "akane") if j.prompt_name == "a"] == [
        j.seed for j in work
    ]
    with pytest.raises(ValueError, match="share the names"):
        prompt_specs(EvaluateSettings(prompts=[PromptSpec(name="maid", prompt="x")]), female_tags)


def test_outfit_clusters_need_enough_images():
    tags = [["maid", "apron", "smile"]] * 8 + [["bikini", "beach"]] * 7 + [["bikini", "beach", "smile"]]
    clusters = outfit_clusters(tags)
    assert [(c.tags[:2], c.size, c.images) for c in clusters] == [
        (["apron", "maid"], 8, 1),
        (["beach", "bikini"], 8, 1),
    ]
    assert outfit_clusters(tags[:6]) == []
