"""`lorafactory report`: the factory's analytics, from the state store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lorafactory.cli.base import USER_ERRORS, DbOpt, WorkspaceOpt, app, existing_workspace, fail
from lorafactory.errors import ConfigError


@app.command()
def report(
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the report (default <workspace>/report)."),
    since: Optional[str] = typer.Option(
        None, "--since", help="Only characters whose latest run began on or after this date (YYYY-MM-DD)."
    ),
    copyright_: Optional[str] = typer.Option(None, "--copyright", help="Only this game's or show's characters."),
    source: Optional[str] = typer.Option(None, "--source", help="Only characters from web, anime or local images."),
) -> None:
    """The factory's analytics: dataset sizes, RecScore, overfitting, best steps, throughput, correlations.

    Writes report.html (self-contained), the figures as PNG and the tables as CSV, from the state
    store and the workspace only; prints the page's path."""
    from datetime import datetime, timezone

    from lorafactory.report.page import write_report
    from lorafactory.sources.danbooru import character_tag
    from lorafactory.state import Store

    try:
        ws = existing_workspace(workspace, "pass --workspace or --db", db)
        if source is not None and source not in ("web", "anime", "local"):
            raise ConfigError(f"unknown --source {source!r}; use web, anime or local")
        try:
            start = datetime.fromisoformat(since).replace(tzinfo=timezone.utc) if since else None
        except ValueError:
            raise ConfigError(f"--since {since!r} is not a date; use YYYY-MM-DD") from None
        store = Store(db or ws.default_db_url)
        wanted = character_tag(copyright_) if copyright_ else None  # stored as site tags spell it: blue_archive
        path = write_report(store, ws, out_dir or ws.root / "report", start, wanted, source)
    except USER_ERRORS as exc:
        fail(exc)
    typer.echo(str(path))  # the bare path, never wrapped, for scripts
