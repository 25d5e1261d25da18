"""`lorafactory anime`: named characters' datasets from a season of episodes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lorafactory.cli.base import (
    USER_ERRORS,
    ConfigOpt,
    DbOpt,
    PresetOpt,
    SetOpt,
    WorkspaceOpt,
    app,
    err,
    fail,
    job_queue,
    out,
    over_saved,
    setup_logging,
)
from lorafactory.config import read_toml
from lorafactory.errors import ConfigError, InputError
from lorafactory.fleet.phases import STEPS
from lorafactory.hubfetch import reporting_downloads
from lorafactory.progress import RichProgress
from lorafactory.workspace import Workspace


@app.command()
def anime(
    show: str = typer.Argument(..., help='The show\'s name, e.g. "Frieren".'),
    episodes: Optional[Path] = typer.Option(
        None, "--episodes", help="Folder of the show's video files; new episodes are extracted, finished ones kept."
    ),
    copyright_: Optional[str] = typer.Option(
        None, "--copyright", help="The show's copyright tag on the site: its characters are the candidate names."
    ),
    cast: Optional[List[str]] = typer.Option(
        None, "--cast", help="A candidate name (repeatable), instead of --copyright."
    ),
    site: str = typer.Option("danbooru", "--site", help="Site for the character list and the reference images."),
    list_: bool = typer.Option(
        False, "--list", help="Show the clusters (size, name, confidence, contact sheet) and stop."
    ),
    queue: bool = typer.Option(False, "--queue", help="Queue every character with a dataset for the fleet."),
    until: str = typer.Option("release", "--until", help=f"With --queue: the last stage, {', '.join(STEPS)}."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Named characters' datasets from a season of anime episodes.

    Frames are sampled per shot, people cropped, openings and endings dropped, crops clustered by
    character and clusters named against reference images of the candidates. Correct a name in
    <workspace>/_shows/<show>/names.toml and run again without --episodes; each named character then
    runs like any other: `lorafactory run NAME`, or the fleet with --queue."""
    from lorafactory.show.build import build_show
    from lorafactory.show.layout import show_dir
    from lorafactory.state import Store

    setup_logging()
    ws = Workspace(workspace)
    where = show_dir(ws, show)
    if list_:
        manifest = where.manifest()
        if manifest is None:
            fail(InputError(f"no clusters for {show!r} yet; run `lorafactory anime {show!r} --episodes DIR` first"))
        _print_show(manifest, where.names_path)
        return
    try:
        if until not in STEPS:
            raise ConfigError(f"unknown stage {until!r}; stages are: {', '.join(STEPS)}")
        settings = over_saved(where.config_path, config, preset, set_ or [])
        ws.root.mkdir(parents=True, exist_ok=True)
        store = Store(db or ws.default_db_url)
        with reporting_downloads():  # the first show fetches the vision models
            result = build_show(
                ws, store, settings, show, RichProgress(err), episodes, copyright_, list(cast or []), site
            )
        queued = []
        if queue:
            jobs = job_queue(workspace, db)
            for character in result.manifest["characters"]:
                if character["dataset"]:
                    layers = read_toml(ws.character(character["slug"]).config_path)
                    queued.append(
                        (character["name"], jobs.add(character["slug"], character["name"], layers, 0, until))
                    )
    except USER_ERRORS as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; run the same command again to resume at the unfinished episode")
        raise typer.Exit(130)
    if result.extraction is not None:
        done, resumed = result.extraction.done, result.extraction.resumed
        out.print(f"extracted {len(done)} episode(s); {len(resumed)} already extracted were kept")
    _print_show(result.manifest, where.names_path)
    for name, job_id in queued:
        out.print(f"queued [bold]{escape(name)}[/bold] as job {job_id}")


def _print_show(manifest: dict, names_path: Path) -> None:
    counts = manifest["counts"]
    filters = ", ".join(
        f"{key.replace('_', ' ')} {counts[key]}"
        for key in (
            "frames",
            "near_duplicate",
            "persons",
            "too_small",
            "not_one_head",
            "monochrome",
            "low_detail",
            "recurring",
            "usable",
            "noise",
        )
        if key in counts
    )
    out.print(
        f"[bold]{escape(manifest['show'])}[/bold]: {len(manifest['episodes'])} episodes, "
        f"clusters {manifest['clustering']}"
    )
    out.print(f"  {filters}")
    for episode, reason in manifest.get("skipped", {}).items():
        out.print(f"  [yellow]skipped {escape(episode)}[/yellow]: {escape(reason)}")
    table = Table("cluster", "crops", "episodes", "name", "score", "runner-up", "contact sheet")
    for c in manifest["clusters"]:
        name = c["name"] or f"[dim]unknown_{c['cluster']}[/dim]"
        if c["named_by"] == "names":
            name += " [dim](names.toml)[/dim]"
        table.add_row(
            str(c["cluster"]),
            str(c["crops"]),
            str(c["episodes"]),
            name,
            f"{c['score']:.2f}",
            f"{c['runner_up']:.2f}",
            c["sheet"],
        )
    out.print(table)
    for character in manifest["characters"]:
        if character["dataset"]:
            out.print(
                f"  [green]{escape(character['name'])}[/green]: {character['images']} crops → {character['dataset']}"
            )
        else:
            out.print(f"  [yellow]{escape(character['name'])}[/yellow]: no dataset ({character['reason']})")
    out.print(f'Correct a name in {names_path} (\\[clusters] 3 = "Name", or false to drop), then run again.')
    if any(c["dataset"] for c in manifest["characters"]):
        out.print("Train one: lorafactory run NAME; all of them: run again with --queue, then lorafactory fleet run.")
