"""The fleet on a real local Ray: jobs from the durable queue run as Ray tasks."""

import pytest

from conftest import demo_settings
from lorafactory.config import to_toml, tomllib
from lorafactory.demo import replay_for
from lorafactory.fleet.queue import JobQueue
from lorafactory.fleet.scheduler import run_fleet
from lorafactory.state import Store

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray per test run: these tests share a worker


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a declared GPU
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
        report = run_fleet(ws, db, poll_s=0.5)
    jobs = {job.slug: job for job in queue.jobs()}
    assert report.counts["done"] == 1 and report.counts["failed"] == 1, report.outcomes
    assert jobs["akane_hoshino"].status == "done"
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
