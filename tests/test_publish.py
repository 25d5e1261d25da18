"""Publishing a release to loopback stand-ins of the Hugging Face Hub and Civitai, and what a release may contain."""

import json

import pytest
from typer.testing import CliRunner

from conftest import DEMO_GROUP
from lorafactory.cli import app
from lorafactory.errors import ConfigError, StageError
from lorafactory.progress import SilentProgress
from lorafactory.release import remote
from lorafactory.release.civitai import NSFW_LEVELS, publish_to_civitai
from lorafactory.release.hub import commit_groups, publish_to_hub, release_files
from lorafactory.release.publish import CIVITAI_STATE, civitai_plan, parse_parameters
from lorafactory.state.lock import acquire
from lorafactory.testing.fake_civitai import FakeCivitai
from lorafactory.testing.fake_hub import FakeHub

TOKEN = "hf_test_write_token"
pytestmark = DEMO_GROUP


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", False
    )  # the suite runs offline; this server is local
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(remote, "RETRY_DELAY_S", 0.0)
    with FakeHub(tokens={TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def release_dir(demo_run):
    return demo_run["workspace"].character("akane_hoshino").artifact("release")


def _publish(release_dir, server, repo="akane", **kwargs):
    return publish_to_hub(
        release_dir,
        repo,
        private=kwargs.pop("private", True),
        endpoint=server.url,
        progress=SilentProgress(),
        **kwargs,
    )


def test_publish_creates_the_repo_and_a_rerun_uploads_nothing(release_dir, fake_hub):
    files = release_files(release_dir)
    assert "README.md" in files and "manifest.json" not in files and any(f.startswith("steps/") for f in files)
    dry = _publish(release_dir, fake_hub, dry_run=True)
    assert dry.dry_run and dry.uploaded == files and fake_hub.repos == {}  # nothing contacted

    report = _publish(release_dir, fake_hub)
    repo = fake_hub.repos["tester/akane"]  # a bare name goes under the token's owner
    assert report.target.endswith("/tester/akane") and repo.private
    assert set(repo.files) == set(files) and all(repo.files[f] == (release_dir / f).read_bytes() for f in files)
    assert repo.commits[-1] == "lorafactory: model card and best step" and fake_hub.uploads[-1] == "README.md"
    assert len(repo.commits) == len(commit_groups(files))

    again = _publish(release_dir, fake_hub)
    assert again.uploaded == [] and sorted(again.unchanged) == files and len(fake_hub.uploads) == len(files)


def test_interrupted_publish_resumes_without_duplicate_uploads(release_dir, fake_hub):
    files = release_files(release_dir)
    fake_hub.commit_faults = [0, 503, 503, 503]  # the first commit lands, the second fails every retry
    with pytest.raises(StageError, match="rerun `lorafactory publish` to resume"):
        _publish(release_dir, fake_hub, repo="tester/half")
    landed = set(fake_hub.repos["tester/half"].files)
    assert landed and landed < set(files)
    fake_hub.commit_faults = [503]  # one transient failure is retried
    report = _publish(release_dir, fake_hub, repo="tester/half")
    assert sorted(report.uploaded) == sorted(set(files) - landed) and sorted(report.unchanged) == sorted(landed)
    assert sorted(fake_hub.uploads) == files  # every file sent exactly once


def test_bad_token_and_missing_token_are_one_line_errors(release_dir, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ConfigError, match=r"rejected the token \(401\).*set HF_TOKEN"):
        _publish(release_dir, fake_hub, repo="tester/x")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="needs a token: set HF_TOKEN"):
        _publish(release_dir, fake_hub, repo="tester/x")
    assert fake_hub.repos == {} and fake_hub.uploads == []


def test_publish_command(demo_run, fake_hub):
    root = str(demo_run["workspace"].root)
    dry = CliRunner().invoke(app, ["publish", "Akane Hoshino", "-w", root, "--dry-run", "--endpoint", fake_hub.url])
    assert dry.exit_code == 0, dry.output
    assert "would upload" in dry.output and "README.md" in dry.output and fake_hub.repos == {}
    done = CliRunner().invoke(
        app, ["publish", "Akane Hoshino", "-w", root, "--public", "--repo", "team/akane", "--endpoint", fake_hub.url]
    )
    assert done.exit_code == 0, done.output
    assert "published" in done.output and "files uploaded" in done.output and not fake_hub.repos["team/akane"].private
    status = CliRunner().invoke(app, ["status", "Akane Hoshino", "-w", root, "--json"])
    latest = json.loads(status.output)["characters"][0]["publications"][0]  # recorded in the state store, newest first
    assert latest["target"] == "huggingface" and latest["url"].endswith("/team/akane") and latest["uploaded"] > 0
    missing = CliRunner().invoke(app, ["publish", "Nobody", "-w", root, "--endpoint", fake_hub.url])
    assert missing.exit_code == 3 and "no finished release" in missing.output
    held = acquire(demo_run["store"], "akane_hoshino")  # a run (or another publish) holds the character
    try:
        busy = CliRunner().invoke(app, ["publish", "Akane Hoshino", "-w", root, "--endpoint", fake_hub.url])
    finally:
        held.release()
    assert busy.exit_code == 6 and "is being run by another lorafactory" in busy.output


def test_release_holds_no_local_path_or_secret(release_dir, demo_run):
    """Every byte of every file (model card, metrics, safetensors metadata, embeddings) is free of
    the workspace's absolute path, the test kit's paths and the replay server's address."""
    forbidden = [
        str(demo_run["workspace"].root),
        str(demo_run["settings"].train.base_model),
        demo_run["replay"].url,
        "/tmp/",
    ]
    for name in release_files(release_dir):
        data = (release_dir / name).read_bytes()
        for text in forbidden:
            assert text.encode() not in data, f"{name} contains {text}"


CIVITAI_KEY = "civitai-test-key"


@pytest.fixture()
def fake_civitai(monkeypatch):
    monkeypatch.setenv("CIVITAI_API_KEY", CIVITAI_KEY)
    monkeypatch.setattr(remote, "RETRY_DELAY_S", 0.0)
    with FakeCivitai(tokens={CIVITAI_KEY}) as server:
        yield server


@pytest.fixture()
def civitai_char(demo_run, tmp_path):
    """A copy of the demo character, so the Civitai state file starts empty in every test."""
    import shutil

    from lorafactory.workspace import Workspace

    root = tmp_path / "ws"
    shutil.copytree(demo_run["workspace"].character("akane_hoshino").path, root / "akane_hoshino")
    return Workspace(root).character("akane_hoshino")


def _to_civitai(char, settings, server, **kwargs):
    plan = civitai_plan(char, settings, "akane_hoshino")
    key = char.manifest("release").fingerprint
    return publish_to_civitai(
        plan, char.path / CIVITAI_STATE, key, base_url=server.url, progress=SilentProgress(), **kwargs
    )


def test_a1111_parameters_become_civitai_metadata():
    text = (
        "best quality, akane\nNegative prompt: lowres, bad hands\nSteps: 25, Sampler: "
        "DPM++ 2M Karras, CFG scale: 7.0, Seed: 1234, Size: 512x768, Clip skip: 2"
    )
    assert parse_parameters(text) == {
        "prompt": "best quality, akane",
        "negativePrompt": "lowres, bad hands",
        "steps": 25,
        "sampler": "DPM++ 2M Karras",
        "cfgScale": 7.0,
        "seed": 1234,
        "Size": "512x768",
        "clipSkip": 2,
    }


def test_civitai_publish_uploads_model_version_file_and_previews(civitai_char, demo_run, fake_civitai):
    settings = demo_run["settings"]
    dry = _to_civitai(civitai_char, settings, fake_civitai, dry_run=True)
    assert dry.dry_run and dry.done[0] == "create model" and fake_civitai.requests == []

    report = _to_civitai(civitai_char, settings, fake_civitai)
    release = civitai_char.artifact("release")
    [model] = fake_civitai.models.values()
    [version] = fake_civitai.versions.values()
    [registered] = fake_civitai.files.values()
    assert model["type"] == "LORA" and model["name"] == "Akane Hoshino" and model["published"]
    assert "Forge and ComfyUI do not" in model["description"]  # the bundled embedding is A1111's alone
    assert (
        version["baseModel"] == "SD 1.5"
        and version["trainedWords"] == ["akane_hoshino"]
        and version["modelId"] == model["id"]
    )
    assert (
        fake_civitai.objects[registered["url"]] == (release / "akane_hoshino.safetensors").read_bytes()
    )  # reassembled from parts
    assert sum(r.startswith("PUT /s3/") for r in fake_civitai.requests) > 1  # really multipart
    previews = sorted(p.name for p in (release / "previews").glob("*.png"))
    assert sorted(i["name"] for i in fake_civitai.images.values()) == previews
    assert all(
        i["nsfw"] in NSFW_LEVELS.values() and i["meta"]["prompt"] and i["meta"]["seed"]
        for i in fake_civitai.images.values()
    )
    assert report.model_url.endswith(f"/models/{model['id']}") and not report.skipped

    again = _to_civitai(civitai_char, settings, fake_civitai)
    assert again.done == [] and len(again.skipped) == len(report.done)
    assert len(fake_civitai.models) == len(fake_civitai.versions) == len(fake_civitai.files) == 1


def test_civitai_publish_resumes_after_a_failure_without_duplicates(civitai_char, demo_run, fake_civitai):
    fake_civitai.faults["post.addImage"] = [500, 500, 500]  # the first image fails every retry
    with pytest.raises(StageError, match="resume"):
        _to_civitai(civitai_char, demo_run["settings"], fake_civitai)
    assert len(fake_civitai.files) == 1 and fake_civitai.images == {}
    report = _to_civitai(civitai_char, demo_run["settings"], fake_civitai)
    assert "create model" in report.skipped and "upload akane_hoshino.safetensors" in report.skipped
    assert (
        len(fake_civitai.models)
        == len(fake_civitai.versions)
        == len(fake_civitai.files)
        == len(fake_civitai.posts)
        == 1
    )
    assert len(fake_civitai.images) == len(list((civitai_char.artifact("release") / "previews").glob("*.png")))
    assert sum(r == "POST /api/upload" for r in fake_civitai.requests) == 1  # the LoRA was uploaded once


def test_civitai_bad_key_and_the_command(civitai_char, demo_run, fake_civitai, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_KEY", "wrong")
    with pytest.raises(ConfigError, match="rejected the API key.*CIVITAI_API_KEY"):
        _to_civitai(civitai_char, demo_run["settings"], fake_civitai)
    assert fake_civitai.models == {}
    root = str(civitai_char.path.parent)
    command = ["publish", "Akane Hoshino", "-w", root, "--to", "civitai"]
    command += ["--set", f'release.civitai_url="{fake_civitai.url}"']
    result = CliRunner().invoke(app, [*command, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Civitai steps" in result.output and "upload akane_hoshino.safetensors" in result.output
    monkeypatch.setenv("CIVITAI_API_KEY", CIVITAI_KEY)
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 0, done.output
    [model] = fake_civitai.models.values()
    assert f"published {fake_civitai.url}/models/{model['id']}: " in done.output and "steps done" in done.output
    listed = json.loads(CliRunner().invoke(app, ["status", "Akane Hoshino", "-w", root, "--json"]).output)
    status = listed["characters"][0]
    assert (
        status["publications"][0]["url"].endswith(f"/models/{model['id']}")
        and status["publications"][0]["target"] == "civitai"
    )


def test_a_fleet_job_queued_until_publish_publishes_its_release(demo_run, fake_hub, tmp_path):
    """The fleet's publish phase (in-process here): the release goes to the Hub with the worker's
    own HF_TOKEN, the publication is recorded, and the job is done."""
    import shutil

    from lorafactory.config import to_toml, tomllib
    from lorafactory.fleet.queue import JobQueue
    from lorafactory.fleet.worker import run_job
    from lorafactory.state import Store

    ws = tmp_path / "ws"
    shutil.copytree(demo_run["workspace"].character("akane_hoshino").path, ws / "akane_hoshino")
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    settings = demo_run["settings"].model_copy(deep=True)
    settings.release.publish_to, settings.release.hf_endpoint = ["huggingface"], fake_hub.url
    job = queue.add("akane_hoshino", "Akane Hoshino", tomllib.loads(to_toml(settings)), until="publish")
    assert queue.claim("me", 60).phase == "dataset"
    queue.advance(job, "me", "publish")  # its earlier phases are done: the copied folder holds them
    outcome = run_job(str(ws), db, queue.claim("me", 60), "me", 60)
    assert (outcome.phase, outcome.status) == ("publish", "done"), outcome
    assert "README.md" in fake_hub.repos["tester/akane_hoshino"].files
    assert Store(db).character_summary("akane_hoshino")["publications"][0]["target"] == "huggingface"
