"""`lorafactory prune`: free the disk of released characters."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from lorafactory.cli.base import USER_ERRORS, DbOpt, WorkspaceOpt, app, err, existing_workspace, fail, out
from lorafactory.errors import CharacterBusy, LorafactoryError
from lorafactory.workspace import slugify


@app.command()
def prune(
    names: Optional[List[str]] = typer.Argument(None, help="Characters, by name or slug; every one when omitted."),
    datasets: bool = typer.Option(
        False, "--datasets", help="Also the downloaded and dataset images (a retrain fetches and prepares them again)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be freed; remove nothing."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Free the disk of finished characters: the checkpoints, resume state and evaluation images of every step
    the release did not keep (or the quality gate, for a run it stopped); with --datasets, also the downloaded
    and dataset images. A character whose latest run has neither made its release nor failed the gate, or that
    is being run, is left alone.

    What stays: the release, the kept steps' checkpoints and images, every manifest, metric, log and TensorBoard
    file. Each artifact stays up to date: a rerun with the same settings does nothing, and a run that must redo a
    stage reading pruned files makes them again first (a new evaluation retrains; with --datasets a new training
    downloads and prepares again). `release.prune` does this after every release and final gate failure (a
    factory's setting)."""
    from lorafactory.prune import plan_pruning
    from lorafactory.prune import prune as remove
    from lorafactory.state import Store
    from lorafactory.state.lock import acquire

    level = "datasets" if datasets else "models"
    try:
        ws = existing_workspace(workspace, "pass the --workspace that holds the characters")
        slugs = [slugify(name) for name in names] if names else ws.characters()
        for name, slug in zip(names or [], slugs):
            if not ws.character(slug).config_path.is_file():
                raise LorafactoryError(f"no character {name!r} in {ws.root}; `lorafactory status` lists them")
        store = Store(db or ws.default_db_url)
        rows = []
        for slug in slugs:
            char = ws.character(slug)
            try:
                with acquire(store, slug):  # no run meanwhile
                    pruning = plan_pruning(char, level)
                    if not dry_run:
                        remove(char, pruning)
            except CharacterBusy:
                rows.append((slug, None, "being run: left alone"))
                continue
            rows.append((slug, pruning, pruning.skipped or ("" if pruning.files else "nothing left to prune")))
    except USER_ERRORS as exc:
        fail(exc)
    _print(rows, dry_run)


def _print(rows: list, dry_run: bool) -> None:
    freed_title = "would free" if dry_run else "freed"
    table = Table(title=f"prune{' (dry run: nothing removed)' if dry_run else ''}", title_justify="left")
    for column in ("character", "files", freed_title, "from", "note"):
        table.add_column(column, justify="right" if column in ("files", freed_title) else "left")
    total = 0
    for slug, pruning, note in rows:
        files, freed = (pruning.removed, pruning.freed) if pruning else (0, 0)
        total += freed
        stages = ", ".join(pruning.files) if pruning else ""
        table.add_row(escape(slug), str(files), decimal(freed), stages, note)
    out.print(table)
    err.print(f"{freed_title}: {decimal(total)} in all")
