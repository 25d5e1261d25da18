"""The whole pipeline end to end, offline: artifacts, release, state, skip, force and failures."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import DEMO_GROUP, NotedProgress, copy_of_the_demo, demo_settings
from lorafactory.cli import app
from lorafactory.config import tomllib
from lorafactory.errors import ConfigError, InputError, StageError, StaleStage
from lorafactory.pipeline import _MARKER_FIELDS, run_pipeline
from lorafactory.progress import SilentProgress
from lorafactory.state import Store
from lorafactory.testing.synthetic import CHARACTERS, generate_dataset
from lorafactory.train.model import load_pipeline
from lorafactory.workspace import STAGES, Workspace

TRIGGER = "akane_hoshino"
pytestmark = DEMO_GROUP


def _char(demo_run):
    return demo_run["workspace"].character(TRIGGER)


def test_every_stage_has_a_manifest_with_counts(demo_run):
    from sqlalchemy import select

    from lorafactory.state.models import StageExecution

    with demo_run["store"].session() as session:  # the demo's run: the first, every stage ran and succeeded
        first = session.execute(select(StageExecution).where(StageExecution.run_id == 1).order_by(StageExecution.id))
        first = first.scalars().all()
        assert [(e.stage, e.status) for e in first] == [(stage, "succeeded") for stage in STAGES]
    char = _char(demo_run)
    for stage in STAGES:
        manifest = char.manifest(stage)
        assert manifest is not None and manifest.counts and "torch" in manifest.versions
    prepare = char.manifest("prepare")
    assert prepare.counts["raw"] == char.manifest("crawl").counts["kept"]
    assert prepare.counts["dataset"] == sum(prepare.counts[f"crops_{g}"] for g in ("person", "halfbody", "head"))
    assert "red_hair" in prepare.details["core_tags"]  # the stand-in tagger sees her hair colour
    assert set(prepare.details["ratios"]) == {"head", "halfbody", "dataset"}


def test_the_run_records_her_source_kind_popularity_and_steps_per_epoch(demo_run):
    """What reports read: the run's source kind, her post count on the site (the tag the crawl chose),
    and the training's steps per epoch."""
    from sqlalchemy import select

    from lorafactory.sources.danbooru import character_tag
    from lorafactory.state.models import Character, Run

    store = demo_run["store"]
    with store.session() as session:
        character = session.execute(select(Character).where(Character.slug == "akane_hoshino")).scalar_one()
        runs = session.execute(select(Run).where(Run.character_id == character.id)).scalars().all()
        popularity, sources = character.popularity, {run.source for run in runs}
    assert sources == {"web"}
    assert popularity == demo_run["replay"].character_counts()[character_tag("Akane Hoshino")]
    assert demo_run["workspace"].character("akane_hoshino").manifest("train").counts["steps_per_epoch"] > 0


def test_cleaning_chain_removes_exactly_the_bad_images(demo_run):
    """The synthetic set has 24 good images, 3 greyscale copies, 2 near-duplicates and one image of
    another character mistagged as her: every filter is counted and removes exactly its kind."""
    prepare = _char(demo_run).manifest("prepare")
    removed = {step["step"]: step["in"] - step["out"] for step in prepare.details["filters"]}
    assert removed == {
        "decode": 0,
        "size": 0,
        "monochrome": 3,
        "anime class": 0,
        "exact duplicates": 0,
        "near duplicates": 2,
        "person split": 0,
        "one head": 0,
        "ccip purity": 1,
    }
    replay = demo_run["replay"]
    kept_posts = {
        json.loads(line)["post_id"]
        for line in (_char(demo_run).artifact("prepare") / "metadata.jsonl").read_text().splitlines()
    }
    kept_files = {replay.images[7000000 - int(post)].path.name for post in kept_posts}
    assert len(kept_files) == 24 and not any(name.startswith(("mono_", "other_")) for name in kept_files)


def test_captions_start_with_the_trigger_and_drop_core_tags(demo_run):
    dataset = _char(demo_run).artifact("prepare")
    captions = [p.read_text().strip() for p in (dataset / "images").glob("*.txt")]
    assert captions and all(c.split(", ")[0] == TRIGGER for c in captions)
    assert not any("red hair" in c for c in captions)  # pruned into the trigger


def test_release_loads_in_diffusers(demo_run, kit):
    release = _char(demo_run).artifact("release")
    expected = {
        f"{TRIGGER}.safetensors",
        f"{TRIGGER}_lora.safetensors",
        f"embeddings/{TRIGGER}.pt",
        f"embeddings/{TRIGGER}.safetensors",
        "README.md",
        "metrics.csv",
    }
    assert expected <= {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()}
    assert list((release / "previews").glob("*.png"))
    pipe = load_pipeline(str(kit.tiny_sd))
    pipe.load_lora_weights(str(release / f"{TRIGGER}_lora.safetensors"))
    pipe.load_textual_inversion(str(release / "embeddings" / f"{TRIGGER}.safetensors"), token=TRIGGER)
    image = pipe(
        f"{TRIGGER}, smile", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_each_lora_file_has_its_own_alias_and_the_card_says_what_each_ui_reads(demo_run):
    release = _char(demo_run).artifact("release")
    names = {}
    for path in (release / f"{TRIGGER}.safetensors", release / f"{TRIGGER}_lora.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names[path.stem] = (handle.metadata()["ss_output_name"], handle.metadata()["modelspec.title"])
    assert names == {TRIGGER: (TRIGGER, TRIGGER), f"{TRIGGER}_lora": (f"{TRIGGER}_lora", f"{TRIGGER}_lora")}
    card = (release / "README.md").read_text()
    forge = next(line for line in card.splitlines() if line.startswith("- **Forge**"))
    assert f"`{TRIGGER}_lora.safetensors`" in forge and f"`embeddings/{TRIGGER}.safetensors`" in forge
    assert "does not read the embedding bundled" in forge
    assert "Forge" not in next(line for line in card.splitlines() if line.startswith(f"| `{TRIGGER}.safetensors`"))


def test_model_card_and_metrics(demo_run):
    release = _char(demo_run).artifact("release")
    card = (release / "README.md").read_text()
    assert card.startswith("---\n") and "instance_prompt: akane_hoshino" in card
    assert "stand-in models" in card
    assert str(demo_run["workspace"].root) not in card and "/tmp" not in card
    rows = (release / "metrics.csv").read_text().strip().splitlines()
    checkpoints = _char(demo_run).manifest("train").details["checkpoints"]
    assert len(rows) == 1 + len(checkpoints)
    assert sum(row.endswith(",1") for row in rows[1:]) == 1
    import yaml

    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "tiny-sd" and "lora" in front["tags"] and front["license"]
    evaluation = _char(demo_run).manifest("evaluate").details
    kept = evaluation["kept_steps"]
    assert kept[0] == evaluation["selected_step"] and f"Step **{kept[0]}** was chosen automatically" in card
    assert (
        "![metrics against step](metrics_plot.png)" in card and (release / "metrics_plot.png").stat().st_size > 10_000
    )
    assert "| CCIP RecScore (fidelity) |" in card
    trained = tomllib.loads((release / "train.toml").read_text())["train"]
    steps = sorted(map(int, checkpoints))
    assert trained["steps"] == steps[-1] and trained["save_every"] == steps[0]  # the grid the run saved on
    for step in kept:  # every kept step: the three file variants, previews, per-image metrics
        folder = release / "steps" / str(step)
        assert {p.name for p in folder.rglob("*") if p.is_file()} >= {
            f"{TRIGGER}.safetensors",
            f"{TRIGGER}_lora.safetensors",
            f"{TRIGGER}.pt",
            "metrics.json",
        }
        assert list((folder / "previews").glob("*.png"))
        per_image = json.loads((folder / "metrics.json").read_text())["per_image"]
        assert per_image and all("ccip" in values for values in per_image.values())


def test_state_store_has_checkpoints_and_metrics(demo_run):
    summary = demo_run["store"].character_summary("akane_hoshino")
    assert summary["latest_run"]["status"] == "succeeded"
    assert [s["status"] for s in summary["latest_run"]["stages"]] == ["succeeded"] * len(STAGES)
    assert len(summary["checkpoints"]) == 3 and sum(c["selected"] for c in summary["checkpoints"]) == 1
    assert all(0.0 <= c["metrics"]["ccip_recscore"] <= 1.0 for c in summary["checkpoints"])


def test_rerun_skips_and_force_reruns_downstream(demo_run, target_checks):
    """A run that trains nothing does not check the LoRA targets against the base model (it would import the
    model libraries for nothing): its trained artifact was made with them."""
    ws, store, settings = demo_run["workspace"], demo_run["store"], demo_run["settings"]
    again = run_pipeline(ws, store, settings, SilentProgress())
    assert again.executed == [] and again.skipped == list(STAGES)
    forced = run_pipeline(ws, store, settings, SilentProgress(), force="evaluate")
    assert forced.executed == ["evaluate", "release"] and forced.skipped == ["crawl", "prepare", "train"]
    assert target_checks == []


def test_a_damaged_artifact_is_rebuilt_with_everything_made_from_it(demo_run, tmp_path, target_checks):
    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    best = char.manifest("evaluate").details["selected_step"]
    damaged = char.artifact("train") / _char(demo_run).manifest("train").details["checkpoints"][str(best)]
    bundled = damaged / "bundled.safetensors"
    bundled.write_bytes(bundled.read_bytes()[:300])  # truncated behind the pipeline's back
    outcome = run_pipeline(workspace, store, demo_run["settings"], SilentProgress())
    assert outcome.skipped == ["crawl", "prepare"] and outcome.executed == ["train", "evaluate", "release"]
    assert target_checks == [demo_run["settings"].train]  # it trains, so the targets were checked first
    release = char.artifact("release") / f"{TRIGGER}.safetensors"
    with safe_open(str(release), "pt") as handle:
        assert len(list(handle.keys())) > 10
    assert char.manifest("release").files[f"{TRIGGER}.safetensors"] == release.stat().st_size


def test_a_run_from_a_later_stage_runs_no_earlier_one(demo_run, tmp_path):
    """``start``, as a fleet phase runs the pipeline: an earlier stage that is out of date stops the run
    before it does anything, naming that stage and why."""
    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    settings = demo_run["settings"]
    assert run_pipeline(workspace, store, settings, SilentProgress(), start="release").executed == []
    latest, config = store.character_summary(char.slug)["latest_run"], char.config_path.read_bytes()
    changed = settings.model_copy(deep=True)
    changed.prepare.min_images += 1
    with pytest.raises(
        StaleStage, match="prepare is out of date .a setting changed since it was made: prepare.min_images 4 → 5"
    ):
        run_pipeline(workspace, store, changed, SilentProgress(), start="train")
    crawled = next(iter(char.manifest("crawl").files))
    (char.artifact("crawl") / crawled).unlink()
    with pytest.raises(StaleStage, match=f"crawl is out of date .{crawled} is missing since it was made"):
        run_pipeline(workspace, store, settings, SilentProgress(), start="evaluate")
    assert store.character_summary(char.slug)["latest_run"] == latest and char.config_path.read_bytes() == config
    assert all(char.manifest(stage) is not None for stage in STAGES)  # nothing was invalidated
    with pytest.raises(ConfigError, match="force='crawl' would rerun stages before start='train'"):
        run_pipeline(workspace, store, settings, SilentProgress(), force="crawl", start="train")


def _without_setting(record_file, section, key):
    """Rewrite a manifest (or an interrupted stage's marker) as a lorafactory without ``section.key`` wrote it."""
    data = json.loads(record_file.read_text())
    del data["settings"][section][key]
    record_file.write_text(json.dumps(data))


def test_a_setting_added_since_an_artifact_was_made_changes_nothing_at_its_default(demo_run, tmp_path):
    """Manifests record the settings they were made with, and a run compares values. A setting the record lacks
    (one a later lorafactory added) is unchanged at its default, a runtime setting never counts, and a changed
    one is named. A hash of every setting would have rebuilt every stage after such an upgrade."""
    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    settings = demo_run["settings"].model_copy(deep=True)
    _without_setting(char.artifact("train") / "manifest.json", "train", "noise_offset")  # at its default, 0
    _without_setting(char.artifact("crawl") / "manifest.json", "crawl", "page_size")  # at its default, 100
    settings.crawl.danbooru.requests_per_second = 2.0  # runtime settings: how a stage runs, not what it makes
    settings.train.gradient_checkpointing, settings.evaluate.batch_size = True, 1
    assert run_pipeline(workspace, store, settings, SilentProgress()).executed == []
    _without_setting(char.artifact("release") / "manifest.json", "release", "preview_count")  # the preset's 4
    progress = NotedProgress()
    assert run_pipeline(workspace, store, settings, progress).executed == ["release"]
    assert (
        "[yellow]release: out of date (a setting changed since it was made: "
        "release.preview_count 8 (its default; the setting is newer) → 4)[/yellow]"
    ) in progress.notes
    settings.train.unet_lr *= 2
    with pytest.raises(StaleStage, match=r"train is out of date .a setting changed .*train.unet_lr 0.001 → 0.002"):
        run_pipeline(workspace, store, settings, SilentProgress(), start="evaluate")


def test_a_new_output_version_of_a_stage_rebuilds_it_and_no_earlier_stage(demo_run, tmp_path, monkeypatch):
    """Each stage has its own output version: a new release format rebuilds releases, and trains nothing."""
    from lorafactory import pipeline

    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    monkeypatch.setitem(pipeline.OUTPUT_VERSIONS, "release", "next")
    progress = NotedProgress()
    assert run_pipeline(workspace, store, demo_run["settings"], progress).executed == ["release"]
    assert "[yellow]release: out of date (lorafactory's release output changed since it was made)[/yellow]" in (
        progress.notes
    )
    assert char.manifest("release").code_version == "next"
    monkeypatch.setitem(pipeline.OUTPUT_VERSIONS, "evaluate", "next")
    with pytest.raises(StaleStage, match="evaluate is out of date .lorafactory's evaluate output changed"):
        run_pipeline(workspace, store, demo_run["settings"], SilentProgress(), start="release")


def test_artifacts_whose_manifests_record_no_settings_are_compared_by_their_fingerprints(
    demo_run, tmp_path, monkeypatch
):
    """Manifests written before they recorded their settings hold a hash of all of them: those stay up to
    date while the settings are the same, and a stage made again after them records its settings."""
    from lorafactory import pipeline

    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    settings = demo_run["settings"].model_copy(deep=True)
    prints = pipeline._legacy_fingerprints(settings)
    for index, stage in enumerate(STAGES):
        path = char.artifact(stage) / "manifest.json"
        data = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("settings", "code_version")}
        inputs = {STAGES[index - 1]: prints[STAGES[index - 1]]} if index else {}
        path.write_text(json.dumps({**data, "fingerprint": prints[stage], "inputs": inputs}))
    assert run_pipeline(workspace, store, settings, SilentProgress()).executed == []
    settings.release.tags = ["new tag"]
    assert run_pipeline(workspace, store, settings, SilentProgress()).executed == ["release"]
    assert char.manifest("release").settings["release"]["tags"] == ["new tag"]
    assert char.manifest("release").inputs == {"evaluate": prints["evaluate"]}
    assert run_pipeline(workspace, store, settings, SilentProgress()).executed == []
    settings.prepare.min_images += 1
    assert run_pipeline(workspace, store, settings, SilentProgress(), until="prepare").executed == ["prepare"]
    monkeypatch.setitem(pipeline.OUTPUT_VERSIONS, "crawl", "next")  # their version was the one of every stage then
    assert run_pipeline(workspace, store, settings, SilentProgress(), until="crawl").executed == ["crawl"]


def test_a_setting_added_since_artifacts_record_theirs_leaves_the_older_files_hashes_as_they_were():
    """Files written before artifacts recorded their settings hold these hashes of the default settings (what
    that lorafactory computed); a setting added since, at its default, must leave them so, or every stage made
    then would be rebuilt (list it in config._ADDED_SINCE_LEGACY); a runtime setting added since leaves them at
    any value. A changed default changes them on purpose."""
    from lorafactory.config import Settings, legacy_settings_hash
    from lorafactory.dataset.regularization import _legacy_key, _set_settings
    from lorafactory.pipeline import _legacy_fingerprints

    settings = Settings()
    assert _legacy_fingerprints(settings) == {
        "crawl": "f6819a50d2d14a04",
        "prepare": "7a485a67681313ec",
        "train": "d38aa426bc5dfa66",
        "evaluate": "f0ed7682464d279e",
        "release": "e77e0860d0231298",
    }
    assert legacy_settings_hash(settings) == "09dcf58231fa7214"  # the gate file's
    assert _legacy_key(_set_settings(settings), settings.train.base_model) == "08fbec3db258be08"  # a shared set's
    settings.train.compile_dynamic = False  # runtime settings added since: no value of them makes another model
    settings.evaluate.compile, settings.evaluate.compile_backend = True, "aot_eager"
    settings.release.prune = "datasets"
    assert _legacy_fingerprints(settings)["release"] == "e77e0860d0231298"
    assert _legacy_fingerprints(settings)["train"] == "d38aa426bc5dfa66"
    assert _legacy_fingerprints(settings)["evaluate"] == "f0ed7682464d279e"
    assert legacy_settings_hash(settings) == "09dcf58231fa7214"
    settings.evaluate.sequential_every += 1  # not at its default: not what those files were made with
    assert _legacy_fingerprints(settings)["evaluate"] != "f0ed7682464d279e"
    assert legacy_settings_hash(settings) != "09dcf58231fa7214"


def _interrupted_after_its_last_image(char):
    """The finished crawl made an interrupted one (no manifest); its marker file and its manifest."""
    manifest = char.manifest("crawl")
    partial = char.partial("crawl")
    char.artifact("crawl").rename(partial)
    (partial / "manifest.json").unlink()
    marker = partial / ".fingerprint"
    marker.write_text(manifest.model_dump_json(include=_MARKER_FIELDS))
    return marker, manifest


def test_an_interrupted_stage_made_before_a_setting_was_added_resumes(demo_run, tmp_path):
    """An interrupted crawl whose marker lacks a setting at its default resumes where it stopped (and, made with
    the same settings, leaves every later stage up to date); one that lacks a setting not at its default does not.
    A marker written before markers recorded settings holds the fingerprint of them all, and resumes when it
    matches."""
    from lorafactory.pipeline import _legacy_fingerprints

    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)
    settings, requests = demo_run["settings"], demo_run["replay"].requests
    marker, manifest = _interrupted_after_its_last_image(char)
    _without_setting(marker, "crawl", "limit")  # the preset's 60 is not limit's default, 300
    with pytest.raises(
        StageError, match=r"interrupted crawl .* cannot be resumed .*crawl.limit 300 .* → 60\); restore its settings"
    ):
        run_pipeline(workspace, store, settings, SilentProgress())

    def resumes():
        before = len(requests)
        outcome = run_pipeline(workspace, store, settings, SilentProgress())
        assert not [path for _, path in requests[before:] if path.startswith("/data/")]  # no image fetched again
        assert outcome.executed == ["crawl"] and char.manifest("crawl").fingerprint == manifest.fingerprint

    marker.write_text(manifest.model_dump_json(include=_MARKER_FIELDS))
    _without_setting(marker, "crawl", "page_size")  # at its default, 100
    resumes()
    marker, _ = _interrupted_after_its_last_image(char)
    marker.write_text(_legacy_fingerprints(settings)["crawl"])
    resumes()


@pytest.mark.parametrize("name", ["bundled.safetensors", "embedding.pt"])
def test_a_damaged_checkpoint_file_is_never_released(demo_run, tmp_path, name):
    from lorafactory.release.builder import _copy_step_files

    source = tmp_path / "step"
    best = _char(demo_run).manifest("evaluate").details["selected_step"]
    checkpoint = _char(demo_run).manifest("train").details["checkpoints"][str(best)]
    shutil.copytree(_char(demo_run).artifact("train") / checkpoint, source)
    (source / name).write_bytes((source / name).read_bytes()[:300])
    with pytest.raises(StageError, match=r"is damaged: .*nothing was released: rerun with --force train"):
        _copy_step_files(source, tmp_path / "release", TRIGGER)


def test_a_full_disk_in_a_stage_is_one_line_and_loses_nothing(demo_run, tmp_path, monkeypatch):
    import errno

    workspace, store, char = copy_of_the_demo(demo_run, tmp_path)

    def full(source, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(
        StageError, match=r"^disk full at .*: free space \(`lorafactory prune` .*\) and rerun; nothing was lost$"
    ):
        run_pipeline(workspace, store, demo_run["settings"], SilentProgress(), force="release")
    monkeypatch.undo()
    stages = store.character_summary(char.slug)["latest_run"]["stages"]
    assert stages[-1]["stage"] == "release" and stages[-1]["error"].startswith("disk full at")
    assert not char.partial("release").exists()


@pytest.mark.parametrize(
    "content",
    ["{", "[]", '{"attempt": "x", "settings_hash": 1}', '{"attempt": 1}', '{"attempt": 1, "settings": []}'],
)
def test_a_malformed_gate_file_counts_as_no_retrain(tmp_path, content):
    from lorafactory.config import Settings
    from lorafactory.pipeline import GATE_FILE, _gate_attempt

    char = Workspace(tmp_path).character("x")
    char.path.mkdir(parents=True)
    (char.path / GATE_FILE).write_text(content)
    assert _gate_attempt(char, Settings()) == 0


def test_lora_targets_naming_no_layer_are_refused_before_any_work(tmp_path, kit):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    settings = demo_settings(kit, "http://127.0.0.1:1", 'train.lora_targets=["to_q", "to_qq"]')
    with pytest.raises(ConfigError, match=r"train.lora_targets \['to_qq'\] matched no UNet layer"):
        run_pipeline(ws, Store(ws.default_db_url), settings, SilentProgress())
    assert not list(ws.root.glob("*/crawl"))  # refused before the crawl


def test_bad_workspace_and_database_are_one_line_errors(tmp_path):
    runner = CliRunner()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = runner.invoke(app, ["crawl", "X", "--from-dir", str(tmp_path), "--workspace", str(a_file)])
    assert result.exit_code == 3 and "in the way" in result.output and "Traceback" not in result.output
    (tmp_path / "ws").mkdir()
    bad_db = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}"
    result = runner.invoke(app, ["status", "X", "--workspace", str(tmp_path / "ws"), "--db", bad_db])
    assert result.exit_code == 2 and "unable to open database file" in result.output, result.output


def test_status_json_reports_the_run(demo_run):
    result = CliRunner().invoke(
        app, ["status", "Akane Hoshino", "--workspace", str(demo_run["workspace"].root), "--json"]
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed["shows"] == []  # shows are listed only without a NAME
    report = listed["characters"][0]
    assert report["slug"] == "akane_hoshino" and report["artifacts"]["prepare"]["dataset"] > 0
    assert [step["step"] for step in report["dataset"]["filters"]][:3] == ["decode", "size", "monochrome"]
    human = CliRunner().invoke(app, ["status", "--workspace", str(demo_run["workspace"].root)], env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "dataset cleaning" in human.output and "ccip purity" in human.output


def test_empty_dataset_fails_cleanly(tmp_path, kit):
    folder = tmp_path / "mono"
    generate_dataset(folder, CHARACTERS[1], count=4, monochrome=0, near_duplicates=0, others=0)
    from PIL import Image, ImageOps

    for path in folder.glob("*.png"):
        ImageOps.grayscale(Image.open(path)).save(path)
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    store = Store(ws.default_db_url)
    settings = demo_settings(
        kit, "http://127.0.0.1:1", 'crawl.source="local"', f'crawl.from_dir="{folder}"', 'character.name="Midori Kaze"'
    )
    with pytest.raises(InputError, match=r"only 0 images left after cleaning.*prepare.min_images"):
        run_pipeline(ws, store, settings, SilentProgress())
    char = ws.character("midori_kaze")
    assert not char.artifact("prepare").exists() and not char.partial("prepare").exists()
    stages = store.character_summary("midori_kaze")["latest_run"]["stages"]
    assert (
        stages[-1]["stage"] == "prepare"
        and stages[-1]["status"] == "failed"
        and "only 0 images" in stages[-1]["error"]
    )


def test_sidecar_tags_reach_the_captions_of_full_person_crops(tmp_path, kit):
    folder = tmp_path / "mine"
    folder.mkdir()
    for image in sorted(kit.images.glob("main_*.png"))[:10]:
        shutil.copyfile(image, folder / image.name)
        (folder / image.name).with_suffix(".txt").write_text("rain, holding umbrella\n", encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    settings = demo_settings(
        kit, "http://127.0.0.1:1", 'crawl.source="local"', f'crawl.from_dir="{folder}"', 'character.name="Mine"'
    )
    run_pipeline(ws, Store(ws.default_db_url), settings, SilentProgress(), until="prepare")
    lines = (ws.character("mine").artifact("prepare") / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    person = [r["caption"] for r in records if r["group"] == "person"]
    others = [r["caption"] for r in records if r["group"] != "person"]
    assert person and all("rain" in c and "holding umbrella" in c for c in person)
    assert others and not any("holding umbrella" in c for c in others)


def test_a_prompt_suite_the_dataset_leaves_empty_is_refused_before_training(tmp_path, kit):
    """A custom prompt set that relies on the dataset's outfit clusters, for a dataset with none, is known to have
    nothing to evaluate once the dataset is made: the run stops at train, before it trains, with the fix."""
    from lorafactory.dataset.clusters import outfit_clusters

    folder = tmp_path / "few"
    folder.mkdir()
    for image in sorted(kit.images.glob("main_*.png"))[:4]:
        shutil.copyfile(image, folder / image.name)
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    store = Store(ws.default_db_url)
    settings = demo_settings(
        kit,
        "http://127.0.0.1:1",
        'crawl.source="local"',
        f'crawl.from_dir="{folder}"',
        'character.name="Few"',
        "evaluate.prompts=[]",  # the demo's own prompts gone: only the outfit clusters are left
    )
    with pytest.raises(ConfigError, match=r"has none: add \[\[evaluate.prompts\]\] entries or choose another"):
        run_pipeline(ws, store, settings, SilentProgress())
    char = ws.character("few")
    records = [json.loads(line) for line in (char.artifact("prepare") / "metadata.jsonl").read_text().splitlines()]
    assert records and not outfit_clusters([r["tags"] for r in records])
    assert not char.artifact("train").exists() and not char.partial("train").exists()
    stages = store.character_summary("few")["latest_run"]["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("crawl", "succeeded"),
        ("prepare", "succeeded"),
        ("train", "failed"),
    ]
    assert "evaluate.prompt_set 'custom'" in stages[-1]["error"]


def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    runner = CliRunner()
    ws = str(tmp_path / "ws")
    for args in (["--site", "nosuchsite"], ["--site", "danbooru", "--from-dir", str(tmp_path)]):
        result = runner.invoke(app, ["crawl", "X", *args, "--workspace", ws])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    long_name = "A Character With An Extremely Long Name " * 8  # 300+ characters: a folder name too long
    result = runner.invoke(app, ["run", long_name, "--from-dir", str(tmp_path / "missing"), "--workspace", ws])
    assert result.exit_code == 3 and "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        app, ["run", "X", "--from-dir", str(tmp_path / "missing"), "--workspace", str(tmp_path / "ws")]
    )
    assert result.exit_code == 3
    assert "does not exist" in result.output and "Traceback" not in result.output
    for command in (["status"], ["report"]):  # they read a workspace: a mistyped one is named, never made
        result = runner.invoke(app, [*command, "--workspace", str(tmp_path / "mistyped")])
        assert result.exit_code == 1 and f"workspace {tmp_path / 'mistyped'} does not exist" in result.output
    assert not (tmp_path / "mistyped").exists()
    result = runner.invoke(app, ["config", "show", "--set", "train.rnak=1", "--workspace", str(tmp_path)])
    assert result.exit_code == 2 and "unknown key 'train.rnak'" in result.output
    result = runner.invoke(
        app, ["config", "show", "--preset", "tiny-demo", "--set", "train.max_steps=12", "--workspace", str(tmp_path)]
    )
    assert result.exit_code == 0 and "max_steps = 12" in result.output and 'preset = "tiny-demo"' in result.output
    cache = tmp_path / "kit"
    result = runner.invoke(app, ["demo", "--set", "train.rnak=1", "-w", str(tmp_path / "demo"), "--cache", str(cache)])
    assert result.exit_code == 2 and "unknown key 'train.rnak'" in result.output
    assert not cache.exists()  # refused before the test kit is built


def test_help_paragraphs_wrap_at_the_terminal_width_only():
    """A docstring's line breaks inside a paragraph are not kept: at 80 columns no line of a command's longer
    help stops short of the width before its paragraph ends."""
    for command in (["anime"], ["report"], ["queue", "add"], ["fleet", "run"], ["status"]):
        shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80).output
        assert shown.count("Usage:") == 1, shown
        prose = shown.split("Usage:")[1].split("╭")[0].splitlines()[2:]  # the help text, before the panels
        paragraphs = [[]]
        for line in prose:
            paragraphs[-1].append(line.strip()) if line.strip() else paragraphs.append([])
        filled = [lines[:-1] for lines in paragraphs if len(lines) > 1]
        assert filled and all(len(line) >= 60 for lines in filled for line in lines), prose
        assert all(len(line.rstrip()) <= 80 for line in shown.splitlines())


def test_unknown_stage_names_are_config_errors(demo_run):
    from lorafactory.errors import ConfigError

    for kwargs in ({"until": "bake"}, {"force": "bake"}, {"start": "bake"}):
        with pytest.raises(ConfigError, match="unknown stage 'bake'"):
            run_pipeline(demo_run["workspace"], demo_run["store"], demo_run["settings"], SilentProgress(), **kwargs)


def test_regularization_set_is_built_once_and_trained_with(kit, tmp_path):
    from lorafactory.dataset.regularization import ensure_set
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    mains = [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:12]]
    generic = [ReplayImage(p, ["1girl", "solo"], ["someone_else"]) for p in sorted(kit.images.glob("other_*.png"))]
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    store = Store(ws.default_db_url)
    with DanbooruReplay(mains + generic) as replay:
        settings = demo_settings(
            kit,
            replay.url,
            'regularization.mode="on"',
            'regularization.tags=["solo"]',
            "train.max_steps=4",
            "train.save_every=4",
        )
        run_pipeline(ws, store, settings, SilentProgress(), until="train")
        train = ws.character("akane_hoshino").manifest("train")
        assert train.counts["regularization_images"] >= len(generic)
        requests = len(replay.requests)
        folder = ensure_set(settings, ws.root, SilentProgress())  # cached: shared, not rebuilt
        assert len(replay.requests) == requests
    captions = [p.read_text() for p in (folder / "images").glob("*.txt")]
    assert captions and not any("akane_hoshino" in c for c in captions)  # generic: no trigger
    auto_local = demo_settings(
        kit,
        "http://127.0.0.1:1",
        'crawl.source="local"',
        f'crawl.from_dir="{kit.images}"',
        'regularization.mode="auto"',
    )
    from lorafactory.dataset.regularization import wanted

    assert not wanted(auto_local, 5)  # no generic source for a local character unless from_dir is set


def test_a_regularization_set_is_used_again_after_an_upgrade_or_a_runtime_change(kit, tmp_path):
    """Sets record their settings as stages do. Another site rate, a set whose record lacks a setting at its
    default (an earlier lorafactory's, under the key it computed) and a set from before sets recorded their
    settings (under its old key) are used as they are, without a request; another cleaning setting builds anew."""
    from lorafactory.config import settings_hash
    from lorafactory.dataset.regularization import _SECTIONS, _set_settings, ensure_set
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    generic = [ReplayImage(p, ["1girl", "solo"], ["someone_else"]) for p in sorted(kit.images.glob("other_*.png"))]
    root = tmp_path / "ws"
    root.mkdir()
    with DanbooruReplay(generic) as replay:
        settings = demo_settings(kit, replay.url, 'regularization.mode="on"', 'regularization.tags=["solo"]')
        built = ensure_set(settings, root, SilentProgress())
        requests = len(replay.requests)
        faster = settings.model_copy(deep=True)
        faster.crawl.danbooru.requests_per_second = 7.0
        assert ensure_set(faster, root, SilentProgress()) == built
        earlier = built.parent.rename(built.parent.with_name("an-earlier-key"))
        for stage in ("crawl", "prepare"):
            _without_setting(earlier / stage / "manifest.json", "crawl", "page_size")  # at its default
        assert ensure_set(settings, root, SilentProgress()) == earlier / "prepare"
        generic_settings = _set_settings(settings)
        old_key = settings_hash(*(getattr(generic_settings, name) for name in _SECTIONS), settings.train.base_model)
        old = earlier.rename(earlier.with_name(old_key))
        for stage in ("crawl", "prepare"):
            manifest = json.loads((old / stage / "manifest.json").read_text())
            del manifest["settings"]
            (old / stage / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": old_key}))
        assert ensure_set(settings, root, SilentProgress()) == old / "prepare"
        assert len(replay.requests) == requests
        stricter = settings.model_copy(deep=True)
        stricter.prepare.min_side += 8
        rebuilt = ensure_set(stricter, root, SilentProgress())
        assert rebuilt not in (built, old / "prepare") and len(replay.requests) > requests


def test_two_runs_asking_for_one_regularization_set_at_once_build_it_once(kit, tmp_path):
    """Two characters' runs (a fleet's workers) ask for the same shared set together: one builds it
    while the other waits for it, instead of both writing the same folder."""
    import threading

    from lorafactory.dataset.regularization import ensure_set
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    generic = [ReplayImage(p, ["1girl", "solo"], ["someone_else"]) for p in sorted(kit.images.glob("other_*.png"))]
    root = tmp_path / "ws"
    root.mkdir()
    store = Store(f"sqlite:///{root / 'lorafactory.db'}")
    notes, folders = [], []

    class Noted(SilentProgress):
        def note(self, message):
            notes.append(message)

    with DanbooruReplay(generic) as replay:
        settings = demo_settings(kit, replay.url, 'regularization.mode="on"', 'regularization.tags=["solo"]')
        runs = [
            threading.Thread(target=lambda: folders.append(ensure_set(settings, root, Noted(), store)))
            for _ in range(2)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    assert len(folders) == 2 and folders[0] == folders[1] and (folders[0] / "metadata.jsonl").is_file()
    assert notes == ["regularization set: crawl", "regularization set: prepare"]  # built by one of the two
