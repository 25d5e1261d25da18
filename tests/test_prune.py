"""Pruning a released character: what goes and what stays, runs that skip it, runs that make it again."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import DEMO_GROUP, NotedProgress, copy_of_the_demo
from lorafactory.cli import app
from lorafactory.errors import StaleStage
from lorafactory.pipeline import run_pipeline
from lorafactory.progress import SilentProgress
from lorafactory.prune import plan_pruning
from lorafactory.state import Store
from lorafactory.state.lock import acquire
from lorafactory.workspace import STAGES, Workspace, damage, list_files

pytestmark = DEMO_GROUP


@pytest.fixture(scope="module")
def released_with_prune(demo_run, tmp_path_factory):
    """A copy of the demo that keeps one step of three, released with ``release.prune = "models"`` (once per
    module); beside it, every file of the character as it was before the release pruned them, and the run's notes."""
    workspace, store, char = copy_of_the_demo(demo_run, tmp_path_factory.mktemp("pruned"))
    before = {stage: list_files(char.artifact(stage)) for stage in STAGES}
    progress = NotedProgress()
    settings = demo_run["settings"].model_copy(deep=True)
    settings.evaluate.keep, settings.release.prune = 1, "models"
    outcome = run_pipeline(workspace, store, settings, progress)
    assert outcome.executed == ["evaluate", "release"]  # keep is a setting of the evaluation
    return workspace.root, settings, before, progress.notes


@pytest.fixture
def pruned_models(released_with_prune, tmp_path):
    """A test's own copy of ``released_with_prune``: its workspace, store, character, settings, files before the
    prune and notes."""
    root, settings, before, notes = released_with_prune
    shutil.copytree(root, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    return workspace, Store(workspace.default_db_url), workspace.character("akane_hoshino"), settings, before, notes


def test_a_release_prunes_the_steps_it_did_not_keep_and_a_rerun_does_nothing(pruned_models, target_checks):
    workspace, store, char, settings, before, notes = pruned_models
    kept = char.manifest("evaluate").details["kept_steps"]
    checkpoints = char.manifest("train").details["checkpoints"]
    assert len(kept) == 1 and len(checkpoints) == 3
    train, evaluate = char.manifest("train"), char.manifest("evaluate")

    # the train stage keeps the kept step's checkpoint, its log and event files; its other checkpoints and state go
    assert set(train.pruned) == {
        name
        for name in before["train"]
        if name.startswith("state/")
        or any(name.startswith(f"{checkpoints[s]}/") for s in checkpoints if int(s) != kept[0])
    }
    assert train.pruned == {name: before["train"][name] for name in train.pruned}  # the sizes they had
    assert list_files(char.artifact("train")) == train.files
    assert any(name.startswith(f"{checkpoints[str(kept[0])]}/") for name in train.files)
    assert "train_log.jsonl" in train.files and any(name.startswith("tensorboard/") for name in train.files)
    # the evaluation keeps every step's metrics and the kept step's images, previews of the release
    kept_dir = f"steps/step-{kept[0]:06d}/"
    assert evaluate.pruned and all(n.endswith(".png") and not n.startswith(kept_dir) for n in evaluate.pruned)
    assert sum(n.endswith("/metrics.json") for n in evaluate.files) == 3
    assert any(n.startswith(kept_dir) and n.endswith(".png") for n in evaluate.files)
    assert list_files(char.artifact("evaluate")) == evaluate.files
    # the datasets, the release and every manifest are whole
    for stage in ("crawl", "prepare", "release"):
        assert not char.manifest(stage).pruned and list_files(char.artifact(stage)) == char.manifest(stage).files
    assert all(damage(char.artifact(stage), char.manifest(stage)) is None for stage in STAGES)
    removed = len(train.pruned) + len(evaluate.pruned)
    assert any(note.startswith(f"[dim]pruned (models): {removed} files") for note in notes)

    again = run_pipeline(workspace, store, settings, SilentProgress())
    assert again.executed == [] and target_checks == []  # nothing made again, nothing even checked
    fewer_previews = settings.model_copy(deep=True)
    fewer_previews.release.preview_count = 2
    release = run_pipeline(workspace, store, fewer_previews, SilentProgress())
    assert release.executed == ["release"]  # a new release reads only what pruning kept
    assert len(list((char.artifact("release") / "previews").iterdir())) == 2
    assert plan_pruning(char, "models").files == {}  # nothing left to prune at this level


def test_a_run_that_reads_pruned_checkpoints_trains_them_again_first(pruned_models, target_checks):
    """A new evaluation needs every checkpoint: the training is made again with the fingerprint it had, so its
    kept checkpoint comes back the same, and the datasets it was made from are not touched."""
    workspace, store, char, settings, _, _ = pruned_models
    best = char.manifest("evaluate").details["kept_steps"][0]
    path = char.artifact("train") / char.manifest("train").details["checkpoints"][str(best)] / "lora.safetensors"
    trained = load_file(path)
    progress = NotedProgress()
    changed = settings.model_copy(deep=True)
    changed.evaluate.steps += 1
    outcome = run_pipeline(workspace, store, changed, progress)
    assert outcome.executed == ["train", "evaluate", "release"] and outcome.skipped == ["crawl", "prepare"]
    assert (
        "[yellow]train: its checkpoints and resume state were pruned and evaluate reads them; making them again"
        "[/yellow]" in progress.notes
    )
    assert target_checks == [changed.train]  # it trains, so the targets were checked first
    again = load_file(path)
    for key, tensor in trained.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-4, atol=1e-6)


def test_pruned_datasets_go_back_to_the_phase_that_makes_them(pruned_models):
    """In a fleet, a later phase that must read pruned dataset files hands the job back to the dataset phase,
    whose run looks ahead to the job's end and makes them again; a job with nothing to redo redoes nothing."""
    workspace, store, char, settings, _, _ = pruned_models
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "--datasets", "--dry-run", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert "akane_hoshino" in result.output and "crawl, prepare" in result.output
    assert not char.manifest("crawl").pruned  # a dry run removes nothing
    result = runner.invoke(app, ["prune", "--datasets", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert char.manifest("crawl").pruned and char.manifest("prepare").pruned
    assert not any(name.startswith("images/") for name in list_files(char.artifact("prepare")))

    dataset_phase = {"until": "prepare", "start": "crawl", "ahead": "release"}
    nothing = run_pipeline(workspace, store, settings, SilentProgress(), **dataset_phase)
    assert nothing.executed == []  # every stage up to date: the pruned files stay pruned
    changed = settings.model_copy(deep=True)
    changed.train.unet_lr *= 2
    with pytest.raises(StaleStage, match="crawl is out of date .its downloaded images were pruned and prepare reads"):
        run_pipeline(workspace, store, changed, SilentProgress(), until="evaluate", start="train")
    remade = run_pipeline(workspace, store, changed, SilentProgress(), **dataset_phase)
    assert remade.executed == ["crawl", "prepare"]
    assert any(name.startswith("images/") for name in char.manifest("prepare").files)
    assert not char.manifest("crawl").pruned and not char.manifest("prepare").pruned


def test_the_command_leaves_unreleased_and_busy_characters_alone(pruned_models, tmp_path):
    workspace, store, char, _, _, _ = pruned_models
    unfinished = workspace.character("half_done")
    unfinished.path.mkdir()
    unfinished.config_path.write_text('preset = "tiny-demo"\n')
    runner = CliRunner()
    with acquire(store, char.slug):  # a run holds her
        result = runner.invoke(app, ["prune", "--datasets", "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "│" in line and "character" not in line}
    assert "being run" in lines["akane_hoshino"] and "its latest run" in lines["half_done"]  # wrapped at 80 columns
    assert not char.manifest("crawl").pruned
    missing = runner.invoke(app, ["prune", "Nobody", "-w", str(workspace.root)])
    assert missing.exit_code == 1 and "no character 'Nobody'" in missing.output
    assert runner.invoke(app, ["prune", "-w", str(tmp_path / "typo")]).exit_code == 1
    remade = char.artifact("evaluate") / "manifest.json"  # as if a later run made another training since
    record = json.loads(remade.read_text())
    record["inputs"]["train"] = "0" * 16
    remade.write_text(json.dumps(record))
    assert plan_pruning(char, "models").skipped.startswith("its latest run has not made a release nor failed")
