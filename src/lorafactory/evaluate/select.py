"""Choosing the steps to release from the per-step metric table.

The default ("fbeta") is the reference pipeline's rule: z-normalise fidelity (CCIP RecScore) and
controllability (BikiniPlus) across steps as ``clip(0.6 + 0.2 z, 1e-6, 1)`` (BikiniPlus's spread
floored), keep the steps that pass an AI-corruption threshold lowered from 1.0 by 0.05 until
enough pass, rank them by F-beta (fidelity weighted beta times), keep the top k. Ties go to higher
RecScore, then AI-corruption, then BikiniPlus, then the earlier step. A metric missing for every
step drops out of the rule; a step missing a metric the rule uses is not ranked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorafactory.config import EvaluateSettings

Table = dict[int, dict[str, float | None]]
LADDER_TOP, LADDER_STEP = 1.0, 0.05


@dataclass
class Selection:
    kept: list[int]  # best first
    reason: str
    scores: dict[int, float] = field(default_factory=dict)  # the ranking score of every ranked step
    excluded: dict[int, str] = field(default_factory=dict)  # steps not ranked, and why
    gate_passed: bool = True
    gate_reason: str = ""

    @property
    def best(self) -> int:
        return self.kept[0]


def keep_count(steps: int, keep: int) -> int:
    """The reference's ``max(min(n // 3, 5), 3)`` unless set, never more than there are steps."""
    return min(steps, keep or max(min(steps // 3, 5), 3))


def normalise(values: dict[int, float], std_floor: float = 0.0) -> dict[int, float]:
    """``clip(0.6 + 0.2 z, 1e-6, 1)`` with z the z-score across steps (0 when all are equal)."""
    data = np.array(list(values.values()), dtype=np.float64)
    std = max(float(data.std()), std_floor)
    mean = float(data.mean())
    return {
        step: float(np.clip(0.6 + 0.2 * ((v - mean) / std if std > 0 else 0.0), 1e-6, 1.0))
        for step, v in values.items()
    }


def fbeta(c: float, b: float, beta: float) -> float:
    return (beta**2 + 1) * c * b / (beta**2 * b + c)


def _present(table: Table, metric: str) -> dict[int, float]:
    return {step: float(row[metric]) for step, row in table.items() if row.get(metric) is not None}


def _corruption_ladder(steps: list[int], aic: dict[int, float], wanted: int, floor: float) -> tuple[list[int], str]:
    """Lower the AI-corruption threshold from 1.0 by 0.05 until ``wanted`` steps pass (or the floor)."""
    threshold = LADDER_TOP
    while True:
        passing = [s for s in steps if aic[s] >= threshold - 1e-9]
        if len(passing) >= wanted or threshold - LADDER_STEP < floor - 1e-9:
            break
        threshold = round(threshold - LADDER_STEP, 10)
    if not passing:
        return steps, f"no step reached the AI-corruption floor {floor:.2f}, so none was dropped"
    return passing, f"{len(passing)} of {len(steps)} steps pass AI-corruption ≥ {threshold:.2f}"


def select_steps(table: Table, e: EvaluateSettings, ineligible: frozenset[int] = frozenset()) -> Selection:
    """The kept steps, best first. ``ineligible`` steps (scored on part of their images) take part in
    the normalisation as every step does, but are never kept."""
    if not table:
        raise ValueError("no checkpoints to select from")
    if e.selection == "validation_loss":
        selection = _by_single(table, "validation_loss", True, "validation loss", e.keep, ineligible)
    elif e.selection == "recscore":
        selection = _by_single(table, "ccip_recscore", False, "CCIP RecScore", e.keep, ineligible)
    else:
        selection = _by_fbeta(table, e, ineligible)
    _apply_gate(selection, table, e)
    return selection


def _fallback(table: Table, why: str, excluded: dict[int, str]) -> Selection:
    last = max(table)
    return Selection([last], f"{why}; fell back to the last step {last}", {}, excluded)


def _by_single(
    table: Table, metric: str, lower_is_better: bool, label: str, k: int, ineligible: frozenset[int]
) -> Selection:
    values = _present(table, metric)
    excluded = {step: f"{metric} missing" for step in table if step not in values}
    if not values:
        return _fallback(table, f"no step has a {label}", excluded)
    ranked = sorted(values, key=lambda s: ((values[s] if lower_is_better else -values[s]), s))
    eligible = [s for s in ranked if s not in ineligible] or ranked
    kept = eligible[: keep_count(len(eligible), k)]
    word = "lowest" if lower_is_better else "highest"
    return Selection(kept, f"{word} {label} {values[kept[0]]:.3f}", values, excluded)


def _by_fbeta(table: Table, e: EvaluateSettings, ineligible: frozenset[int]) -> Selection:
    ccip = _present(table, "ccip_recscore")
    bp = _present(table, "bikini_plus")
    aic = _present(table, "ai_corrupt")
    notes: list[str] = []
    excluded = {step: "CCIP RecScore missing" for step in table if step not in ccip}
    steps = sorted(ccip)
    if bp:
        excluded.update({s: "BikiniPlus missing" for s in steps if s not in bp})
        steps = [s for s in steps if s in bp]
    else:
        notes.append("BikiniPlus missing for every step: ranked by fidelity alone")
    if not steps:
        return _fallback(table, "no step has the metrics the selection needs", excluded)
    k = keep_count(len(steps), e.keep)
    if aic:
        excluded.update({s: "AI-corruption missing" for s in steps if s not in aic})
        scored = [s for s in steps if s in aic]
        if scored:
            steps, note = _corruption_ladder(scored, aic, min(3 * k, len(scored)), e.corrupt_floor)
            excluded.update({s: "below the AI-corruption threshold" for s in scored if s not in steps})
            notes.append(note)
    else:
        notes.append("AI-corruption missing for every step: no corruption filter")
    c = normalise({s: ccip[s] for s in steps})
    b = normalise({s: bp[s] for s in steps}, e.bikini_plus_std_floor) if bp else None
    scores = {s: fbeta(c[s], b[s], e.fidelity_beta) if b else c[s] for s in steps}
    ranked = sorted(steps, key=lambda s: (-scores[s], -ccip[s], -aic.get(s, 0.0), -bp.get(s, 0.0), s))
    eligible = [s for s in ranked if s not in ineligible] or ranked
    kept = eligible[: keep_count(len(eligible), e.keep)]
    best = kept[0]
    parts = (
        [f"CCIP RecScore {ccip[best]:.3f}"]
        + ([f"BikiniPlus {bp[best]:.3f}"] if bp else [])
        + ([f"AI-corruption {aic[best]:.3f}"] if best in aic else [])
    )
    reason = f"best F{e.fidelity_beta:g} score of fidelity and controllability ({', '.join(parts)})"
    return Selection(kept, "; ".join([reason, *notes]), scores, excluded)


def _apply_gate(selection: Selection, table: Table, e: EvaluateSettings) -> None:
    if e.gate_recscore <= 0:
        return
    best = table[selection.best].get("ccip_recscore")
    if best is None:
        selection.gate_passed, selection.gate_reason = (
            False,
            f"the selected step {selection.best} has no CCIP RecScore",
        )
    elif best < e.gate_recscore:
        selection.gate_passed = False
        selection.gate_reason = f"best CCIP RecScore {best:.3f} is below evaluate.gate_recscore {e.gate_recscore:.2f}"


# metrics the ranking rules prefer higher; a probe's best case takes each at its interval's top
_HIGHER_IS_BETTER = ("ccip_recscore", "bikini_plus", "ai_corrupt")


def ruled_out(
    table: Table,
    step: int,
    probe: dict[str, float | None],
    intervals: dict[str, tuple[float, float] | None],
    e: EvaluateSettings,
    keep: int,
    ineligible: frozenset[int] = frozenset(),
) -> bool:
    """True when ``step``, scored on part of its images (``probe``, with 95% ``intervals``), would not be
    among the ``keep`` best even at the top of its intervals, among the steps of ``table`` (``ineligible``
    ones, ruled out before, count in the normalisation only): the rest of its images cannot change the
    selection beyond those intervals, so they need not be rendered. ``keep`` is what the whole run will
    keep (``keep_count`` of all its checkpoints), not what the steps scored so far would.

    Needs ``keep`` eligible steps first; the validation-loss rule never samples, so it rules out nothing.
    """
    if e.selection == "validation_loss" or len(table.keys() - ineligible) < keep:
        return False
    best_case = dict(probe)
    for metric in _HIGHER_IS_BETTER:
        if intervals.get(metric) and best_case.get(metric) is not None:
            best_case[metric] = max(float(best_case[metric]), intervals[metric][1])
    trial = select_steps({**table, step: best_case}, e.model_copy(update={"keep": keep}), ineligible)
    return step not in trial.kept
