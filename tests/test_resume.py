"""A run killed during training resumes there: crawl and prepare are not redone."""

import signal
import subprocess
import sys
import time

import pytest

from lorafactory.demo import DEMO_CHARACTER, offline_env, replay_for
from lorafactory.state import Store
from lorafactory.workspace import Workspace


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_stop_during_train_then_resume(kit, tmp_path, how):
    ws = Workspace(tmp_path / "ws")
    with replay_for(kit) as replay:
        command = [
            sys.executable, "-m", "lorafactory", "run", DEMO_CHARACTER, "--site", "danbooru",
            "--workspace", str(ws.root), "--preset", "tiny-demo",
            "--set", f'crawl.danbooru_url="{replay.url}"', "--set", f'train.base_model="{kit.tiny_sd}"',
            "--set", "train.max_steps=300", "--set", "train.save_every=150",
        ]  # fmt: skip
        log = ws.character("akane_hoshino").partial("train") / "train_log.jsonl"
        first = subprocess.Popen(command, env=offline_env(kit), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
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

        second = subprocess.run(command, env=offline_env(kit), capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        assert sum(1 for _, path in replay.requests if path.startswith("/posts.json")) == crawl_requests  # no re-crawl

    summary = Store(ws.default_db_url).character_summary("akane_hoshino")
    stages = {s["stage"]: s["status"] for s in summary["latest_run"]["stages"]}
    assert stages == {"crawl": "skipped", "prepare": "skipped", "train": "succeeded", "evaluate": "succeeded", "release": "succeeded"}
    assert summary["runs"] == 2
    with Store(ws.default_db_url).session() as session:
        from lorafactory.state.models import Run

        killed = session.get(Run, 1)
        assert killed.status == "interrupted" and killed.stages[-1].stage == "train" and killed.stages[-1].status == "interrupted"
    assert char.manifest("release") is not None
