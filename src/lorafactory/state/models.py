"""Tables of the state store. Portable SQL only, so SQLite and PostgreSQL both work."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 9  # v5: character_locks; v6: jobs; v7: jobs.phase/worker, characters.copyright/popularity;
# v8: runs.source, stage_executions.gpu_seconds; v9: jobs.returns


class Base(DeclarativeBase):
    pass


def as_utc(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite gives it back without its zone)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class SchemaInfo(Base):
    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Character(Base):
    __tablename__ = "characters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(400))
    trigger: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    copyright: Mapped[str | None] = mapped_column(String(400), nullable=True)  # the game or show, when known
    popularity: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the site's post count, when queued by it

    runs: Mapped[list[Run]] = relationship(back_populates="character", order_by="Run.id")
    publications: Mapped[list[Publication]] = relationship(back_populates="character", order_by="Publication.id")


class Run(Base):
    """One invocation of the pipeline for a character."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id"), index=True)
    status: Mapped[str] = mapped_column(String(20))  # running, succeeded, failed, interrupted
    config_hash: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str | None] = mapped_column(String(20), nullable=True)  # web, anime or local

    character: Mapped[Character] = relationship(back_populates="runs")
    stages: Mapped[list[StageExecution]] = relationship(back_populates="run", order_by="StageExecution.id")
    checkpoints: Mapped[list[Checkpoint]] = relationship(back_populates="run", order_by="Checkpoint.step")


class StageExecution(Base):
    __tablename__ = "stage_executions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    stage: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))  # running, succeeded, skipped, failed, interrupted
    fingerprint: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # GPU time (seconds × GPUs), GPU stages

    run: Mapped[Run] = relationship(back_populates="stages")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    selected: Mapped[int] = mapped_column(Integer, default=0)

    run: Mapped[Run] = relationship(back_populates="checkpoints")
    metrics: Mapped[list[Metric]] = relationship(back_populates="checkpoint", order_by="Metric.name")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("checkpoint_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    name: Mapped[str] = mapped_column(String(80))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)

    checkpoint: Mapped[Checkpoint] = relationship(back_populates="metrics")


class Download(Base):
    """The download archive: every post fetched for a collection (a character or a shared set)."""

    __tablename__ = "downloads"
    __table_args__ = (UniqueConstraint("collection", "site", "post_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str] = mapped_column(String(200), index=True)
    site: Mapped[str] = mapped_column(String(40))
    post_id: Mapped[str] = mapped_column(String(100))
    md5: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(Text)
    post: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SiteTag(Base):
    """The character tag chosen on a site for a name, so later runs ask the site only once."""

    __tablename__ = "site_tags"
    __table_args__ = (UniqueConstraint("site", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(400))
    tag: Mapped[str] = mapped_column(String(400))
    post_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Publication(Base):
    """A release published somewhere (the Hugging Face Hub, Civitai)."""

    __tablename__ = "publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id"), index=True)
    target: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer)
    release_fingerprint: Mapped[str] = mapped_column(String(64))
    uploaded: Mapped[int] = mapped_column(Integer)  # files or operations this call sent
    unchanged: Mapped[int] = mapped_column(Integer)  # already there from an earlier call
    published_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    character: Mapped[Character] = relationship(back_populates="publications")


class CharacterLock(Base):
    """The run that holds a character: one row per locked slug; its holder refreshes the heartbeat."""

    __tablename__ = "character_locks"

    slug: Mapped[str] = mapped_column(String(200), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """One character in the fleet's durable queue: what to run, and who runs it under which lease."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(400))
    settings: Mapped[dict] = mapped_column(JSON)  # the run's settings layers (no credentials)
    until: Mapped[str] = mapped_column(String(40))  # the last stage to run
    phase: Mapped[str] = mapped_column(String(20), server_default="dataset")  # the part of the pipeline to run next
    status: Mapped[str] = mapped_column(String(20))  # queued, running, done, failed, quarantined, cancelled
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    returns: Mapped[int] = mapped_column(Integer, server_default="0")  # times sent back to an earlier phase
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)  # host:pid of the process running it
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # retry backoff
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
