"""`lorafactory queue` and `lorafactory fleet`: the durable queue and running it on Ray."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from lorafactory.cli.base import (
    QUEUE_HINT,
    USER_ERRORS,
    ConfigOpt,
    DbOpt,
    PresetOpt,
    SetOpt,
    WorkspaceOpt,
    err,
    existing_workspace,
    fail,
    fleet_app,
    job_queue,
    out,
    queue_app,
    setup_logging,
)
from lorafactory.config import load_settings, to_toml, tomllib
from lorafactory.errors import ConfigError
from lorafactory.fleet.phases import STEPS
from lorafactory.fleet.queue import LEASE_S
from lorafactory.workspace import Workspace, slugify


@queue_app.command("add")
def queue_add(
    names: Optional[List[str]] = typer.Argument(None, help="Character names."),
    file: Optional[Path] = typer.Option(None, "--file", help="A text file of names, one per line (# comments)."),
    copyright_: Optional[str] = typer.Option(
        None,
        "--copyright",
        help="Queue the characters of this game or show (its tag on the site), most popular first.",
    ),
    top: int = typer.Option(50, "--top", min=1, max=1000, help="With --copyright: how many characters."),
    site: str = typer.Option("danbooru", "--site", help="With --copyright: the site whose tag data to read."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first."),
    until: str = typer.Option(
        "release", "--until", help=f"Last stage to run: {', '.join(STEPS)} (publish: to release.publish_to)."
    ),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Queue characters with the given settings (credentials stay out of the queue).

    With --copyright, the site's most-posted characters of that game or show are queued in order of
    popularity; each one's copyright, post count and site tag are recorded."""
    from lorafactory.pipeline import trigger_for

    try:
        wanted = {name: None for name in names or []}
        if file is not None:
            lines = file.read_text(encoding="utf-8").splitlines()
            wanted |= {line.strip(): None for line in lines if line.strip() and not line.lstrip().startswith("#")}
        if until not in STEPS:
            raise ConfigError(f"unknown stage {until!r}; stages are: {', '.join(STEPS)}")
        copyright_tag = None
        if copyright_:
            from lorafactory.sources.catalog import copyright_characters
            from lorafactory.sources.danbooru import character_tag

            copyright_tag = character_tag(copyright_)  # one spelling, as her site tag qualifies it
            listing = load_settings(config, preset, list(set_ or []))
            wanted |= {entry.name: entry for entry in copyright_characters(listing, copyright_, top, site)}
        if not wanted:
            raise ConfigError("no characters to queue; pass names, --file names.txt or --copyright NAME")
        queue = job_queue(workspace, db, create=True)
        added = []
        for name, entry in wanted.items():
            settings = load_settings(config, preset, [*(set_ or []), f"character.name={json.dumps(name)}"])
            layers = tomllib.loads(to_toml(settings))  # the effective settings, without credentials
            slug = slugify(name)
            if entry is not None:  # known to the site: record it, and crawl under exactly its tag
                queue.store.ensure_character(slug, name, trigger_for(settings), copyright_tag, entry.post_count)
                queue.store.remember_site_tag(site, name, entry.tag, entry.post_count)
            added.append((name, entry, queue.add(slug, name, layers, priority, until)))
    except USER_ERRORS as exc:
        fail(exc)
    for name, entry, job_id in added:
        posts = f" ({entry.post_count} posts on {site})" if entry is not None else ""
        out.print(f"queued [bold]{escape(name)}[/bold]{posts} as job {job_id}")


@queue_app.command("list")
def queue_list(
    status_: Optional[List[str]] = typer.Option(None, "--status", help="Only jobs with this status (repeatable)."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The queue, most urgent first: status, attempts, lease owner and last error of each job."""
    try:
        jobs = job_queue(workspace, db).jobs(tuple(status_ or ()))
    except USER_ERRORS as exc:
        fail(exc)
    rows = [
        {
            "id": job.id,
            "name": job.name,
            "status": job.status,
            "phase": job.phase,
            "priority": job.priority,
            "attempts": f"{job.attempts}/{job.max_attempts}",
            "until": job.until,
            "owner": job.lease_owner or "",
            "error": job.last_error or "",
        }
        for job in jobs
    ]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("id", "name", "status", "phase", "priority", "attempts", "until", "owner", "last error")
    for row in rows:
        table.add_row(*(escape(str(value)) for value in row.values()))
    out.print(table)


@queue_app.command("retry")
def queue_retry(
    refs: List[str] = typer.Argument(..., help="Job ids or character names."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Queue failed, quarantined or cancelled jobs again, with fresh attempts."""
    _change_jobs("retry", refs, workspace, db, "queued again")


@queue_app.command("cancel")
def queue_cancel(
    refs: List[str] = typer.Argument(..., help="Job ids or character names."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Cancel queued or running jobs."""
    _change_jobs("cancel", refs, workspace, db, "cancelled")


def _change_jobs(action: str, refs: List[str], workspace: Path, db: Optional[str], done: str) -> None:
    """``JobQueue.retry`` or ``.cancel`` on jobs named by id or character name."""
    try:
        count = getattr(job_queue(workspace, db), action)([ref if ref.isdigit() else slugify(ref) for ref in refs])
    except USER_ERRORS as exc:
        fail(exc)
    out.print(f"{count} job(s) {done}")


@fleet_app.command("run")
def fleet_run(
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    until_empty: bool = typer.Option(
        True, "--until-empty/--forever", help="Stop when the queue is empty, or keep waiting for jobs."
    ),
    lease: float = typer.Option(
        LEASE_S,
        "--lease",
        min=5.0,
        help="Seconds a job stays claimed without a heartbeat (a dead driver's return then).",
    ),
    crawl_ahead: Optional[int] = typer.Option(
        None,
        "--crawl-ahead",
        min=1,
        help="Datasets built ahead of the GPUs at most (default: 2 per GPU job, at least 4).",
    ),
    jobs_per_gpu: int = typer.Option(
        1,
        "--jobs-per-gpu",
        min=1,
        help="Characters trained or evaluated at once on each GPU; more keep a GPU busy while each trainer's "
        "CPU side prepares its next step (each needs its own GPU memory).",
    ),
    gpus: Optional[int] = typer.Option(
        None,
        "--gpus",
        min=0,
        help="GPUs to train on, whether the cluster has them yet or not: workers for the missing ones wait for "
        "GPU nodes (an autoscaler adds them). Default: the cluster's GPUs, and every GPU that joins later.",
    ),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Run queued characters on Ray: datasets and releases on CPUs, training and evaluation on GPUs.

    A killed worker's job returns to the queue at once; a killed driver's return when their leases run out."""
    from lorafactory.fleet.scheduler import run_fleet

    setup_logging()
    ws = Workspace(workspace)

    def report(claim, outcome) -> None:
        detail = f": {escape(outcome.error)}" if outcome.error else ""
        went = f"{outcome.status} for {outcome.next_phase}" if outcome.next_phase else outcome.status
        out.print(f"job {claim.id} [bold]{escape(claim.name)}[/bold] {claim.phase} → {went}{detail}", soft_wrap=True)

    try:
        if until_empty:  # nothing queued where no workspace is; a fleet run --forever may start before its queue
            existing_workspace(workspace, QUEUE_HINT, db)
        ws.root.mkdir(parents=True, exist_ok=True)
        result = run_fleet(
            ws.root,
            db or ws.default_db_url,
            address,
            until_empty,
            lease_s=lease,
            crawl_ahead=crawl_ahead,
            on_outcome=report,
            jobs_per_gpu=jobs_per_gpu,
            gpus=gpus,
        )
    except USER_ERRORS as exc:
        fail(exc)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(result.counts.items())) or "nothing to run"
    err.print(f"[green]queue empty[/green]: {counts}")


@fleet_app.command("status")
def fleet_status(
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: float = typer.Option(0.0, "--watch", help="Refresh every N seconds until Ctrl-C (0: print once)."),
) -> None:
    """Jobs per status, running jobs per host, done and failed today, models released and jobs done per day,
    when the queue should be empty at the recent pace, and the workspace's free disk."""
    from rich.live import Live

    try:
        queue = job_queue(workspace, db)
        summary = _with_disk(queue.summary(), workspace)
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    if watch <= 0:
        out.print(fleet_table(summary))
        return
    with Live(fleet_table(summary), console=out, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(fleet_table(_with_disk(queue.summary(), workspace)))
        except KeyboardInterrupt:
            return


LOW_DISK = 0.1  # below this share of the workspace's filesystem free, the status suggests pruning


def _with_disk(summary: dict, workspace: Path) -> dict:
    """The summary with the workspace filesystem's free and total bytes (``workspace_disk``), where this machine
    holds the workspace (with --db, the status may be read elsewhere)."""
    root = Workspace(workspace).root
    if root.is_dir():
        usage = shutil.disk_usage(root)
        summary["workspace_disk"] = {"free": usage.free, "total": usage.total}
    return summary


def fleet_table(summary: dict) -> Table:
    table = Table("", "", title="fleet", show_header=False)
    for status, count in summary["by_status"].items():
        table.add_row(f"jobs {status}", str(count))
    for label, key in (("queued for", "queued_per_phase"), ("running", "running_per_phase")):
        for phase, count in summary[key].items():
            table.add_row(f"  {label} {phase}", str(count))
    for host, count in summary["running_per_host"].items():
        table.add_row(f"running on {escape(host)}", str(count))
    table.add_row("done today", str(summary["done_today"]))
    table.add_row("failed today", str(summary["failed_today"]))
    table.add_row("models per day (last 24 h)", str(summary["models_per_day"]))
    table.add_row("jobs per day (last 24 h)", str(summary["jobs_per_day"]))
    hours = summary["pace_hours"]
    since = f"{round(hours * 60)} min" if hours < 1 else f"{hours:.1f} h"
    table.add_row("jobs per day at the pace", f"{summary['pace_per_day']} (of the last {since})")
    eta = summary["eta_hours"]
    table.add_row("queue empty in", "unknown (nothing finished in 24 h)" if eta is None else f"{eta} h")
    if disk := summary.get("workspace_disk"):
        low = disk["free"] < LOW_DISK * disk["total"]
        hint = " [yellow](low: `lorafactory prune` frees released characters' files)[/yellow]" if low else ""
        table.add_row("workspace disk free", f"{decimal(disk['free'])} of {decimal(disk['total'])}{hint}")
    return table
