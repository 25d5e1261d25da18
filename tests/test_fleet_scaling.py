"""The fleet's GPU runners follow the cluster's GPUs: a real multi-node Ray on this machine (Ray's own
``cluster_utils``), GPU nodes added while the driver runs."""

import json
import threading
import time

import pytest

from conftest import queued_until_evaluate, side_by_side_job
from lorafactory.fleet import runners
from lorafactory.fleet.scheduler import run_fleet

pytestmark = pytest.mark.xdist_group("ray")  # Ray's tests take turns on one worker


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}
    nodes = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _add_gpu_node(cluster):
    node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    return node.node_id


def _drive(ws, db, **options):
    """The driver in a thread, as `fleet run` runs it; its report lands in the returned dict."""
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(report=run_fleet(ws, db, poll_s=0.2, **options)), daemon=True
    )
    thread.start()
    return thread, result


def _where(ws, slug):
    return json.loads((ws / f"{slug}.on-gpu").read_text())


def test_gpus_asked_for_wait_for_gpu_nodes_and_gpus_that_join_get_runners(cluster, tmp_path, monkeypatch):
    """`fleet run --gpus 1` on a cluster without GPUs: the datasets are made, nothing trains on a CPU, and a
    GPU node that joins (as an autoscaler adds one) takes the models. Then, by default, runners for the
    cluster's one GPU, and a second GPU node that joins gets one too: two models run side by side."""
    monkeypatch.setattr(runners, "RESIZE_EVERY_S", 0.5)
    ws, db, queue = queued_until_evaluate(tmp_path / "asked", "ai", "ruby")
    thread, result = _drive(ws, db, gpus=1, job=side_by_side_job(together=1))
    deadline = time.monotonic() + 120
    while queue.waiting("model") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue.waiting("model") == 2, [(job.slug, job.status, job.phase) for job in queue.jobs()]
    time.sleep(1.0)
    assert not list(ws.glob("*.on-gpu")) and queue.waiting("model") == 2  # no runner without a GPU took them
    first = _add_gpu_node(cluster)
    thread.join(timeout=120)
    assert not thread.is_alive() and result["report"].counts["done"] == 2, result
    assert [_where(ws, slug) for slug in ("ai", "ruby")] == [{"node": first, "gpus": ["0"]}] * 2

    ws, db, queue = queued_until_evaluate(tmp_path / "joined", "kana", "mem")
    thread, result = _drive(ws, db, job=side_by_side_job(together=2))  # one GPU now: one runner to start with
    deadline = time.monotonic() + 120
    while not list(ws.glob("*.on-gpu")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(ws.glob("*.on-gpu"))) == 1  # one model waits for a second runner
    second = _add_gpu_node(cluster)
    thread.join(timeout=120)
    assert not thread.is_alive() and result["report"].counts["done"] == 2, result
    assert {_where(ws, slug)["node"] for slug in ("kana", "mem")} == {first, second}
