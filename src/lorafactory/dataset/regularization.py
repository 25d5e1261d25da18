"""Regularization sets: generic images, crawled and cleaned like a dataset, cached and shared.

A set lives in ``<workspace>/_shared/regularization/<key>/`` with ``crawl`` and ``prepare``
artifacts like a character's; the key covers the query, the source, the cleaning settings and the
base model, so characters trained on the same base model share one set. Its manifests record those
settings, so a set built before a setting was added (at its default) or with other runtime settings (a
site's request rate) is found and used, not built again. The trainer balances it
against each dataset (as many regularization samples as training samples per epoch), which sizes
it for every dataset.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from lorafactory.config import (
    FOLDER_SOURCES,
    Settings,
    changed_section_setting,
    legacy_dump,
    recorded_sections,
    settings_hash,
)
from lorafactory.errors import ConfigError
from lorafactory.progress import Progress
from lorafactory.workspace import CharacterDir, Manifest, read_manifest

if TYPE_CHECKING:
    from lorafactory.sources.http import SharedBudget

SHARED = Path("_shared") / "regularization"


def wanted(settings: Settings, dataset_images: int) -> bool:
    """Whether to train with a regularization set. 'auto' needs a source for generic images: a site,
    or ``regularization.from_dir`` when the character came from a local folder."""
    r = settings.regularization
    if r.mode == "auto" and settings.crawl.source in FOLDER_SOURCES and not r.from_dir:
        return False
    return r.mode == "on" or (r.mode == "auto" and dataset_images < r.below)


def _set_settings(settings: Settings) -> Settings:
    """The character's settings turned into a generic set's: the query as tags, no purity, no pruning."""
    r = settings.regularization
    generic = settings.model_copy(deep=True)
    generic.character.name = "regularization"
    crawl = generic.crawl
    crawl.tags, crawl.limit = list(r.tags), r.limit
    if r.from_dir:
        crawl.source, crawl.from_dir = "local", r.from_dir
    elif crawl.source in FOLDER_SOURCES:
        raise ConfigError(
            f"regularization.mode is 'on' but the character comes from a {crawl.source} folder; "
            "set regularization.from_dir"
        )
    generic.prepare.purity = False
    generic.prepare.prune_core_tags = False
    generic.prepare.min_images = 1
    return generic


def set_for(
    settings: Settings, char: CharacterDir, progress: Progress, store=None, budget: SharedBudget | None = None
) -> Path | None:
    """The regularization set the character's prepared dataset trains with, built on first use; None when it
    trains without one, or with the user's own (``train.regularization_dir``)."""
    images = char.manifest("prepare").counts.get("dataset", 0)
    if settings.train.regularization_dir or not wanted(settings, images):
        return None
    return ensure_set(settings, char.root, progress, store, budget)


_SECTIONS = ("regularization", "crawl", "prepare", "vision")  # the settings a set is made with, and the base model


def _built(folder: CharacterDir, key: str, stage: str = "prepare") -> bool:
    existing = folder.manifest(stage)
    return existing is not None and existing.fingerprint == key


def _legacy_key(generic: Settings, base_model: str) -> str:
    """The key these settings gave a set before sets recorded their settings."""
    return settings_hash(*(legacy_dump(name, getattr(generic, name)) for name in _SECTIONS), base_model)


def _earlier_set(shared: Path, generic: Settings, base_model: str) -> CharacterDir | None:
    """A set built by an earlier lorafactory, or with other runtime settings, that these settings would make
    too: its manifest records the same values (a setting added since counts at its default), or, made before
    sets recorded their settings, it has the key these settings had then."""
    legacy = _legacy_key(generic, base_model)
    if _built(CharacterDir(shared, legacy), legacy):
        return CharacterDir(shared, legacy)
    for manifest_file in sorted(shared.glob("*/prepare/manifest.json")):
        made = read_manifest(manifest_file.parent)
        if made is None or not made.settings or made.settings.get("base_model") != base_model:
            continue
        if changed_section_setting(made.settings, generic, _SECTIONS) is None:
            return CharacterDir(shared, manifest_file.parent.parent.name)
    return None


def ensure_set(
    settings: Settings, workspace_root: Path, progress: Progress, store=None, budget: SharedBudget | None = None
) -> Path:
    """The prepared regularization set for these settings, built on first use; its dataset folder. With a
    ``store``, one process builds it while the others wait for it (each character's run may ask at once);
    ``budget`` shares the crawl's request rate with the fleet's other crawls."""
    from lorafactory.dataset.prepare import prepare
    from lorafactory.sources.crawl import StoreArchive, crawl
    from lorafactory.state.lock import acquire

    generic = _set_settings(settings)
    base_model = settings.train.base_model
    record = recorded_sections(generic, _SECTIONS) | {"base_model": base_model}
    key = settings_hash(record)
    folder = CharacterDir(workspace_root / SHARED, key)
    steps = {
        "crawl": lambda out: (
            crawl(
                generic, out, progress, StoreArchive(store, f"_regularization/{key}") if store else None, budget=budget
            )[1],
            {},
        ),
        "prepare": lambda out: prepare(generic, None, folder.artifact("crawl"), out, progress),
    }
    with nullcontext() if store is None else acquire(store, f"_regularization-{key}", wait=True):
        if not _built(folder, key) and (earlier := _earlier_set(workspace_root / SHARED, generic, base_model)):
            return earlier.artifact("prepare")
        for stage, run in steps.items():
            if _built(folder, key, stage):
                continue
            progress.note(f"regularization set: {stage}")
            started = time.monotonic()
            out = folder.begin(stage, key)
            counts, details = run(out)
            folder.commit(
                stage,
                Manifest(
                    stage=stage,
                    fingerprint=key,
                    settings=record,
                    counts=counts,
                    details=details,
                    timings={"seconds": round(time.monotonic() - started, 3)},
                ),
            )
    return folder.artifact("prepare")
