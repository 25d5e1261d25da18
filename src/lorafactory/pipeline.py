"""The stage graph: crawl -> prepare -> train -> evaluate -> release, with skip, resume and force.

A stage is skipped when its artifact's manifest carries the fingerprint the current settings
and upstream artifacts would produce. Work happens in ``<stage>.partial/``; the manifest is
written last and the folder swapped in, so an interrupted stage leaves no half-written artifact
and simply runs again next time. Every execution is recorded in the state store.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lorafactory.config import Settings, settings_hash, to_toml
from lorafactory.errors import ConfigError, LorafactoryError, QualityGateFailed, StaleStage, from_os_error
from lorafactory.progress import Progress
from lorafactory.state import Store
from lorafactory.state.lock import acquire
from lorafactory.workspace import (
    STAGES,
    CharacterDir,
    Manifest,
    Workspace,
    damage,
    slugify,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from lorafactory.sources.http import SharedBudget

log = logging.getLogger(__name__)
CODE_VERSION = "3"  # bump when a stage's output format changes, so old artifacts are rebuilt
RESUMABLE = {"crawl", "train"}  # stages that continue an interrupted run from their unfinished folder
GATE_FILE = "gate.json"  # the quality gate's retrain count for the character's current settings
SOURCE_KINDS = {"sites": "web", "anime": "anime", "local": "local"}  # crawl.source -> the run's source kind

_SECTIONS = {
    "crawl": ("character", "crawl"),
    "prepare": ("character", "prepare", "vision"),
    "train": ("character", "train", "regularization"),
    "evaluate": ("character", "evaluate", "vision"),
    "release": ("character", "release"),
}


@dataclass
class Context:
    settings: Settings
    trigger: str
    char: CharacterDir
    progress: Progress
    store: Store
    run_id: int
    site_budget: SharedBudget | None = None

    def manifest(self, stage: str) -> Manifest:
        found = self.char.manifest(stage)
        if found is None:  # pragma: no cover - the runner guarantees upstream manifests
            raise LorafactoryError(f"stage {stage} has no artifact yet; run `lorafactory {stage}` first")
        return found


@dataclass
class StageOutput:
    counts: dict
    details: dict


def trigger_for(settings: Settings) -> str:
    return settings.character.trigger or slugify(settings.character.name)


def _crawl(ctx: Context, out: Path) -> StageOutput:
    from lorafactory.sources.crawl import StoreArchive, crawl

    previous = ctx.char.artifact("crawl") / "images"
    archive = StoreArchive(ctx.store, ctx.char.slug)
    posts, counts = crawl(
        ctx.settings, out, ctx.progress, archive, previous if previous.is_dir() else None, ctx.site_budget
    )
    _record_popularity(ctx)
    return StageOutput(counts, {"sites": sorted({p.site for p in posts})})


def _record_popularity(ctx: Context) -> None:
    """The post count of her tag on the first site that has one, as her popularity, and the copyright the
    tag names (``surtr_(arknights)``) when none was given (for reports)."""
    from lorafactory.sources.danbooru import copyright_of

    if ctx.settings.crawl.source != "sites":
        return
    for site in ctx.settings.crawl.sites:
        found = ctx.store.site_tag(site, ctx.settings.character.name)
        if found is not None:
            name, trigger = ctx.settings.character.name, ctx.trigger
            ctx.store.ensure_character(
                ctx.char.slug, name, trigger, popularity=found[1], guessed_copyright=copyright_of(found[0])
            )
            return


def _prepare(ctx: Context, out: Path) -> StageOutput:
    from lorafactory.dataset.prepare import prepare

    counts, details = prepare(ctx.settings, ctx.trigger, ctx.char.artifact("crawl"), out, ctx.progress)
    return StageOutput(counts, details)


def _train(ctx: Context, out: Path) -> StageOutput:
    from lorafactory.dataset.regularization import set_for
    from lorafactory.launch.torchrun import train

    settings = ctx.settings
    shared = set_for(settings, ctx.char, ctx.progress, ctx.store, ctx.site_budget)
    if shared is not None:
        settings = settings.model_copy(deep=True)
        settings.train.regularization_dir = str(shared)
    result = train(settings, ctx.trigger, ctx.char.artifact("prepare"), out, ctx.progress)
    return StageOutput(result.counts, result.details)


def _checkpoints(ctx: Context) -> dict[int, str]:
    return {int(step): path for step, path in ctx.manifest("train").details["checkpoints"].items()}


def _evaluate(ctx: Context, out: Path) -> StageOutput:
    from lorafactory.evaluate.evaluator import evaluate

    checkpoints = _checkpoints(ctx)
    validation = {
        int(step): losses["mean"] for step, losses in ctx.manifest("train").details.get("validation_loss", {}).items()
    }
    train_dir = ctx.char.artifact("train")
    result = evaluate(
        ctx.settings,
        ctx.trigger,
        ctx.char.artifact("prepare"),
        train_dir,
        checkpoints,
        validation,
        out,
        ctx.progress,
        ctx.char.path / "_cache",
    )
    ctx.store.record_checkpoints(
        ctx.run_id, {s: str(train_dir / p) for s, p in checkpoints.items()}, result.table, result.selection.kept
    )
    return StageOutput(result.counts, result.details)


def _release(ctx: Context, out: Path) -> StageOutput:
    from lorafactory.release.builder import release

    evaluation = ctx.manifest("evaluate")
    dataset = ctx.manifest("prepare")
    stand_in = (Path(ctx.settings.train.base_model) / ".lorafactory-tiny-sd").is_file()
    details = release(
        ctx.settings,
        ctx.trigger,
        ctx.char.artifact("train"),
        ctx.manifest("train").details,
        ctx.char.artifact("evaluate"),
        evaluation.details,
        dataset.counts,
        dataset.details.get("pruned_core_tags", []),
        out,
        stand_in,
    )
    return StageOutput({"files": len(details["files"])}, details)


_RUNNERS: dict[str, Callable[[Context, Path], StageOutput]] = {
    "crawl": _crawl,
    "prepare": _prepare,
    "train": _train,
    "evaluate": _evaluate,
    "release": _release,
}


def fingerprints(settings: Settings) -> dict[str, str]:
    """Each stage's fingerprint: its settings sections chained with every upstream fingerprint."""
    prints: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        sections = [getattr(settings, name) for name in _SECTIONS[stage]]
        previous = settings_hash(stage, CODE_VERSION, previous, *sections)
        prints[stage] = previous
    return prints


@dataclass
class RunOutcome:
    slug: str
    run_id: int
    executed: list[str]
    skipped: list[str]


def run_pipeline(
    workspace: Workspace,
    store: Store,
    settings: Settings,
    progress: Progress,
    until: str = "release",
    force: str | None = None,
    wait: bool = False,
    site_budget: SharedBudget | None = None,
    start: str | None = None,
) -> RunOutcome:
    """Run every stage up to ``until``; ``force`` reruns from that stage onward. The character is
    locked for the run: a second run refuses at once (or, with ``wait``, waits for the first).
    ``site_budget`` shares each image site's request rate with other processes (a fleet's crawls).
    ``start`` runs no stage before it: when one of those is out of date, StaleStage names it and
    nothing is run or recorded (a fleet phase, which hands the job back to the phase that makes it)."""
    for stage in (until, force, start):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    if start is not None and force is not None and STAGES.index(force) < STAGES.index(start):
        raise ConfigError(f"force={force!r} would rerun stages before start={start!r}; force a later stage")
    if not settings.character.name:
        raise ConfigError("the character has no name; pass NAME to the command")
    trigger = trigger_for(settings)
    slug = slugify(settings.character.name)
    if STAGES.index(until) >= STAGES.index("train"):
        from lorafactory.train.preflight import check_targets

        check_targets(settings.train)  # against the base model's architecture, before any work
    with acquire(store, slug, wait=wait) as lock:
        char = workspace.character(slug)
        original = settings_hash(settings)
        if start is not None:
            stale = _stale_before(char, retrain_settings(settings, _gate_attempt(char, original)), start)
            if stale is not None:
                raise stale
        char.path.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(char.config_path, to_toml(settings).encode("utf-8"))

        character_id = store.ensure_character(slug, settings.character.name, trigger)
        run_id = store.start_run(character_id, original, SOURCE_KINDS[settings.crawl.source])
        executed: list[str] = []
        skipped: list[str] = []
        stages = STAGES[: STAGES.index(until) + 1]
        forced = set(STAGES[STAGES.index(force) :]) if force else set()
        attempt = _gate_attempt(char, original)
        while True:
            current = retrain_settings(settings, attempt)
            prints = fingerprints(current)
            ctx = Context(current, trigger, char, progress, store, run_id, site_budget)
            for stage in stages:
                lock.check()
                existing = char.manifest(stage)
                damaged = damage(char.artifact(stage), existing) if existing is not None else None
                if damaged and stage not in forced:  # rebuilt, and everything made from it
                    progress.note(
                        f"[yellow]{stage}: {damaged} since it was made; rebuilding it and later stages[/yellow]"
                    )
                    forced |= set(STAGES[STAGES.index(stage) :])
                if stage in forced:
                    char.invalidate(stage)
                    existing = None
                if existing is not None and existing.fingerprint == prints[stage]:
                    store.record_skip(run_id, stage, prints[stage])
                    progress.note(f"[dim]{stage}: up to date, skipped[/dim]")
                    skipped.append(stage)
                else:
                    _execute(ctx, stage, prints, store)
                    executed.append(stage)
                if stage == "evaluate" and not ctx.manifest("evaluate").details["gate"]["passed"]:
                    break
            else:
                break
            forced = set()
            reason = ctx.manifest("evaluate").details["gate"]["reason"]
            if attempt >= settings.evaluate.gate_attempts:
                message = (
                    f"quality gate failed after {attempt + 1} training attempt(s): "
                    f"{reason}; see {char.artifact('evaluate') / 'metrics.csv'}"
                )
                store.finish_run(run_id, "failed", message)
                raise QualityGateFailed(message)
            attempt += 1
            write_json_atomic(char.path / GATE_FILE, {"settings_hash": original, "attempt": attempt, "reason": reason})
            progress.note(
                (
                    f"[yellow]quality gate: {reason}; retraining (attempt "
                    f"{attempt + 1} of {settings.evaluate.gate_attempts + 1})[/yellow]"
                )
            )
        store.finish_run(run_id, "succeeded")
        return RunOutcome(slug, run_id, executed, skipped)


def retrain_settings(settings: Settings, attempt: int) -> Settings:
    """The settings of the quality gate's ``attempt``-th retrain: more steps and higher learning rates."""
    if attempt == 0:
        return settings
    e = settings.evaluate
    adjusted = settings.model_copy(deep=True)
    t = adjusted.train
    scale = e.gate_step_factor**attempt
    if t.max_steps is not None:
        t.max_steps = math.ceil(t.max_steps * scale)
    else:  # every term of the size rule scales, so the planned count does too
        t.epochs, t.cap_epochs = t.epochs * scale, t.cap_epochs * scale
        t.min_steps, t.cap_steps = math.ceil(t.min_steps * scale), math.ceil(t.cap_steps * scale)
    factor = e.gate_lr_factor**attempt
    t.unet_lr, t.embedding_lr, t.text_encoder_lr = (
        t.unet_lr * factor,
        t.embedding_lr * factor,
        t.text_encoder_lr * factor,
    )
    return adjusted


def _stale_before(char: CharacterDir, settings: Settings, start: str) -> StaleStage | None:
    """The first stage before ``start`` that a run with ``settings`` would execute, as the error that says
    why (None when they are all up to date)."""
    prints = fingerprints(settings)
    for stage in STAGES[: STAGES.index(start)]:
        existing = char.manifest(stage)
        if existing is None:
            why = "it was never finished"
        elif damaged := damage(char.artifact(stage), existing):
            why = f"{damaged} since it was made"
        elif existing.fingerprint != prints[stage]:
            why = "the settings or lorafactory's version changed since it was made"
        elif stage == "evaluate" and not existing.details["gate"]["passed"]:
            why = "its best checkpoint failed the quality gate"
        else:
            continue
        return StaleStage(stage, why)
    return None


def _gate_attempt(char: CharacterDir, settings_key: str) -> int:
    """How many retrains the gate already asked for with these settings (0 when none)."""
    try:
        saved = json.loads((char.path / GATE_FILE).read_text())
        attempt = int(saved["attempt"]) if saved["settings_hash"] == settings_key else 0
    except (OSError, ValueError, TypeError, KeyError):  # absent or malformed: no retrain recorded
        return 0
    return max(attempt, 0)


def _execute(ctx: Context, stage: str, prints: dict[str, str], store: Store) -> None:
    progress = ctx.progress
    progress.note(f"[bold]{stage}[/bold]")
    stage_id = store.start_stage(ctx.run_id, stage, prints[stage])
    started = time.monotonic()
    resumable = stage in RESUMABLE
    try:
        out = ctx.char.begin(stage, prints[stage], resumable)
        result = _RUNNERS[stage](ctx, out)
    except KeyboardInterrupt:
        store.finish_stage(stage_id, "interrupted", "interrupted by the user")
        store.finish_run(ctx.run_id, "interrupted", f"interrupted during {stage}")
        raise
    except Exception as exc:
        error = from_os_error(exc, ctx.char.partial(stage)) if isinstance(exc, OSError) else exc
        message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        if not resumable:  # a failed stage leaves nothing half-written; training keeps its saved state
            shutil.rmtree(ctx.char.partial(stage), ignore_errors=True)
        store.finish_stage(stage_id, "failed", message)
        store.finish_run(ctx.run_id, "failed", f"{stage}: {message}")
        if error is exc:
            raise
        raise error from exc
    upstream = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
    manifest = Manifest(
        stage=stage,
        fingerprint=prints[stage],
        inputs={upstream: prints[upstream]} if upstream else {},
        config_hash=settings_hash(*[getattr(ctx.settings, name) for name in _SECTIONS[stage]]),
        counts=result.counts,
        timings={"seconds": round(time.monotonic() - started, 3)},
        details=result.details,
    )
    ctx.char.commit(stage, manifest)
    store.finish_stage(stage_id, "succeeded", counts=result.counts, gpu_seconds=_gpu_seconds(result, manifest))
    progress.note(f"[green]{stage}: done[/green] in {manifest.timings['seconds']:.1f}s — {_summary(result.counts)}")


def _gpu_seconds(result: StageOutput, manifest: Manifest) -> float | None:
    """GPU time of a stage that ran on CUDA: its wall time × the GPUs it used (``None`` otherwise)."""
    if not str(result.details.get("device", "")).startswith("cuda"):
        return None
    return round(manifest.timings["seconds"] * int(result.details.get("processes", 1)), 3)


def _summary(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
