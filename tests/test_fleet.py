"""The fleet on a real local Ray: jobs from the durable queue run as Ray tasks."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import demo_settings
from lorafactory.config import to_toml, tomllib
from lorafactory.demo import replay_for
from lorafactory.fleet.queue import JobQueue
from lorafactory.fleet.scheduler import run_fleet
from lorafactory.state import Store
from lorafactory.workspace import Workspace

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray per test run: these tests share a worker


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _layers(settings):
    return tomllib.loads(to_toml(settings))


def test_the_fleet_runs_the_queue_and_bad_input_fails_only_its_job(kit, tmp_path, local_ray):
    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    empty = tmp_path / "empty"
    empty.mkdir()
    with replay_for(kit) as replay:
        good = demo_settings(kit, replay.url)
        bad = demo_settings(
            kit, replay.url, 'crawl.source="local"', f'crawl.from_dir="{empty}"', 'character.name="Nobody"'
        )
        queue.add("nobody", "Nobody", _layers(bad), priority=1)
        queue.add("akane_hoshino", good.character.name, _layers(good))
        report = run_fleet(ws, db, lease_s=30, poll_s=0.5)
    jobs = {job.slug: job for job in queue.jobs()}
    assert report.counts == {"done": 1, "failed": 1}
    assert jobs["akane_hoshino"].status == "done" and jobs["akane_hoshino"].attempts == 1
    assert jobs["nobody"].status == "failed" and "has no images" in jobs["nobody"].last_error
    assert (ws / "akane_hoshino" / "release" / "manifest.json").is_file()


def test_fleet_run_command(tmp_path, local_ray):
    from typer.testing import CliRunner

    from lorafactory.cli import app

    runner, ws = CliRunner(), ["--workspace", str(tmp_path / "ws")]
    empty = tmp_path / "empty"
    empty.mkdir()
    source = ["--set", 'crawl.source="local"', "--set", f'crawl.from_dir="{empty}"', "--until", "crawl"]
    assert runner.invoke(app, ["queue", "add", "Nobody", "--preset", "tiny-demo", *source, *ws]).exit_code == 0
    result = runner.invoke(app, ["fleet", "run", *ws])
    assert result.exit_code == 0, result.output
    assert "Nobody" in result.output and "failed" in result.output and "has no images" in result.output


def test_every_node_must_see_the_workspace(tmp_path, local_ray):
    from lorafactory.fleet.scheduler import PROBE, check_shared_workspace, nodes_missing_workspace

    check_shared_workspace(local_ray, tmp_path)  # the local node sees it
    assert not (tmp_path / PROBE).exists()
    assert nodes_missing_workspace("t", {"10.0.0.1": "t", "10.0.0.2": None, "10.0.0.3": "old"}) == [
        "10.0.0.2",
        "10.0.0.3",
    ]


def _ray_task_pid(name: str) -> int:
    """The Ray worker whose title is ``ray::<name>``: the oldest such process, since the children a
    worker forks carry its title until they exec."""
    started = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                    started[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[19])
            except (OSError, IndexError, ValueError):
                continue
    assert started, f"no process runs ray::{name}"
    return min(started, key=started.get)


def test_a_worker_killed_during_training_is_retried_and_the_job_completes_once(kit, tmp_path, local_ray):
    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    state = ws / "akane_hoshino" / "train.partial" / "state" / "state.json"
    with replay_for(kit) as replay:
        settings = demo_settings(kit, replay.url, "train.max_steps=60", "train.save_every=30")
        job = queue.add("akane_hoshino", settings.character.name, _layers(settings))
        result = {}
        driver = threading.Thread(target=lambda: result.update(report=run_fleet(ws, db, lease_s=30, poll_s=0.2)))
        driver.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] == 30):
            time.sleep(0.05)
        os.kill(_ray_task_pid("run_job"), signal.SIGKILL)  # mid-training, after the first checkpoint
        driver.join(timeout=300)
    assert [o.status for o in result["report"].outcomes] == ["queued", "done"]
    [record] = queue.jobs()
    assert record.id == job and record.status == "done" and record.attempts == 2
    char = Workspace(ws).character("akane_hoshino")
    assert char.manifest("release") is not None and len(char.manifest("train").details["checkpoints"]) == 2
    runs = Store(db).character_summary("akane_hoshino")
    assert runs["runs"] == 2 and runs["latest_run"]["status"] == "succeeded"
