"""A run stopped during training resumes there: crawl and prepare are not redone, and training
continues from its last saved state to the same weights as an uninterrupted run."""

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import check_tensorboard
from lorafactory.config import load_settings, read_toml
from lorafactory.demo import DEMO_CHARACTER, offline_env, replay_for
from lorafactory.progress import SilentProgress
from lorafactory.state import Store
from lorafactory.train.trainer import train
from lorafactory.workspace import Workspace


@contextlib.contextmanager
def _ctrl_c_reaches_children():
    """Children started inside inherit SIGINT's default action even when this process ignores it (as a
    test run started in the background by a non-interactive shell does), so that Python in the child
    turns ctrl-c into KeyboardInterrupt as it does in a terminal."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _command(stage: str, ws: Workspace, replay_url: str, *settings: str) -> list[str]:
    """``lorafactory STAGE`` for the demo character on the tiny-demo preset, crawling the replay."""
    sets = [f'crawl.danbooru.base_url="{replay_url}"', *settings]
    head = [sys.executable, "-m", "lorafactory", stage, DEMO_CHARACTER, "--site", "danbooru"]
    return head + ["--workspace", str(ws.root), "--preset", "tiny-demo"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_stop_during_train_then_resume(kit, tmp_path, how):
    ws = Workspace(tmp_path / "ws")
    with replay_for(kit) as replay:
        command = _command(
            "run", ws, replay.url, f'train.base_model="{kit.tiny_sd}"', "train.max_steps=10", "train.save_every=5"
        )
        state = ws.character("akane_hoshino").partial("train") / "state" / "state.json"
        with _ctrl_c_reaches_children():
            first = subprocess.Popen(
                command, env=offline_env(kit), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if state.is_file() and json.loads(state.read_text())["step"] == 5:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be killed during training"
        if how == "kill":
            first.kill()
            assert first.wait() == -signal.SIGKILL
        else:
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=60) == 130  # the CLI's exit code for an interrupted run
        char = ws.character("akane_hoshino")
        assert char.manifest("crawl") and char.manifest("prepare") and char.manifest("train") is None
        crawl_requests = sum(1 for _, path in replay.requests if path.startswith("/posts.json"))

        if how == "ctrl-c":  # the resume itself is the same; the stages after train are covered once, by "kill"
            command[3] = "train"
        second = subprocess.run(command, env=offline_env(kit), capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "resuming training at step 5" in second.stderr
        assert sum(1 for _, path in replay.requests if path.startswith("/posts.json")) == crawl_requests  # no re-crawl

    summary = Store(ws.default_db_url).character_summary("akane_hoshino")
    stages = {s["stage"]: s["status"] for s in summary["latest_run"]["stages"]}
    after_train = {"evaluate": "succeeded", "release": "succeeded"} if how == "kill" else {}
    assert stages == {"crawl": "skipped", "prepare": "skipped", "train": "succeeded", **after_train}
    assert summary["runs"] == 2
    with Store(ws.default_db_url).session() as session:
        from lorafactory.state.models import Run

        killed = session.get(Run, 1)
        assert (
            killed.status == "interrupted"
            and killed.stages[-1].stage == "train"
            and killed.stages[-1].status == "interrupted"
        )
    assert (char.manifest("release") is not None) == (how == "kill")
    assert char.manifest("train").details["resumed_at"] == [5]
    check_tensorboard(char.artifact("train") / "tensorboard", steps=10, checkpoints=[5, 10])  # nothing lost
    if how == "kill":  # the resumed weights equal an uninterrupted run's (compared once)
        settings = load_settings(base=read_toml(char.config_path))
        train(settings, "akane_hoshino", char.artifact("prepare"), tmp_path / "straight", SilentProgress())
        resumed = load_file(char.artifact("train") / "checkpoints" / "step-000010" / "lora.safetensors")
        straight = load_file(tmp_path / "straight" / "checkpoints" / "step-000010" / "lora.safetensors")
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_crawl_killed_midway_resumes_without_refetching(kit, tmp_path):
    ws = Workspace(tmp_path / "ws")
    with replay_for(kit) as replay:
        replay.latency_s = 0.05
        command = _command("crawl", ws, replay.url, "crawl.danbooru.concurrency=1")
        images = ws.character("akane_hoshino").partial("crawl") / "images"
        first = subprocess.Popen(command, env=offline_env(kit), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if images.is_dir() and len([p for p in images.iterdir() if not p.name.startswith(".")]) >= 5:
                break
            time.sleep(0.02)
        assert first.poll() is None, "the crawl ended before it could be killed"
        first.kill()
        first.wait()
        landed = {p.name for p in images.iterdir() if not p.name.startswith(".")}
        second = subprocess.run(command, env=offline_env(kit), capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]

    char = ws.character("akane_hoshino")
    kept = {json.loads(line)["filename"] for line in (char.artifact("crawl") / "posts.jsonl").read_text().splitlines()}
    expected_ids = {7000000 - i for i, item in enumerate(replay.images) if "akane_hoshino" in item.character}
    assert kept == {f"danbooru_{i}{replay.images[7000000 - i].path.suffix}" for i in expected_ids}  # nothing lost
    fetched = [path.rsplit("/", 1)[-1] for _, path in replay.requests if path.startswith("/data/")]
    by_name = {replay.images[7000000 - int(name.split("_")[1].split(".")[0])].path.name: name for name in landed}
    assert all(fetched.count(source) == 1 for source in by_name)  # what had landed was never fetched again
    assert char.manifest("crawl").counts["from_archive"] >= len(landed)
