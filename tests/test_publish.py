"""Publishing a release to a loopback stand-in of the Hugging Face Hub, and what a release may contain."""

import pytest
from typer.testing import CliRunner

from lorafactory.cli import app
from lorafactory.errors import ConfigError, StageError
from lorafactory.progress import SilentProgress
from lorafactory.release import hub as hub_module
from lorafactory.release.hub import commit_groups, publish_to_hub, release_files
from lorafactory.testing.fake_hub import FakeHub

TOKEN = "hf_test_write_token"


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this server is local
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_module, "RETRY_DELAY_S", 0.0)
    with FakeHub(tokens={TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def release_dir(demo_run):
    return demo_run["workspace"].character("akane_hoshino").artifact("release")


def _publish(release_dir, server, repo="akane", **kwargs):
    return publish_to_hub(release_dir, repo, private=kwargs.pop("private", True), endpoint=server.url, progress=SilentProgress(), **kwargs)


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
    done = CliRunner().invoke(app, ["publish", "Akane Hoshino", "-w", root, "--public", "--repo", "team/akane", "--endpoint", fake_hub.url])
    assert done.exit_code == 0, done.output
    assert "published" in done.output and not fake_hub.repos["team/akane"].private
    missing = CliRunner().invoke(app, ["publish", "Nobody", "-w", root, "--endpoint", fake_hub.url])
    assert missing.exit_code == 1 and "no finished release" in missing.output


def test_release_holds_no_local_path_or_secret(release_dir, demo_run):
    """Every byte of every file (model card, metrics, safetensors metadata, embeddings) is free of
    the workspace's absolute path, the test kit's paths and the replay server's address."""
    forbidden = [str(demo_run["workspace"].root), str(demo_run["settings"].train.base_model), demo_run["replay"].url, "/tmp/"]
    for name in release_files(release_dir):
        data = (release_dir / name).read_bytes()
        for text in forbidden:
            assert text.encode() not in data, f"{name} contains {text}"
