"""What the report reads from the state store: one row per character, and every stage execution."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from lorafactory.state.models import Character, Checkpoint, Run, StageExecution, as_utc


@dataclass(frozen=True)
class CharacterRow:
    slug: str
    name: str
    copyright: str | None
    popularity: int | None
    source: str | None  # web, anime or local: of the latest run
    status: str  # the latest run's status
    error: str | None  # the latest run's error
    raw: int | None  # images the crawl kept (the cleaning's input)
    images: int | None  # images in the dataset
    heads: int | None
    halfbodies: int | None
    best_step: int | None
    steps_per_epoch: float | None
    recscore: float | None
    bikini: float | None
    bikini_plus: float | None
    retrains: int  # quality-gate retrains in the latest run that trained
    gpu_seconds: float  # over all its runs
    finished_at: datetime | None  # the latest successful run's end

    @property
    def head_ratio(self) -> float | None:
        return self.heads / self.images if self.images and self.heads is not None else None

    @property
    def halfbody_ratio(self) -> float | None:
        return self.halfbodies / self.images if self.images and self.halfbodies is not None else None

    @property
    def dataset_ratio(self) -> float | None:
        return self.images / self.raw if self.raw and self.images is not None else None

    @property
    def best_epoch(self) -> float | None:
        if self.best_step is None or not self.steps_per_epoch:
            return None
        return self.best_step / self.steps_per_epoch


@dataclass(frozen=True)
class StageRow:
    slug: str
    stage: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    gpu_seconds: float | None

    @property
    def seconds(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None


def _latest_counts(runs: list[Run], stage: str) -> dict:
    """The counts of the character's latest successful execution of ``stage`` (a skipped stage has none)."""
    for run in reversed(runs):
        for execution in reversed(run.stages):
            if execution.stage == stage and execution.status == "succeeded" and execution.counts is not None:
                return execution.counts
    return {}


def _chosen(runs: list[Run]) -> tuple[int | None, dict[str, float | None]]:
    """The selected step of the latest run that evaluated, with its metrics."""
    for run in reversed(runs):
        best = [c for c in run.checkpoints if c.selected == 1]
        if best:
            return best[0].step, {m.name: m.value for m in best[0].metrics}
    return None, {}


def _row(character: Character) -> CharacterRow:
    runs = character.runs
    latest = runs[-1]
    crawl, prepare, train = (_latest_counts(runs, stage) for stage in ("crawl", "prepare", "train"))
    step, metrics = _chosen(runs)
    succeeded = [run for run in runs if run.status == "succeeded" and run.finished_at is not None]
    trained = [[e for e in run.stages if e.stage == "train" and e.status != "skipped"] for run in runs]
    trainings = next((len(executions) for executions in reversed(trained) if executions), 0)  # its latest training run
    return CharacterRow(
        slug=character.slug,
        name=character.name,
        copyright=character.copyright,
        popularity=character.popularity,
        source=latest.source,
        status=latest.status,
        error=latest.error,
        raw=prepare.get("raw", crawl.get("kept")),
        images=prepare.get("dataset"),
        heads=prepare.get("crops_head"),
        halfbodies=prepare.get("crops_halfbody"),
        best_step=step,
        steps_per_epoch=train.get("steps_per_epoch"),
        recscore=metrics.get("ccip_recscore"),
        bikini=metrics.get("bikini"),
        bikini_plus=metrics.get("bikini_plus"),
        retrains=max(trainings - 1, 0),
        gpu_seconds=sum(e.gpu_seconds or 0.0 for run in runs for e in run.stages),
        finished_at=as_utc(succeeded[-1].finished_at) if succeeded else None,
    )


def read_rows(
    store, since: datetime | None = None, copyright: str | None = None, source: str | None = None
) -> tuple[list[CharacterRow], list[StageRow]]:
    """Characters with at least one run (started on or after ``since``), by slug, and their stage executions."""
    with store.session() as session:
        query = select(Character).options(
            selectinload(Character.runs).selectinload(Run.stages),
            selectinload(Character.runs).selectinload(Run.checkpoints).selectinload(Checkpoint.metrics),
        )
        characters = session.execute(query.order_by(Character.slug)).scalars().all()
        rows, stages = [], []
        for character in characters:
            if not character.runs or (copyright is not None and character.copyright != copyright):
                continue
            if since is not None and as_utc(character.runs[-1].started_at) < since:
                continue
            row = _row(character)
            if source is not None and row.source != source:
                continue
            rows.append(row)
            for run in character.runs:
                stages += [_stage_row(character.slug, execution) for execution in run.stages]
    return rows, stages


def _stage_row(slug: str, execution: StageExecution) -> StageRow:
    finished = as_utc(execution.finished_at) if execution.finished_at else None
    return StageRow(
        slug, execution.stage, execution.status, as_utc(execution.started_at), finished, execution.gpu_seconds
    )
