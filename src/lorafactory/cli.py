"""The ``lorafactory`` command line: thin typer commands over the pipeline."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from lorafactory.config import PRESETS, load_settings, read_toml, to_toml, tomllib
from lorafactory.errors import ConfigError, InputError, LorafactoryError, from_os_error
from lorafactory.fleet.phases import STEPS
from lorafactory.fleet.queue import LEASE_S
from lorafactory.progress import RichProgress
from lorafactory.redact import RedactingFilter, redact
from lorafactory.workspace import STAGES, Workspace, slugify

app = typer.Typer(
    help="Turn an anime character into a trained, evaluated, ready-to-publish LoRA.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
queue_app = typer.Typer(help="The fleet's durable queue of characters (in the state store).", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
fleet_app = typer.Typer(help="Run the queue on Ray: one machine or a cluster.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")
err = Console(stderr=True)
out = Console()

WorkspaceOpt = typer.Option(
    Path(os.environ.get("LORAFACTORY_WORKSPACE", "workspace")),
    "--workspace",
    "-w",
    help="Folder for all characters and the state db.",
)
DbOpt = typer.Option(
    None,
    "--db",
    envvar="LORAFACTORY_DB",
    help="State database URL (default: SQLite in the workspace; postgresql+psycopg://… for fleets).",
)
ConfigOpt = typer.Option(None, "--config", "-c", help="TOML settings file.")
PresetOpt = typer.Option(None, "--preset", help=f"Named preset: {', '.join(PRESETS)}.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting, e.g. --set train.max_steps=800 (repeatable).")
ForceOpt = typer.Option(None, "--force", help=f"Rerun from this stage onward: {', '.join(STAGES)}.")


USER_ERRORS = (LorafactoryError, OSError, SQLAlchemyError)  # shown as one line, never as a traceback


def _fail(exc: Exception) -> None:
    if isinstance(exc, OSError):  # a file in the way, a read-only or full disk
        exc = from_os_error(exc)
    elif isinstance(exc, SQLAlchemyError):
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        exc = LorafactoryError(f"state database error: {cause}; check --db and that the database is reachable")
    err.print(f"[bold red]error:[/bold red] {escape(redact(str(exc)))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _setup_logging() -> None:
    # Read by diffusers, transformers and huggingface_hub when they are first imported (lazily, later).
    for key in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = RichHandler(console=err, show_path=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("lorafactory").setLevel(logging.INFO)


def _settings(
    workspace: Path, name: Optional[str], config: Optional[Path], preset: Optional[str], overrides: List[str]
):
    """Saved character settings (if any) < --config < --set; the name always comes from the command."""
    saved = Workspace(workspace).character(slugify(name)).config_path if name else None
    settings = _over_saved(saved, config, preset, overrides)
    if name:
        settings.character.name = name
    return settings


def _over_saved(saved: Optional[Path], config: Optional[Path], preset: Optional[str], overrides: List[str]):
    """The settings saved at ``saved`` (when that file exists) < --config < --set."""
    base = read_toml(saved) if saved is not None and saved.is_file() else None
    return load_settings(config, preset, list(overrides or []), base=base)


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

    _setup_logging()
    try:
        settings = _settings(workspace, name, config, preset, [*source_overrides, *(overrides or [])])
        ws = Workspace(workspace)
        ws.root.mkdir(parents=True, exist_ok=True)
        store = Store(db or ws.default_db_url)
        err.print(
            f"[bold]{settings.character.name}[/bold] → {ws.character(slugify(name)).path}  (preset {settings.preset})"
        )
        outcome = run_pipeline(ws, store, settings, RichProgress(err), until=until, force=force, wait=wait)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; run the same command again to resume where it stopped")
        raise typer.Exit(130)
    final = ws.character(outcome.slug).artifact(until)
    err.print(f"[green]finished[/green] {until}: {final}")


def _source_overrides(from_dir: Optional[Path], sites: Optional[List[str]]) -> list[str]:
    from lorafactory.config import SITE_NAMES

    if from_dir is not None and sites:
        _fail(ConfigError("pass either --from-dir or --site, not both"))
    if from_dir is not None:
        return ['crawl.source="local"', f"crawl.from_dir={json.dumps(str(from_dir.expanduser().resolve()))}"]
    for site in sites or []:
        if site not in SITE_NAMES:
            _fail(ConfigError(f"unknown site {site!r}; supported sites: {', '.join(SITE_NAMES)}"))
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

    _setup_logging()
    try:
        settings = _settings(
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
        _fail(exc)
    for report in reports:
        if hasattr(report, "unchanged"):
            if report.dry_run:
                err.print(f"[bold]dry run[/bold]: would upload {len(report.uploaded)} files to {report.target}")
                for path in report.uploaded:
                    out.print(f"  {path}", highlight=False)
            else:
                err.print(
                    (
                        f"[green]published[/green] {report.target}: {len(report.uploaded)} "
                        f"files uploaded, {len(report.unchanged)} already there"
                    )
                )
        elif report.dry_run:
            err.print("[bold]dry run[/bold]: Civitai steps:")
            for step in report.done:
                out.print(f"  {step}", highlight=False)
        else:
            err.print(
                (
                    f"[green]published[/green] {report.model_url}: {len(report.done)} "
                    f"steps done, {len(report.skipped)} already done"
                )
            )


app.command(name="run")(_stage_command("release", "Run the whole pipeline: crawl, prepare, train, evaluate, release."))
for _stage in STAGES:
    app.command(name=_stage)(
        _stage_command(_stage, f"Run the pipeline up to the {_stage} stage (earlier stages only if out of date).")
    )


@app.command()
def status(
    name: Optional[str] = typer.Argument(None, help="Character name or slug; all characters when omitted."),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show characters, their latest run, stages, dataset counts and checkpoint metrics."""
    from lorafactory.state import Store

    try:
        ws = Workspace(workspace)
        if not ws.root.is_dir():
            raise LorafactoryError(
                f"workspace {ws.root} does not exist; run `lorafactory run NAME` or pass --workspace"
            )
        store = Store(db or ws.default_db_url)
        slugs = [slugify(name)] if name else ws.characters()
        report = []
        for slug in slugs:
            summary = store.character_summary(slug)
            if summary is None:
                raise LorafactoryError(f"no character {name!r} in {ws.root}; `lorafactory status` lists them")
            char = ws.character(slug)
            summary["artifacts"] = {stage: (m.counts if (m := char.manifest(stage)) else None) for stage in STAGES}
            dataset = char.manifest("prepare")
            if dataset is not None:
                summary["dataset"] = {
                    k: dataset.details.get(k) for k in ("filters", "ratios", "core_tags", "per_site")
                }
            report.append(summary)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report))
        return
    for summary in report:
        _print_summary(summary)
    if not name:
        from lorafactory.show.layout import shows

        for show in shows(ws):
            _print_show_status(show.manifest())


def _print_show_status(manifest: dict) -> None:
    counts, characters = manifest["counts"], manifest["characters"]
    named = ", ".join(escape(c["name"]) for c in characters if c["dataset"]) or "none yet"
    out.print(
        f"[bold]{escape(manifest['show'])}[/bold] (anime): {len(manifest['episodes'])} episodes, "
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
            "done" if counts is not None else "—",
            (record["status"] + (f": {record['error']}" if record and record["error"] else "")) if record else "—",
            ", ".join(f"{k} {v}" for k, v in (counts or {}).items()),
        )
    out.print(table)
    if summary.get("dataset"):
        _print_dataset(summary["dataset"])
    if summary["checkpoints"]:
        _print_metrics(summary["checkpoints"])
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


def _print_metrics(checkpoints: list[dict]) -> None:
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


def _queue(workspace: Path, db: Optional[str]):
    from lorafactory.fleet.queue import JobQueue
    from lorafactory.state import Store

    ws = Workspace(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    return JobQueue(Store(db or ws.default_db_url))


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
        if copyright_:
            from lorafactory.sources.catalog import copyright_characters
            from lorafactory.sources.danbooru import character_tag

            listing = load_settings(config, preset, list(set_ or []))
            wanted |= {entry.name: entry for entry in copyright_characters(listing, copyright_, top, site)}
        if not wanted:
            raise ConfigError("no characters to queue; pass names, --file names.txt or --copyright NAME")
        queue = _queue(workspace, db)
        added = []
        for name, entry in wanted.items():
            settings = load_settings(config, preset, [*(set_ or []), f"character.name={json.dumps(name)}"])
            layers = tomllib.loads(to_toml(settings))  # the effective settings, without credentials
            slug = slugify(name)
            if entry is not None:  # known to the site: record it, and crawl under exactly its tag
                copyright_tag = character_tag(copyright_ or "")  # one spelling, as her site tag qualifies it
                queue.store.ensure_character(slug, name, trigger_for(settings), copyright_tag, entry.post_count)
                queue.store.remember_site_tag(site, name, entry.tag, entry.post_count)
            added.append((name, entry, queue.add(slug, name, layers, priority, until)))
    except USER_ERRORS as exc:
        _fail(exc)
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
        jobs = _queue(workspace, db).jobs(tuple(status_ or ()))
    except USER_ERRORS as exc:
        _fail(exc)
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
        count = getattr(_queue(workspace, db), action)([ref if ref.isdigit() else slugify(ref) for ref in refs])
    except USER_ERRORS as exc:
        _fail(exc)
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
        None, "--crawl-ahead", min=1, help="Datasets built ahead of the GPUs at most (default: 2 per GPU, at least 4)."
    ),
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Run queued characters on Ray: datasets and releases on CPUs, training and evaluation on GPUs.

    A killed worker's job returns to the queue at once; a killed driver's return when their leases run out."""
    from lorafactory.fleet.scheduler import run_fleet

    _setup_logging()
    ws = Workspace(workspace)

    def report(claim, outcome) -> None:
        detail = f": {escape(outcome.error)}" if outcome.error else ""
        went = f"{outcome.status} for {outcome.next_phase}" if outcome.next_phase else outcome.status
        out.print(f"job {claim.id} [bold]{escape(claim.name)}[/bold] {claim.phase} → {went}{detail}", soft_wrap=True)

    try:
        ws.root.mkdir(parents=True, exist_ok=True)
        result = run_fleet(
            ws.root,
            db or ws.default_db_url,
            address,
            until_empty,
            lease_s=lease,
            crawl_ahead=crawl_ahead,
            on_outcome=report,
        )
    except USER_ERRORS as exc:
        _fail(exc)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(result.counts.items())) or "nothing to run"
    err.print(f"[green]queue empty[/green]: {counts}")


@fleet_app.command("status")
def fleet_status(
    workspace: Path = WorkspaceOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    watch: float = typer.Option(0.0, "--watch", help="Refresh every N seconds until Ctrl-C (0: print once)."),
) -> None:
    """Jobs per status, running jobs per host, done and failed today, models per day and an ETA."""
    from rich.live import Live

    try:
        queue = _queue(workspace, db)
        summary = queue.summary()
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    if watch <= 0:
        out.print(_fleet_table(summary))
        return
    with Live(_fleet_table(summary), console=out, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(_fleet_table(queue.summary()))
        except KeyboardInterrupt:
            return


def _fleet_table(summary: dict) -> Table:
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
    eta = summary["eta_hours"]
    table.add_row("queue empty in", "unknown (nothing finished in 24 h)" if eta is None else f"{eta} h")
    return table


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

    _setup_logging()
    ws = Workspace(workspace)
    where = show_dir(ws, show)
    if list_:
        manifest = where.manifest()
        if manifest is None:
            _fail(InputError(f"no clusters for {show!r} yet; run `lorafactory anime {show!r} --episodes DIR` first"))
        _print_show(manifest, where.names_path)
        return
    try:
        if until not in STEPS:
            raise ConfigError(f"unknown stage {until!r}; stages are: {', '.join(STEPS)}")
        settings = _over_saved(where.config_path, config, preset, set_ or [])
        ws.root.mkdir(parents=True, exist_ok=True)
        store = Store(db or ws.default_db_url)
        result = build_show(ws, store, settings, show, RichProgress(err), episodes, copyright_, list(cast or []), site)
        queued = []
        if queue:
            jobs = _queue(workspace, db)
            for character in result.manifest["characters"]:
                if character["dataset"]:
                    layers = read_toml(ws.character(character["slug"]).config_path)
                    queued.append(
                        (character["name"], jobs.add(character["slug"], character["name"], layers, 0, until))
                    )
    except USER_ERRORS as exc:
        _fail(exc)
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
        ws = Workspace(workspace)
        if db is None and not ws.root.is_dir():
            raise LorafactoryError(f"workspace {ws.root} does not exist; pass --workspace or --db")
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
        _fail(exc)
    typer.echo(str(path))  # the bare path, never wrapped, for scripts


@config_app.command("show")
def config_show(
    name: Optional[str] = typer.Argument(None, help="Character whose saved settings to start from."),
    workspace: Path = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Print the effective settings as TOML."""
    try:
        settings = _settings(workspace, name, config, preset, set_ or [])
    except USER_ERRORS as exc:
        _fail(exc)
    sys.stdout.write(to_toml(settings))


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
) -> None:
    """Run the whole pipeline offline on tiny stand-in models and a synthetic character."""
    from lorafactory.demo import DEMO_CHARACTER, default_cache, run_demo, run_fleet_demo
    from lorafactory.state import Store

    _setup_logging()
    err.print(
        "[bold yellow]Demo:[/bold yellow] tiny random-initialised stand-in models and synthetic characters, on CPU. "
        "It exercises every real code path, but [bold]neither the images nor the metrics mean anything[/bold]."
    )
    try:
        with err.status("building the test kit (tiny SD pipeline, stand-in model hub, synthetic images)…"):
            from lorafactory.demo import build_kit

            build_kit(cache or default_cache())
        if fleet:
            run_fleet_demo(workspace, cache or default_cache())
            queue = _queue(workspace, None)
            for job in queue.jobs():
                release = Workspace(workspace).character(job.slug).artifact("release")
                out.print(f"{escape(job.name)}: {job.status} — {release if job.status == 'done' else job.last_error}")
            out.print(_fleet_table(queue.summary()))
            out.print(f"Report: [bold]{_demo_report(workspace)}[/bold]")
            return
        run_demo(workspace, cache or default_cache(), ["--force", force] if force else [])
        ws = Workspace(workspace)
        summary = Store(ws.default_db_url).character_summary(slugify(DEMO_CHARACTER))
    except USER_ERRORS as exc:
        _fail(exc)
    release_dir = ws.character(slugify(DEMO_CHARACTER)).artifact("release")
    _print_metrics(summary["checkpoints"])
    out.print(f"Release: [bold]{release_dir}[/bold]")
    for path in sorted(release_dir.rglob("*")):
        if path.is_file() and path.parent.name != "previews":
            out.print(f"  {path.relative_to(release_dir)}")
    out.print(f"Report: [bold]{_demo_report(workspace)}[/bold]")
    out.print("[yellow]Reminder: stand-in models — the release shows the pipeline works, not a usable LoRA.[/yellow]")


def _demo_report(workspace: Path) -> Path:
    """The report of the demo's runs (`lorafactory report` on its workspace)."""
    from lorafactory.report.page import write_report
    from lorafactory.state import Store

    ws = Workspace(workspace)
    return write_report(Store(ws.default_db_url), ws, ws.root / "report")
