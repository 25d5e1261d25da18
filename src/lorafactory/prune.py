"""Freeing a finished character's disk: the intermediate files nothing reads any more.

A character keeps every checkpoint (four files each, tens of them), the resume state, every checkpoint's whole
prompt suite as images, and its downloads and dataset, while after the release only the kept steps' files are
read (a new release takes them again), and after a failed quality gate none (a retrain trains anew). Pruning
removes the rest and records what it removed in each artifact's manifest (``Manifest.pruned``): the artifacts
stay up to date, so a rerun with the same settings does nothing, and a run that must redo a stage reading
pruned files first makes that artifact again (``pipeline``'s plan).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafactory.evaluate.layout import step_dir
from lorafactory.workspace import MANIFEST, STAGES, CharacterDir, Manifest, write_json_atomic

PRUNED_FILES = {  # stage -> what prune removes from it, as the pipeline's notes name it
    "crawl": "downloaded images",
    "prepare": "dataset images",
    "train": "checkpoints and resume state",
    "evaluate": "images",
}
MODEL_STAGES = ("train", "evaluate")
DATASET_STAGES = ("crawl", "prepare")
LEVELS = {"models": MODEL_STAGES, "datasets": DATASET_STAGES + MODEL_STAGES}  # each in the pipeline's order


@dataclass
class Pruning:
    """What pruning a character removes (or removed): per stage, each file's size; or why it removes nothing."""

    slug: str
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def removed(self) -> int:
        return sum(len(sizes) for sizes in self.files.values())

    @property
    def freed(self) -> int:
        return sum(sum(sizes.values()) for sizes in self.files.values())


def _under(name: str, folders: set[str]) -> bool:
    return any(name.startswith(folder.rstrip("/") + "/") for folder in folders)


def _train_files(manifest: Manifest, kept: set[int]) -> list[str]:
    """Every checkpoint but the kept steps' (a new release reads those), and the resume state."""
    checkpoints = {int(step): path for step, path in manifest.details.get("checkpoints", {}).items()}
    dropped = {path for step, path in checkpoints.items() if step not in kept}
    return [name for name in manifest.files if _under(name, dropped | {"state"})]


def _evaluate_files(manifest: Manifest, kept: set[int]) -> list[str]:
    """The images of every step but the kept ones (their previews come from them); every step's metrics stay."""
    keep = {step_dir(Path(), step).as_posix() for step in kept}
    return [
        name for name in manifest.files if _under(name, {"steps"}) and not _under(name, keep) and name.endswith(".png")
    ]


def _image_files(manifest: Manifest) -> list[str]:
    return [name for name in manifest.files if _under(name, {"images"})]


def _finished(manifests: dict[str, Manifest | None]) -> bool:
    """Whether the latest run is over: every stage up to the evaluation finished, each made from the one before,
    and then either the release made from that evaluation, or the evaluation failed the quality gate (a retrain
    trains anew, and a rerun with the same settings stops at the gate: neither reads these files)."""
    upstream = None
    for stage in STAGES[: STAGES.index("evaluate") + 1]:
        manifest = manifests[stage]
        if manifest is None or (upstream is not None and manifest.inputs.get(upstream.stage) != upstream.fingerprint):
            return False
        upstream = manifest
    release = manifests["release"]
    released = release is not None and release.inputs.get("evaluate") == upstream.fingerprint
    return released or not upstream.details["gate"]["passed"]


def plan_pruning(char: CharacterDir, level: str) -> Pruning:
    """What ``level`` ("models": the train and evaluate stages'; "datasets": also the crawl's and prepare's)
    removes from a character whose latest run is over (released, or stopped by the quality gate); nothing from
    one whose run is not (it still reads them)."""
    pruning = Pruning(char.slug)
    manifests = {stage: char.manifest(stage) for stage in STAGES}
    if not _finished(manifests):
        pruning.skipped = "its latest run has not made a release nor failed the quality gate: it reads every file"
        return pruning
    kept = {int(step) for step in manifests["evaluate"].details["kept_steps"]}
    for stage in LEVELS[level]:
        manifest = manifests[stage]
        if stage == "train":
            names = _train_files(manifest, kept)
        elif stage == "evaluate":
            names = _evaluate_files(manifest, kept)
        else:
            names = _image_files(manifest)
        if names:
            pruning.files[stage] = {name: manifest.files[name] for name in names}
    return pruning


def prune(char: CharacterDir, pruning: Pruning) -> None:
    """Remove what ``pruning`` lists. Each manifest records its pruned files before they go, so an interruption
    leaves files the manifest no longer needs, never a manifest that misses files (which would read as damage)."""
    for stage, removed in pruning.files.items():
        folder = char.artifact(stage)
        manifest = char.manifest(stage)
        if manifest is None:
            continue
        files = {name: size for name, size in manifest.files.items() if name not in removed}
        updated = manifest.model_copy(update={"files": files, "pruned": {**manifest.pruned, **removed}})
        write_json_atomic(folder / MANIFEST, updated.model_dump(mode="json"))
        for name in removed:
            (folder / name).unlink(missing_ok=True)
        for parent, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):  # deepest first
            if parent != str(folder) and not os.listdir(parent):
                os.rmdir(parent)
