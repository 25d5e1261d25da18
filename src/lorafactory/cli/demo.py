"""`lorafactory demo`: the whole pipeline offline on tiny stand-in models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.markup import escape

from lorafactory.cli.base import USER_ERRORS, ForceOpt, SetOpt, app, err, fail, job_queue, out, setup_logging
from lorafactory.cli.fleet import fleet_table
from lorafactory.cli.status import print_metrics
from lorafactory.workspace import Workspace, slugify

if TYPE_CHECKING:
    from lorafactory.fleet.queue import JobQueue


@app.command()
def demo(
    workspace: Path = typer.Option(
        Path("demo-workspace"), "--workspace", "-w", help="Where the demo's character folder goes."
    ),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Test-kit cache (default ~/.cache/lorafactory/testkit)."
    ),
    force: Optional[str] = ForceOpt,
    fleet: bool = typer.Option(
        False, "--fleet", help="Three synthetic characters through a local Ray fleet, then `fleet status`."
    ),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Run the whole pipeline offline on tiny stand-in models and a synthetic character."""
    from lorafactory.config import load_settings
    from lorafactory.demo import DEMO_CHARACTER, default_cache, run_demo, run_fleet_demo
    from lorafactory.state import Store

    setup_logging()
    err.print(
        "[bold yellow]Demo:[/bold yellow] tiny random-initialised stand-in models and synthetic characters, on CPU. "
        "It exercises every real code path, but [bold]neither the images nor the metrics mean anything[/bold]."
    )
    try:
        load_settings(preset="tiny-demo", overrides=set_ or [])  # a bad --set is refused before any work
        with err.status("building the test kit (tiny SD pipeline, stand-in model hub, synthetic images)…"):
            from lorafactory.demo import build_kit

            build_kit(cache or default_cache())
        if fleet:
            run_fleet_demo(workspace, cache or default_cache(), set_ or [])
            queue = job_queue(workspace, None)
            for line in fleet_outcomes(queue, Workspace(workspace)):
                out.print(line)
            out.print(fleet_table(queue.summary()))
            out.print(f"Report: [bold]{_demo_report(workspace)}[/bold]")
            return
        run_demo(workspace, cache or default_cache(), set_ or [], force)
        ws = Workspace(workspace)
        summary = Store(ws.default_db_url).character_summary(slugify(DEMO_CHARACTER))
    except USER_ERRORS as exc:
        fail(exc)
    release_dir = ws.character(slugify(DEMO_CHARACTER)).artifact("release")
    print_metrics(summary["checkpoints"])
    out.print(f"Release: [bold]{release_dir}[/bold]")
    for path in sorted(release_dir.rglob("*")):
        if path.is_file() and path.parent.name != "previews":
            out.print(f"  {path.relative_to(release_dir)}")
    out.print(f"Report: [bold]{_demo_report(workspace)}[/bold]")
    out.print("[yellow]Reminder: stand-in models — the release shows the pipeline works, not a usable LoRA.[/yellow]")


def fleet_outcomes(queue: JobQueue, workspace: Workspace) -> list[str]:
    """One line per character: how its latest job ended (a rerun of the fleet demo queues each character again)."""
    latest = {job.slug: job for job in sorted(queue.jobs(), key=lambda job: job.id)}
    return [
        f"{escape(job.name)}: {job.status} — "
        f"{workspace.character(job.slug).artifact('release') if job.status == 'done' else job.last_error}"
        for job in latest.values()
    ]


def _demo_report(workspace: Path) -> Path:
    """The report of the demo's runs (`lorafactory report` on its workspace)."""
    from lorafactory.report.page import write_report
    from lorafactory.state import Store

    ws = Workspace(workspace)
    return write_report(Store(ws.default_db_url), ws, ws.root / "report")
