"""The report's charts: each a figure (PNG bytes, the same bytes for the same rows), a caption with
its numbers, and the table behind it.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import median

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorafactory.report.rows import CharacterRow, StageRow

SOURCES = ("web", "anime", "local")
SIZE_BINS = ((1, 5, "1–5 few-shot"), (5, 20, "5–20 tiny"), (20, 60, "20–60 small"), (60, 150, "60–150 medium"))
SIZE_BINS += ((150, 350, "150–350 large"), (350, math.inf, "350+ massive"))
RECSCORE_BANDS = ((0.0, 0.5, "< 0.5"), (0.5, 0.7, "0.5–0.7"), (0.7, 0.9, "0.7–0.9"), (0.9, math.inf, "≥ 0.9"))
OVERFIT = 0.3  # a bikini score under this: the character is drawn in her own outfit whatever the prompt
MIN_CORRELATION_N = 5  # fewer characters in a panel: no ρ is shown
DPI = 100


@dataclass
class Chart:
    name: str  # file stem of the PNG and the CSV
    title: str
    caption: str
    png: bytes | None
    table: list[dict] = field(default_factory=list)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})  # no version: same bytes
    return buffer.getvalue()


def _counts(axes, label: str) -> None:
    """A y axis of counts: whole numbers only (a few characters would otherwise get ticks at 0.25)."""
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(label)


def _kinds(rows: list[CharacterRow]) -> list[str]:
    return [kind for kind in SOURCES if any(r.source == kind for r in rows)]


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.0f}%" if total else "–"


def size_bin(images: int) -> str | None:
    return next((label for low, high, label in SIZE_BINS if low <= images < high), None)


def dataset_sizes(rows: list[CharacterRow]) -> Chart:
    kinds = _kinds(rows)
    counts = Counter((r.source, size_bin(r.images)) for r in rows if r.images)
    table = [
        {"source": kind, "bin": label, "characters": counts[(kind, label)]}
        for kind in kinds
        for *_, label in SIZE_BINS
    ]
    figure = Figure(figsize=(12, 3.6))
    axes, spread = figure.subplots(1, 2, width_ratios=(3, 2))
    width = 0.8 / max(len(kinds), 1)
    for index, kind in enumerate(kinds):
        heights = [counts[(kind, label)] for *_, label in SIZE_BINS]
        axes.bar(np.arange(len(SIZE_BINS)) + index * width, heights, width, label=kind)
        sizes = [r.images for r in rows if r.source == kind and r.images]
        if sizes:  # the distribution, on a log scale: one step line per kind
            spread.hist(
                sizes,
                bins=np.geomspace(1, max(r.images for r in rows if r.images) + 1, 25),
                histtype="step",
                label=kind,
            )
    axes.set_xticks(
        np.arange(len(SIZE_BINS)) + width * (len(kinds) - 1) / 2, [label for *_, label in SIZE_BINS], fontsize=8
    )
    _counts(axes, "characters")
    _counts(spread, "characters")
    spread.set_xscale("log")
    spread.set_xlabel("dataset images")
    if kinds:
        axes.legend()
        spread.legend()
    figure.tight_layout()
    sized = [r.images for r in rows if r.images]
    parts = [
        f"{kind}: {sum(1 for r in rows if r.source == kind and r.images)} datasets, median "
        f"{median([r.images for r in rows if r.source == kind and r.images]):g} images"
        for kind in kinds
        if any(r.source == kind and r.images for r in rows)
    ]
    caption = f"{len(sized)} datasets. " + "; ".join(parts) if sized else "No dataset yet."
    return Chart("dataset_sizes", "Dataset sizes", caption, _png(figure), table)


def recscore_pies(rows: list[CharacterRow]) -> Chart:
    groups = [("all", [r for r in rows if r.recscore is not None])]
    groups += [(kind, [r for r in rows if r.recscore is not None and r.source == kind]) for kind in ("anime", "web")]
    figure = Figure(figsize=(9, 3.4))
    table, parts = [], []
    for axes, (group, members) in zip(figure.subplots(1, 3), groups):
        slices = [sum(1 for r in members if low <= r.recscore < high) for low, high, _ in RECSCORE_BANDS]
        table += [{"group": group, "band": label, "characters": n} for (*_, label), n in zip(RECSCORE_BANDS, slices)]
        shown = [(n, label) for n, (*_, label) in zip(slices, RECSCORE_BANDS) if n]
        if shown:
            axes.pie([n for n, _ in shown], labels=[label for _, label in shown], autopct="%1.0f%%", startangle=90)
        else:
            axes.text(0.5, 0.5, "no models", ha="center", va="center")
            axes.set_axis_off()
        axes.set_title(f"{group} (n={len(members)})")
        high = sum(n for n, (low, *_) in zip(slices, RECSCORE_BANDS) if low >= 0.7)
        parts.append(f"{group}: {_share(high, len(members))} of {len(members)} at RecScore ≥ 0.7")
    figure.tight_layout()
    return Chart("recscore", "CCIP RecScore of the chosen step", "; ".join(parts) + ".", _png(figure), table)


def bikini_scores(rows: list[CharacterRow]) -> Chart:
    kinds = _kinds(rows)
    figure = Figure(figsize=(9, 3.4))
    table, parts = [], []
    for axes, metric in zip(figure.subplots(1, 2), ("bikini", "bikini_plus")):
        for kind in kinds:
            values = [getattr(r, metric) for r in rows if r.source == kind and getattr(r, metric) is not None]
            under = sum(1 for v in values if v < OVERFIT)
            table.append({"metric": metric, "source": kind, "models": len(values), "under_0.3": under})
            if values:
                axes.hist(values, bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{kind} (n={len(values)})")
            parts.append(f"{metric} {kind}: {_share(under, len(values))} of {len(values)} under {OVERFIT}")
        axes.axvline(OVERFIT, linestyle="--", color="black")
        axes.set_xlabel(metric)
        _counts(axes, "models")
        if kinds:
            axes.legend()
    figure.tight_layout()
    caption = "; ".join(parts) + "." if parts else "No evaluated model yet."
    return Chart("bikini", "Overfitting: bikini score and BikiniPlus", caption, _png(figure), table)


def best_steps(rows: list[CharacterRow]) -> Chart:
    chosen = [r for r in rows if r.best_step is not None]
    table = [
        {
            "slug": r.slug,
            "images": r.images,
            "best_step": r.best_step,
            "best_epoch": round(r.best_epoch, 2) if r.best_epoch else None,
        }
        for r in chosen
    ]
    figure = Figure(figsize=(11, 3.4))
    steps_axes, epochs_axes, size_axes = figure.subplots(1, 3)
    if chosen:
        steps_axes.hist([r.best_step for r in chosen], bins=20)
        epochs = [r.best_epoch for r in chosen if r.best_epoch]
        if epochs:
            epochs_axes.hist(epochs, bins=20)
        sized = [r for r in chosen if r.images]
        size_axes.scatter([r.images for r in sized], [r.best_step for r in sized], s=10)
    steps_axes.set_xlabel("best step")
    epochs_axes.set_xlabel("best epoch")
    _counts(steps_axes, "models")
    _counts(epochs_axes, "models")
    size_axes.set_xlabel("dataset images")
    size_axes.set_ylabel("best step")
    figure.tight_layout()
    caption = (
        f"{len(chosen)} models; best step median {median([r.best_step for r in chosen]):g} "
        f"(range {min(r.best_step for r in chosen)}–{max(r.best_step for r in chosen)})."
        if chosen
        else "No evaluated model yet."
    )
    return Chart("best_steps", "Where the best step falls", caption, _png(figure), table)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def throughput(rows: list[CharacterRow], stages: list[StageRow]) -> Chart:
    models = Counter(s.finished_at.date().isoformat() for s in stages if s.stage == "release" and _done(s))
    crawls = Counter(s.finished_at.date().isoformat() for s in stages if s.stage == "crawl" and _done(s))
    days = sorted(set(models) | set(crawls))
    table = [{"day": day, "models": models[day], "crawls": crawls[day]} for day in days]
    figure = Figure(figsize=(8, 3.4))
    axes = figure.subplots()
    x = np.arange(len(days))
    axes.bar(x - 0.2, [models[d] for d in days], 0.4, label="models released")
    axes.bar(x + 0.2, [crawls[d] for d in days], 0.4, label="crawls")
    axes.set_xticks(x, days, rotation=45, ha="right")
    axes.set_xlim(-1, max(len(days), 1))  # a single day keeps bars of a day's width
    _counts(axes, "per day")
    axes.legend()
    figure.tight_layout()
    released = sum(models.values())
    gpu_hours = sum(r.gpu_seconds for r in rows) / 3600
    caption = (
        f"{released} models released over {len(days)} day(s), {released / len(days):.1f} a day; "
        f"{sum(crawls.values())} crawls; {gpu_hours:.2f} GPU hours in all"
        + (f", {gpu_hours / released:.2f} per model" if released else "")
        + "."
        if days
        else "Nothing finished yet."
    )
    return Chart("throughput", "Throughput per day", caption, _png(figure), table)


def _done(stage: StageRow) -> bool:
    return stage.status == "succeeded" and stage.finished_at is not None


def stage_durations(stages: list[StageRow]) -> Chart:
    """A table only: median and p90 seconds per stage, and GPU hours."""
    by_stage: dict[str, list[float]] = defaultdict(list)
    gpu: Counter = Counter()
    for s in stages:
        if _done(s) and s.seconds is not None:
            by_stage[s.stage].append(s.seconds)
            gpu[s.stage] += s.gpu_seconds or 0.0
    order = ["crawl", "prepare", "train", "evaluate", "release"]
    table = [
        {
            "stage": stage,
            "runs": len(by_stage[stage]),
            "median_s": round(median(by_stage[stage]), 1),
            "p90_s": round(_percentile(by_stage[stage], 90), 1),
            "gpu_hours": round(gpu[stage] / 3600, 3),
        }
        for stage in sorted(by_stage, key=lambda s: order.index(s) if s in order else len(order))
    ]
    return Chart("stage_durations", "Stage durations", f"{len(table)} stages with finished executions.", None, table)


def retrains_and_failures(rows: list[CharacterRow]) -> Chart:
    """A table only: quality-gate retrains, and the latest failures' reasons."""
    reasons = Counter((r.error or "unknown").split(";")[0][:160] for r in rows if r.status == "failed")
    table = [{"reason": reason, "characters": n} for reason, n in sorted(reasons.items(), key=lambda i: (-i[1], i[0]))]
    retrained = sum(1 for r in rows if r.retrains)
    caption = (
        f"{retrained} characters retrained by the quality gate ({sum(r.retrains for r in rows)} retrains); "
        f"{sum(reasons.values())} whose latest run failed."
    )
    return Chart("failures", "Quality-gate retrains and failures", caption, None, table)


CORRELATED = (("head_ratio", "head ratio"), ("halfbody_ratio", "half-body ratio"), ("dataset_ratio", "dataset ratio"))


def spearman(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """(ρ, p) or None when there are too few characters or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < MIN_CORRELATION_N or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def correlations(rows: list[CharacterRow], max_copyrights: int = 6) -> Chart:
    by_copyright: dict[str, list[CharacterRow]] = defaultdict(list)
    for r in rows:
        if r.copyright and r.popularity:
            by_copyright[r.copyright].append(r)
    chosen = sorted(by_copyright, key=lambda c: (-len(by_copyright[c]), c))[:max_copyrights]
    table, figure = [], Figure(figsize=(11, 3.2 * max(len(chosen), 1)))
    grid = figure.subplots(max(len(chosen), 1), len(CORRELATED), squeeze=False)
    for line, copyright in zip(grid, chosen):
        for axes, (attribute, label) in zip(line, CORRELATED):
            pairs = [(r.popularity, getattr(r, attribute)) for r in by_copyright[copyright]]
            pairs = [(p, v) for p, v in pairs if v is not None]
            popularity, values = [p for p, _ in pairs], [v for _, v in pairs]
            found = spearman(popularity, values)
            row = {"copyright": copyright, "measure": attribute, "n": len(pairs), "rho": None, "p": None}
            if found is not None:
                row["rho"], row["p"] = round(found[0], 4), round(found[1], 4)
            table.append(row)
            axes.scatter(popularity, values, s=10)
            axes.set_xscale("log")
            axes.set_xlabel("popularity (posts)")
            axes.set_ylabel(label)
            title = f"{copyright}: ρ={found[0]:.2f}, p={found[1]:.3f}, n={len(pairs)}" if found else None
            axes.set_title(title or f"{copyright}: too few characters for ρ (n={len(pairs)})", fontsize=9)
    if not chosen:
        grid[0][0].text(0.5, 0.5, "no copyright with popularity yet", ha="center", va="center")
    figure.tight_layout()
    shown = [r for r in table if r["rho"] is not None]
    caption = (
        "Spearman ρ of each measure against popularity, per copyright: "
        + "; ".join(f"{r['copyright']} {r['measure']} ρ={r['rho']:.2f} (p={r['p']:.3f}, n={r['n']})" for r in shown)
        + "."
        if shown
        else f"No copyright has {MIN_CORRELATION_N} characters with a popularity yet, so no correlation is shown."
    )
    return Chart("correlations", "Dataset composition against popularity", caption, _png(figure), table)


def all_charts(rows: list[CharacterRow], stages: list[StageRow]) -> list[Chart]:
    return [
        dataset_sizes(rows),
        recscore_pies(rows),
        bikini_scores(rows),
        best_steps(rows),
        throughput(rows, stages),
        stage_durations(stages),
        retrains_and_failures(rows),
        correlations(rows),
    ]
