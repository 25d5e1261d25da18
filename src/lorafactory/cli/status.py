"""`lorafactory status`: characters, runs, stages, dataset counts and checkpoint metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from lorafactory.cli.base import USER_ERRORS, DbOpt, WorkspaceOpt, app, existing_workspace, fail, out
from lorafactory.errors import LorafactoryError
from lorafactory.workspace import STAGES, slugify


@app.command()
def status(
    name: Optional[str] = typer.Argument(None, help="Character name or slug; all characters when omitted."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(
        False, "--json", help='Machine-readable: {"characters": [...], "shows": [...]} (shows only without NAME).'
    ),
) -> None:
    """Show characters, their latest run, stages, dataset counts and checkpoint metrics; and, without
    NAME, the anime shows extracted into the workspace."""
    from lorafactory.show.layout import shows
    from lorafactory.state import Store

    try:
        ws = existing_workspace(workspace, "run `lorafactory run NAME` or pass --workspace")  # its artifacts too
        store = Store(db or ws.default_db_url)
        slugs = [slugify(name)] if name else ws.characters()
        report = []
        for slug in slugs:
            summary = store.character_summary(slug)
            if summary is None:
                raise LorafactoryError(f"no character {name!r} in {ws.root}; `lorafactory status` lists them")
            char = ws.character(slug)
            manifests = {stage: char.manifest(stage) for stage in STAGES}
            summary["artifacts"] = {stage: (m.counts if m else None) for stage, m in manifests.items()}
            summary["pruned"] = {stage: sum(m.pruned.values()) for stage, m in manifests.items() if m and m.pruned}
            dataset = manifests["prepare"]
            if dataset is not None:
                summary["dataset"] = {
                    k: dataset.details.get(k) for k in ("filters", "ratios", "core_tags", "per_site")
                }
            report.append(summary)
        show_report = [] if name else [_show_summary(show.manifest()) for show in shows(ws)]
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        out.print_json(json.dumps({"characters": report, "shows": show_report}))
        return
    for summary in report:
        _print_summary(summary)
    for show in show_report:
        _print_show_status(show)


def _artifact_state(done: bool, pruned: int | None) -> str:
    if not done:
        return "—"
    return f"done, {decimal(pruned)} pruned" if pruned else "done"


def _show_summary(manifest: dict) -> dict:
    """A show's line in ``status``: its episodes, crop and cluster counts, and its named characters."""
    keys = ("name", "slug", "crops", "dataset", "images", "reason")
    return {
        "show": manifest["show"],
        "episodes": manifest["episodes"],
        "counts": manifest["counts"],
        "characters": [{k: c[k] for k in keys if k in c} for c in manifest["characters"]],
    }


def _print_show_status(show: dict) -> None:
    counts = show["counts"]
    named = ", ".join(escape(c["name"]) for c in show["characters"] if c["dataset"]) or "none yet"
    out.print(
        f"[bold]{escape(show['show'])}[/bold] (anime): {len(show['episodes'])} episodes, "
        f"{counts.get('usable', 0)} crops in {counts.get('clusters', 0)} clusters; datasets: {named}"
    )


def _print_summary(summary: dict) -> None:
    run_info = summary["latest_run"] or {}
    out.print(
        (
            f"[bold]{summary['name']}[/bold] ({summary['slug']}), trigger "
            f"[cyan]{summary['trigger']}[/cyan], runs: {summary['runs']}"
        )
    )
    if run_info:
        out.print(
            f"  latest run #{run_info['id']}: {run_info['status']}"
            + (f" — {run_info['error']}" if run_info["error"] else "")
        )
    table = Table("stage", "artifact", "last status", "counts")
    last = {s["stage"]: s for s in run_info.get("stages", [])}
    for stage in STAGES:
        counts = summary["artifacts"][stage]
        record = last.get(stage)
        table.add_row(
            stage,
            _artifact_state(counts is not None, summary["pruned"].get(stage)),
            (record["status"] + (f": {record['error']}" if record and record["error"] else "")) if record else "—",
            ", ".join(f"{k} {v}" for k, v in (counts or {}).items()),
        )
    out.print(table)
    if summary.get("dataset"):
        _print_dataset(summary["dataset"])
    if summary["checkpoints"]:
        print_metrics(summary["checkpoints"])
    for item in summary.get("publications", [])[:5]:
        out.print(
            f"  published to {item['target']} (step {item['step']}, {item['published_at'][:16]}): {item['url']}",
            highlight=False,
        )


def _print_dataset(dataset: dict) -> None:
    table = Table("filter", "in", "out", "removed", title="dataset cleaning")
    for step in dataset["filters"] or []:
        table.add_row(step["step"], str(step["in"]), str(step["out"]), str(step["in"] - step["out"]))
    out.print(table)
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in (dataset["ratios"] or {}).items())
    out.print(
        (
            f"  ratios: {ratios}; per site: {dataset['per_site']}; core "
            f"tags: {', '.join(dataset['core_tags'] or []) or 'none'}"
        )
    )


# the columns `status` shows (all of them are in the evaluate stage's metrics.csv), with short headers
_STATUS_METRICS = {
    "ccip_recscore": "RecScore",
    "bikini_plus": "BikiniPlus",
    "ai_corrupt": "AI-corrupt",
    "clip_alignment": "CLIP",
    "validation_loss": "val loss",
}


def print_metrics(checkpoints: list[dict]) -> None:
    present = {n for c in checkpoints for n in c["metrics"]}
    names = [n for n in _STATUS_METRICS if n in present]
    table = Table(
        "step", *(_STATUS_METRICS[n] for n in names), "kept", title="checkpoint metrics (all: evaluate/metrics.csv)"
    )
    for checkpoint in checkpoints:
        values = [
            "missing" if checkpoint["metrics"].get(n) is None else f"{checkpoint['metrics'][n]:.3f}" for n in names
        ]
        rank = checkpoint["kept_rank"]
        table.add_row(str(checkpoint["step"]), *values, "best" if rank == 1 else f"#{rank}" if rank else "")
    out.print(table)
