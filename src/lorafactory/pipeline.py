"""The stage graph: crawl -> prepare -> train -> evaluate -> release, with skip, resume and force.

A stage is skipped when its artifact was made from the upstream artifact there now, by this output
format, with the settings of this run: its manifest records their values, and a setting it lacks (added
to lorafactory since) counts as unchanged at its default. Work happens in ``<stage>.partial/``; the manifest is
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

from lorafactory.config import (
    Settings,
    changed_section_setting,
    changed_setting,
    legacy_dump,
    legacy_settings_hash,
    recorded_sections,
    recorded_settings,
    settings_hash,
    to_toml,
)
from lorafactory.errors import (
    ConfigError,
    LorafactoryError,
    QualityGateFailed,
    StaleStage,
    as_user_error,
    first_line,
)
from lorafactory.hubfetch import reporting_downloads
from lorafactory.progress import Progress
from lorafactory.prune import PRUNED_FILES, plan_pruning, prune
from lorafactory.state import Store
from lorafactory.state.lock import acquire
from lorafactory.workspace import (
    STAGES,
    CharacterDir,
    Manifest,
    Workspace,
    damage,
    slugify,
    utcnow,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from lorafactory.sources.http import SharedBudget

log = logging.getLogger(__name__)
# Each stage's output format. Bump a stage's when what it writes changes, so that its old artifacts are rebuilt,
# and with them everything made from them; earlier stages keep theirs (a new release format retrains nothing).
OUTPUT_VERSIONS = {"crawl": "3", "prepare": "3", "train": "3", "evaluate": "3", "release": "3"}
LEGACY_VERSION = "3"  # every stage's when manifests did not yet record their settings
# The artifacts whose files (not only manifests) a stage reads: a pruned one is made again before the stage runs.
# The release reads only the kept steps' checkpoints and images, which pruning keeps.
READS = {"prepare": ("crawl",), "train": ("prepare",), "evaluate": ("prepare", "train")}
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


def _check_evaluable(ctx: Context) -> None:
    """Refuses to train a model its evaluation would have no prompts for (a custom prompt set that relies on
    outfit clusters the dataset lacks), as a ConfigError: the dataset tells, before any training."""
    from lorafactory.evaluate.prompts import dataset_prompt_specs
    from lorafactory.train.data import read_metadata

    if not ctx.settings.evaluate.relies_on_clusters:
        return  # a built-in set, or the user's own prompts: never empty, and no clustering to pay for
    records = read_metadata(ctx.char.artifact("prepare"))
    dataset_prompt_specs(ctx.settings.evaluate, [list(record.get("tags", [])) for record in records])


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


def _legacy_fingerprints(settings: Settings) -> dict[str, str]:
    """Each stage's fingerprint as manifests that do not record their settings have it (those written before
    lorafactory recorded them): its settings sections chained with every upstream fingerprint."""
    prints: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        sections = [legacy_dump(name, getattr(settings, name)) for name in _SECTIONS[stage]]
        previous = settings_hash(stage, LEGACY_VERSION, previous, *sections)
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
    ahead: str | None = None,
) -> RunOutcome:
    """Run every stage up to ``until``; ``force`` reruns from that stage onward. The character is
    locked for the run: a second run refuses at once (or, with ``wait``, waits for the first).
    ``site_budget`` shares each image site's request rate with other processes (a fleet's crawls).
    ``start`` runs no stage before it: when one of those is out of date, StaleStage names it and
    nothing is run or recorded (a fleet phase, which hands the job back to the phase that makes it). ``ahead``
    is a later stage the job goes on to in later runs (a fleet's later phases): the plan looks ahead to it, so
    that pruned files a later stage reads are made again by the run whose stages make them."""
    for stage in (until, force, start, ahead):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
    if start is not None and force is not None and STAGES.index(force) < STAGES.index(start):
        raise ConfigError(f"force={force!r} would rerun stages before start={start!r}; force a later stage")
    if not settings.character.name:
        raise ConfigError("the character has no name; pass NAME to the command")
    trigger = trigger_for(settings)
    slug = slugify(settings.character.name)
    if ahead is not None and STAGES.index(ahead) < STAGES.index(until):
        raise ConfigError(f"ahead={ahead!r} comes before until={until!r}; look ahead to a later stage")
    stages = STAGES[: STAGES.index(until) + 1]
    planned = STAGES[: STAGES.index(ahead or until) + 1]  # the stages the plan looks at
    forced = set(STAGES[STAGES.index(force) :]) if force else set()
    if "train" in stages and _will_train(workspace.character(slug), settings, planned, forced):
        from lorafactory.train.preflight import check_targets

        check_targets(settings.train)  # against the base model's architecture, before any work
    with acquire(store, slug, wait=wait) as lock:
        char = workspace.character(slug)
        original = settings_hash(settings)
        attempt = _gate_attempt(char, settings)
        current = retrain_settings(settings, attempt)
        plan = _plan(char, current, planned, forced)
        if start is not None and (stale := _stale_before(char, plan, start)) is not None:
            raise stale
        char.path.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(char.config_path, to_toml(settings).encode("utf-8"))

        character_id = store.ensure_character(slug, settings.character.name, trigger)
        run_id = store.start_run(character_id, original, SOURCE_KINDS[settings.crawl.source])
        executed: list[str] = []
        skipped: list[str] = []
        while True:
            legacy = _legacy_fingerprints(current)
            ctx = Context(current, trigger, char, progress, store, run_id, site_budget)
            upstream = ""
            for stage in stages:
                lock.check()
                redo = plan[stage]
                if redo is None:
                    existing = char.manifest(stage)
                    store.record_skip(run_id, stage, existing.fingerprint)
                    progress.note(f"[dim]{stage}: up to date, skipped[/dim]")
                    skipped.append(stage)
                else:
                    if redo.note:
                        progress.note(f"[yellow]{stage}: {redo.note}[/yellow]")
                    if redo.invalidate:
                        char.invalidate(stage)
                    existing = _execute(ctx, _head(stage, current, upstream), legacy[stage])
                    executed.append(stage)
                upstream = existing.fingerprint
                if stage == "evaluate" and not existing.details["gate"]["passed"]:
                    break
            else:
                break
            reason = ctx.manifest("evaluate").details["gate"]["reason"]
            if attempt >= settings.evaluate.gate_attempts:
                message = (
                    f"quality gate failed after {attempt + 1} training attempt(s): "
                    f"{reason}; see {char.artifact('evaluate') / 'metrics.csv'}"
                )
                if settings.release.prune != "off":  # the run is over: a retrain would train anew
                    _prune_finished(char, settings.release.prune, progress)
                store.finish_run(run_id, "failed", message)
                raise QualityGateFailed(message)
            attempt += 1
            gate = {"settings": recorded_settings(settings), "attempt": attempt, "reason": reason}
            write_json_atomic(char.path / GATE_FILE, gate)
            progress.note(
                (
                    f"[yellow]quality gate: {reason}; retraining (attempt "
                    f"{attempt + 1} of {settings.evaluate.gate_attempts + 1})[/yellow]"
                )
            )
            current = retrain_settings(settings, attempt)
            plan = _plan(char, current, planned, set())  # nothing forced again
        if until == "release" and settings.release.prune != "off":
            _prune_finished(char, settings.release.prune, progress)
        store.finish_run(run_id, "succeeded")
        return RunOutcome(slug, run_id, executed, skipped)


def _prune_finished(char: CharacterDir, level: str, progress: Progress) -> None:
    """``release.prune``: after the release, or the quality gate's final failure, what nothing reads any more
    goes, as ``lorafactory prune`` removes it."""
    from rich.filesize import decimal

    pruning = plan_pruning(char, level)
    prune(char, pruning)
    if pruning.files:
        progress.note(f"[dim]pruned ({level}): {pruning.removed} files, {decimal(pruning.freed)} freed[/dim]")


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


def _will_train(char: CharacterDir, settings: Settings, stages: tuple[str, ...], forced: set[str]) -> bool:
    """Whether a run of ``stages`` would execute train or a stage before it: the LoRA targets are checked against
    the base model (which imports the model libraries) only then; a trained artifact that is up to date was made
    with targets that matched."""
    plan = _plan(char, retrain_settings(settings, _gate_attempt(char, settings)), stages, forced)
    return any(plan[stage] is not None for stage in STAGES[: STAGES.index("train") + 1])


def _stale_before(char: CharacterDir, plan: dict[str, _Redo | None], start: str) -> StaleStage | None:
    """The first stage before ``start`` that a run with ``plan`` would execute, as the error that says why (None
    when none would)."""
    for stage in STAGES[: STAGES.index(start)]:
        if (redo := plan[stage]) is not None:
            return StaleStage(stage, redo.why)
        if stage == "evaluate" and not char.manifest(stage).details["gate"]["passed"]:
            return StaleStage(stage, "its best checkpoint failed the quality gate")
    return None


@dataclass(frozen=True)
class _Redo:
    """Why a run executes a stage (``why``), what it tells the user (``note``, if anything), and whether the old
    artifact goes first (forced or damaged)."""

    why: str
    note: str = ""
    invalidate: bool = False


def _plan(
    char: CharacterDir, settings: Settings, stages: tuple[str, ...], forced: set[str]
) -> dict[str, _Redo | None]:
    """Why a run with ``settings`` executes each of ``stages``, or None for a stage it skips as up to date. A
    damaged artifact is rebuilt with everything made from it; a pruned one is made again (with the fingerprint it
    had, so what was made from it stays up to date) when a stage that runs reads the files pruned from it."""
    legacy = _legacy_fingerprints(settings)
    forced = set(forced)
    plan: dict[str, _Redo | None] = {}
    kept: dict[str, Manifest] = {}
    upstream = ""
    for stage in stages:
        existing = char.manifest(stage)
        if stage in forced:
            plan[stage] = _Redo("it was forced", invalidate=True)
        elif existing is None:
            plan[stage] = _Redo("it was never finished")
        elif damaged := damage(char.artifact(stage), existing):
            forced |= set(STAGES[STAGES.index(stage) + 1 :])
            why = f"{damaged} since it was made"
            plan[stage] = _Redo(why, f"{why}; rebuilding it and later stages", invalidate=True)
        elif misfit := _misfit(existing, settings, upstream, legacy[stage]):
            plan[stage] = _Redo(misfit, f"out of date ({misfit})")
        else:
            plan[stage] = None
            kept[stage] = existing
        upstream = kept[stage].fingerprint if stage in kept else _head(stage, settings, upstream).fingerprint
    for stage in reversed(stages):  # latest first: a pruned artifact made again may need its own source again
        for source in READS.get(stage, ()) if plan[stage] is not None else ():
            if source in kept and kept[source].pruned:
                del kept[source]
                what = PRUNED_FILES[source]
                why = f"its {what} were pruned and {stage} reads them"
                plan[source] = _Redo(why, f"{why}; making them again")
    return plan


def _upstream(stage: str) -> str | None:
    index = STAGES.index(stage)
    return STAGES[index - 1] if index else None


def _head(stage: str, settings: Settings, upstream: str) -> Manifest:
    """What an artifact of ``stage`` made now from the upstream artifact whose fingerprint is ``upstream``
    records of its making: its manifest before the results."""
    record = recorded_sections(settings, _SECTIONS[stage])
    before = _upstream(stage)
    return Manifest(
        stage=stage,
        fingerprint=settings_hash(stage, OUTPUT_VERSIONS[stage], upstream, record),
        inputs={before: upstream} if before else {},
        code_version=OUTPUT_VERSIONS[stage],
        settings=record,
    )


def _misfit(made: Manifest, settings: Settings, upstream: str, legacy: str) -> str | None:
    """Why an artifact of ``made.stage`` (or an interrupted one) is not what a run with ``settings`` would
    make from the upstream artifact whose fingerprint is ``upstream``; None when it is. ``legacy`` is the
    stage's fingerprint for manifests that do not record their settings. A setting added to lorafactory
    since, at its default, changes nothing; nor does a runtime setting."""
    before = _upstream(made.stage)
    if before is not None and made.inputs.get(before) != upstream:
        return f"it was made from an earlier {before}"
    version = made.code_version if made.settings else LEGACY_VERSION
    if version != OUTPUT_VERSIONS[made.stage]:
        return f"lorafactory's {made.stage} output changed since it was made"
    if not made.settings:
        return None if made.fingerprint == legacy else "the settings changed since it was made"
    changed = changed_section_setting(made.settings, settings, _SECTIONS[made.stage])
    return None if changed is None else f"a setting changed since it was made: {changed}"


_MARKER_FIELDS = {"stage", "fingerprint", "inputs", "code_version", "settings"}  # an interrupted artifact's


def _saved_marker(stage: str, text: str) -> Manifest:
    """An interrupted artifact's marker; markers written before they held JSON hold a bare fingerprint."""
    try:
        return Manifest.model_validate_json(text)
    except ValueError:
        return Manifest(stage=stage, fingerprint=text.strip())


def _gate_attempt(char: CharacterDir, settings: Settings) -> int:
    """How many retrains the gate already asked for with these settings (0 when none). The gate file records
    them as artifacts do, so a setting added to lorafactory since, at its default, keeps the count; files
    written before it did hold their hash."""
    try:
        saved = json.loads((char.path / GATE_FILE).read_text())
        if "settings" in saved:
            same = isinstance(saved["settings"], dict) and changed_setting(saved["settings"], settings) is None
        else:
            same = saved["settings_hash"] == legacy_settings_hash(settings)
        attempt = int(saved["attempt"]) if same else 0
    except (OSError, ValueError, TypeError, KeyError):  # absent or malformed: no retrain recorded
        return 0
    return max(attempt, 0)


def _execute(ctx: Context, head: Manifest, legacy: str) -> Manifest:
    """Run ``head.stage`` and commit its artifact, whose manifest is ``head`` with the results; that manifest.
    A resumable stage continues an interrupted artifact that fits these settings (``legacy``: as ``_misfit``)."""
    stage, progress, store = head.stage, ctx.progress, ctx.store
    progress.note(f"[bold]{stage}[/bold]")
    stage_id = store.start_stage(ctx.run_id, stage, head.fingerprint)
    started = time.monotonic()
    resumable = stage in RESUMABLE
    upstream = next(iter(head.inputs.values()), "")
    try:
        if stage == "train":
            _check_evaluable(ctx)
        out = ctx.char.begin(
            stage,
            head.model_dump_json(include=_MARKER_FIELDS),
            resumable,
            lambda saved: _misfit(_saved_marker(stage, saved), ctx.settings, upstream, legacy),
        )
        with reporting_downloads():  # a first run fetches models for minutes: say so as they come
            result = _RUNNERS[stage](ctx, out)
    except KeyboardInterrupt:
        store.finish_stage(stage_id, "interrupted", "interrupted by the user")
        store.finish_run(ctx.run_id, "interrupted", f"interrupted during {stage}")
        raise
    except Exception as exc:
        error = as_user_error(exc, ctx.char.partial(stage))
        message = first_line(error)
        if not resumable:  # a failed stage leaves nothing half-written; training keeps its saved state
            shutil.rmtree(ctx.char.partial(stage), ignore_errors=True)
        store.finish_stage(stage_id, "failed", message)
        store.finish_run(ctx.run_id, "failed", f"{stage}: {message}")
        if error is exc:
            raise
        raise error from exc
    timings = {"seconds": round(time.monotonic() - started, 3)}
    manifest = head.model_copy(
        update={"counts": result.counts, "timings": timings, "details": result.details, "created_at": utcnow()}
    )
    ctx.char.commit(stage, manifest)
    store.finish_stage(stage_id, "succeeded", counts=result.counts, gpu_seconds=_gpu_seconds(result, manifest))
    progress.note(f"[green]{stage}: done[/green] in {manifest.timings['seconds']:.1f}s — {_summary(result.counts)}")
    return manifest


def _gpu_seconds(result: StageOutput, manifest: Manifest) -> float | None:
    """GPU time of a stage that ran on CUDA: its wall time × the GPUs it used (``None`` otherwise)."""
    if not str(result.details.get("device", "")).startswith("cuda"):
        return None
    return round(manifest.timings["seconds"] * int(result.details.get("processes", 1)), 3)


def _summary(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
