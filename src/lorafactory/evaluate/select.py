"""Choosing the best checkpoint from per-step metrics."""

from __future__ import annotations


def best_step(recscores: dict[int, float | None]) -> tuple[int, str]:
    """The step with the highest RecScore; ties go to the earlier (less trained) step.

    Returns the step and the reason, for the manifest and the model card.
    """
    scored = {step: value for step, value in recscores.items() if value is not None}
    if not scored:
        last = max(recscores)
        return last, f"no checkpoint could be scored; fell back to the last step {last}"
    top = max(scored.values())
    step = min(s for s, value in scored.items() if value == top)
    ties = sum(1 for value in scored.values() if value == top)
    reason = f"highest CCIP RecScore {top:.3f}" + (f" (tied with {ties - 1} other steps; earliest kept)" if ties > 1 else "")
    return step, reason
