"""The pipeline's commands: run, one per stage, and publish."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer

from lorafactory.cli.base import (
    USER_ERRORS,
    ConfigOpt,
    DbOpt,
    ForceOpt,
    PresetOpt,
    SetOpt,
    WorkspaceOpt,
    app,
    err,
    fail,
    out,
    settings_for,
    setup_logging,
)
from lorafactory.errors import ConfigError
from lorafactory.progress import RichProgress
from lorafactory.workspace import STAGES, Workspace, slugify


def _run(
    name: str,
    until: str,
    workspace: Path,
    db: Optional[str],
    config,
    preset,
    overrides,
    force,
    source_overrides=(),
    wait: bool = False,
) -> None:
    from lorafactory.pipeline import run_pipeline
    from lorafactory.state import Store

    setup_logging()
    try:
        settings = settings_for(workspace, name, config, preset, [*source_overrides, *(overrides or [])])
        ws = Workspace(workspace)
        ws.root.mkdir(parents=True, exist_ok=True)
        store = Store(db or ws.default_db_url)
        err.print(
            f"[bold]{settings.character.name}[/bold] → {ws.character(slugify(name)).path}  (preset {settings.preset})"
        )
        outcome = run_pipeline(ws, store, settings, RichProgress(err), until=until, force=force, wait=wait)
    except USER_ERRORS as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; run the same command again to resume where it stopped")
        raise typer.Exit(130)
    final = ws.character(outcome.slug).artifact(until)
    err.print(f"[green]finished[/green] {until}: {final}")


def _source_overrides(from_dir: Optional[Path], sites: Optional[List[str]]) -> list[str]:
    from lorafactory.config import SITE_NAMES

    if from_dir is not None and sites:
        fail(ConfigError("pass either --from-dir or --site, not both"))
    if from_dir is not None:
        return ['crawl.source="local"', f"crawl.from_dir={json.dumps(str(from_dir.expanduser().resolve()))}"]
    for site in sites or []:
        if site not in SITE_NAMES:
            fail(ConfigError(f"unknown site {site!r}; supported sites: {', '.join(SITE_NAMES)}"))
    return ['crawl.source="sites"', f"crawl.sites={json.dumps(list(dict.fromkeys(sites)))}"] if sites else []


def _stage_command(stage: str, doc: str):
    def command(
        name: str = typer.Argument(..., help='Character name, e.g. "Surtr (Arknights)".'),
        from_dir: Optional[Path] = typer.Option(
            None, "--from-dir", help="Use a local folder of images (+ optional .txt tags)."
        ),
        site: Optional[List[str]] = typer.Option(
            None,
            "--site",
            help=(
                "Image site to crawl, repeatable: danbooru, safebooru, gelbooru, "
                "rule34, yandere, konachan, zerochan, anime_pictures, sankaku, pixiv."
            ),
        ),
        limit: Optional[int] = typer.Option(
            None, "--limit", min=1, help="Maximum number of images to crawl (crawl.limit)."
        ),
        workspace: Path = WorkspaceOpt,
        db: Optional[str] = DbOpt,
        config: Optional[Path] = ConfigOpt,
        preset: Optional[str] = PresetOpt,
        set_: Optional[List[str]] = SetOpt,
        force: Optional[str] = ForceOpt,
        wait: bool = typer.Option(
            False, "--wait", help="When another run holds this character, wait for it instead of stopping."
        ),
    ) -> None:
        sources = _source_overrides(from_dir, site) + ([f"crawl.limit={limit}"] if limit else [])
        _run(name, stage, workspace, db, config, preset, set_, force, sources, wait)

    command.__doc__ = doc
    return command


@app.command()
def publish(
    name: str = typer.Argument(..., help="Character whose release to publish."),
    to: Optional[List[str]] = typer.Option(
        None, "--to", help="huggingface and/or civitai, repeatable (release.publish_to)."
    ),
    repo: Optional[str] = typer.Option(
        None, "--repo", help="Hub repository 'name' or 'owner/name' (release.hf_repo; default: the slug)."
    ),
    private: Optional[bool] = typer.Option(
        None, "--private/--public", help="Visibility of a new Hub repository (release.hf_private)."
    ),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (release.hf_endpoint)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded; contact nothing."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Upload the release to the Hugging Face Hub (HF_TOKEN) and/or Civitai (CIVITAI_API_KEY); a rerun resumes."""
    from lorafactory.pipeline import trigger_for
    from lorafactory.release.publish import publish as publish_release
    from lorafactory.state import Store
    from lorafactory.state.lock import acquire

    setup_logging()
    try:
        settings = settings_for(
            workspace, name, config, None, [*(set_ or []), *([f"release.publish_to={json.dumps(to)}"] if to else [])]
        )
        r, ws = settings.release, Workspace(workspace)
        store = None if dry_run else Store(db or ws.default_db_url)
        with nullcontext() if store is None else acquire(store, slugify(name)):  # no run or publish meanwhile
            reports = publish_release(
                ws.character(slugify(name)),
                settings,
                trigger_for(settings),
                list(r.publish_to),
                repo=repo or r.hf_repo or slugify(name),
                private=r.hf_private if private is None else private,
                endpoint=endpoint or r.hf_endpoint,
                progress=RichProgress(err),
                dry_run=dry_run,
                store=store,
            )
    except USER_ERRORS as exc:
        fail(exc)
    for report in reports:
        if report.dry_run:
            err.print(f"[bold]dry run[/bold]: {report.outcome}")
            for line in report.listing:
                out.print(f"  {line}", highlight=False)
        else:
            err.print(f"[green]published[/green] {report.outcome}")


app.command(name="run")(_stage_command("release", "Run the whole pipeline: crawl, prepare, train, evaluate, release."))
for _stage in STAGES:
    app.command(name=_stage)(
        _stage_command(_stage, f"Run the pipeline up to the {_stage} stage (earlier stages only if out of date).")
    )
