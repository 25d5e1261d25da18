"""What every command shares: the typer apps, consoles, common options, errors and settings."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from lorafactory.config import PRESETS, load_settings, read_toml
from lorafactory.errors import LorafactoryError, as_user_error
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


def reflow_docstrings(typer_app: typer.Typer) -> None:
    """Each command's help is its docstring with every paragraph on one line: typer keeps the source's line
    breaks, so the help wrapped both there and at the terminal's width."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)
    for group in typer_app.registered_groups:
        reflow_docstrings(group.typer_instance)


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


def fail(exc: Exception) -> None:
    if isinstance(exc, SQLAlchemyError):
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        exc = LorafactoryError(f"state database error: {cause}; check --db and that the database is reachable")
    exc = as_user_error(exc)  # a file in the way, a read-only or full disk, a model the Hub did not give
    err.print(f"[bold red]error:[/bold red] {escape(redact(str(exc)))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def setup_logging() -> None:
    # Read by diffusers, transformers and huggingface_hub when they are first imported (lazily, later).
    for key in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Read when tqdm is first imported: libraries' own bars (imgutils' CCIP clustering) would print raw lines
    # between the command's progress bars.
    os.environ.setdefault("TQDM_DISABLE", "1")
    handler = RichHandler(console=err, show_path=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("lorafactory").setLevel(logging.INFO)
    # bitsandbytes (diffusers imports it when installed) warns on AVX512-BF16 CPUs that an optional 4-bit
    # CPU kernel is missing, at every start; nothing here runs 4-bit on the CPU.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)


def settings_for(
    workspace: Path, name: Optional[str], config: Optional[Path], preset: Optional[str], overrides: List[str]
):
    """Saved character settings (if any) < --config < --set; the name always comes from the command."""
    saved = Workspace(workspace).character(slugify(name)).config_path if name else None
    settings = over_saved(saved, config, preset, overrides)
    if name:
        settings.character.name = name
    return settings


def over_saved(saved: Optional[Path], config: Optional[Path], preset: Optional[str], overrides: List[str]):
    """The settings saved at ``saved`` (when that file exists) < --config < --set."""
    base = read_toml(saved) if saved is not None and saved.is_file() else None
    return load_settings(config, preset, list(overrides or []), base=base)


def existing_workspace(workspace: Path, hint: str, db: Optional[str] = None) -> Workspace:
    """The workspace of a command that reads what is there: a folder that does not exist is refused (a mistyped
    path would otherwise show an empty store, and leave an empty one behind), unless ``db`` puts the store
    elsewhere. ``hint`` says what to do instead."""
    ws = Workspace(workspace)
    if db is None and not ws.root.is_dir():
        raise LorafactoryError(f"workspace {ws.root} does not exist; {hint}")
    return ws


QUEUE_HINT = "queue characters with `lorafactory queue add NAME` or pass --workspace (or --db)"


def job_queue(workspace: Path, db: Optional[str], create: bool = False):
    """The queue in the workspace's state store (or ``db``); the workspace is made when ``create``."""
    from lorafactory.fleet.queue import JobQueue
    from lorafactory.state import Store

    ws = Workspace(workspace)
    if create:
        ws.root.mkdir(parents=True, exist_ok=True)
    else:
        existing_workspace(workspace, QUEUE_HINT, db)
    return JobQueue(Store(db or ws.default_db_url))
