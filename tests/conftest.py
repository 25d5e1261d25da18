"""Shared fixtures. The stand-in model hub is built and HF_HUB_* set before anything imports huggingface_hub."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lorafactory.testing.standin_hub import build_standin_hub

KIT_ROOT = Path(tempfile.mkdtemp(prefix="lorafactory-kit-"))
atexit.register(shutil.rmtree, KIT_ROOT, ignore_errors=True)
HUB = build_standin_hub(KIT_ROOT / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(HUB)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share 2 cores: one compute thread each (and in their subprocesses) avoids
    # spin-waiting thread pools fighting over the cores, which made runs several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from lorafactory.config import load_settings  # noqa: E402
from lorafactory.demo import DEMO_CHARACTER, Kit, build_kit, replay_for  # noqa: E402
from lorafactory.progress import SilentProgress  # noqa: E402
from lorafactory.state import Store  # noqa: E402
from lorafactory.workspace import Workspace  # noqa: E402


@pytest.fixture(scope="session")
def kit() -> Kit:
    return build_kit(KIT_ROOT)


def check_tensorboard(folder, steps: int, checkpoints: list[int]) -> None:
    """The event files, read with TensorBoard's own reader: kohya's scalar names, every step once and
    each checkpoint's validation loss, across the sessions of a resumed run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "lr/embedding"} <= tags
    for tag in ("loss/current", "loss/average", "lr/unet", "lr/textencoder"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, steps + 1)), tag
    assert [e.step for e in events.Scalars("loss/validation/step_average")] == checkpoints


def fresh_compile_counters():
    """Dynamo's counters, after it forgets what this process compiled before (nothing is reused)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def demo_settings(kit: Kit, url: str, *extra: str):
    return load_settings(
        preset="tiny-demo",
        overrides=[
            f'character.name="{DEMO_CHARACTER}"',
            'crawl.source="sites"',
            f'crawl.danbooru.base_url="{url}"',
            f'train.base_model="{kit.tiny_sd}"',
            f'evaluate.clip_model="{kit.tiny_clip}"',
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def prepared(kit: Kit, tmp_path_factory):
    """The demo character crawled from the replay and prepared, nothing trained: the dataset for tests that train
    on their own (the whole demo run is built only where a test needs it: the tests marked DEMO_GROUP). Built
    once per test run: parallel workers share it (read only), the first to need it builds it."""
    from filelock import FileLock

    from lorafactory.pipeline import run_pipeline

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    workspace = Workspace(shared / "prepared-ws")
    character = workspace.character("akane_hoshino")
    with FileLock(str(shared / "prepared-ws.lock")):
        if character.manifest("prepare") is None:
            workspace.root.mkdir(exist_ok=True)
            with replay_for(kit) as replay:
                settings = demo_settings(kit, replay.url)
                run_pipeline(workspace, Store(workspace.default_db_url), settings, SilentProgress(), until="prepare")
    return character


DEMO_GROUP = pytest.mark.xdist_group("demo")  # the tests of the whole demo run share a worker: one builds it


def pytest_collection_modifyitems(items):
    """A test of the whole demo run outside DEMO_GROUP would have another worker build the run again. Slow tests
    outside a group go first: xdist hands out the groups, then the other tests in this order, so a worker never
    ends the run alone on a minute-long test begun when the other's queue ran dry (a group's tests keep their order:
    some build on what an earlier one left in a shared fixture)."""
    for item in items:
        group = item.get_closest_marker("xdist_group")
        if "demo_run" in item.fixturenames and (group is None or group.args != DEMO_GROUP.args):
            raise pytest.UsageError(f"{item.nodeid} uses demo_run: mark it (or its module) with conftest.DEMO_GROUP")
    items.sort(key=lambda item: not item.get_closest_marker("slow") or bool(item.get_closest_marker("xdist_group")))


@pytest.fixture(scope="session")
def demo_run(kit: Kit, tmp_path_factory):
    """The whole pipeline, run once per session by `lorafactory demo` as a newcomer runs it: a subprocess, the
    kit cached, everything offline (its output is kept for the test of the command). Beside it, the demo's
    settings and a replay on the address its crawl recorded, so the tests' own runs find its stages up to date."""
    import subprocess
    import sys

    from lorafactory.demo import workspace_port

    workspace = Workspace(tmp_path_factory.mktemp("demo-ws"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB")}  # the demo sets its own
    env["COLUMNS"] = "200"
    command = ["demo", "--workspace", str(workspace.root), "--cache", str(KIT_ROOT)]
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with replay_for(kit, workspace_port(workspace.root)) as replay:
        assert replay.url.endswith(f":{workspace_port(workspace.root)}"), "the demo's replay port is taken"
        settings = demo_settings(kit, replay.url)
        store = Store(workspace.default_db_url)
        yield {"workspace": workspace, "store": store, "settings": settings, "replay": replay, "command": result}


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1 for the session (CI installs Debian's postgresql)."""
    from lorafactory.testing.postgres import LocalPostgres, server_binaries

    if server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; CI does)")
    with LocalPostgres() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_server):
    """A new, empty database on the session's PostgreSQL server; its SQLAlchemy URL."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """A fresh state database: SQLite in a file, or a new database on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_database")


def queued_until_evaluate(folder, *slugs):
    """A workspace at ``folder/ws`` whose queue holds a job per slug, to run until evaluation: its folder,
    database URL and queue."""
    from lorafactory.fleet.queue import JobQueue

    ws = folder / "ws"
    ws.mkdir(parents=True)
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    for slug in slugs:
        queue.add(slug, slug.title(), {"character": {"name": slug.title()}}, until="evaluate")
    return ws, db, queue


def side_by_side_job(together: int):
    """A job whose GPU phase records where it ran (node, GPU ids), after waiting until ``together`` GPU phases
    run at once (so that many runners must exist)."""

    def job(workspace_root, db_url, claim, owner, lease_s, budget=None):
        from lorafactory.fleet.phases import BY_NAME
        from lorafactory.fleet.worker import run_job

        def phase(workspace, store, settings, claim, budget):
            import ray

            if not BY_NAME[claim.phase].gpu:
                return
            where = {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}
            (workspace.root / f"{claim.slug}.on-gpu").write_text(json.dumps(where))
            deadline = time.monotonic() + 60
            while len(list(workspace.root.glob("*.on-gpu"))) < together:
                if time.monotonic() > deadline:
                    raise RuntimeError("the other GPU phases never ran alongside")
                time.sleep(0.05)

        return run_job(workspace_root, db_url, claim, owner, lease_s, budget, run_phase=phase)

    return job


def copy_of_the_demo(demo_run, tmp_path):
    """The demo run's workspace copied, to change: its workspace, state store and character."""
    shutil.copytree(demo_run["workspace"].root, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    return workspace, Store(workspace.default_db_url), workspace.character("akane_hoshino")


class NotedProgress(SilentProgress):
    """Keeps the notes a run prints."""

    def __init__(self):
        self.notes = []

    def note(self, message):
        self.notes.append(message)


@pytest.fixture
def target_checks(monkeypatch):
    """The settings each LoRA-target preflight of a run was given (the check itself still runs)."""
    from lorafactory.train import preflight

    checked = []
    real = preflight.check_targets
    monkeypatch.setattr(preflight, "check_targets", lambda t: (checked.append(t), real(t)))
    return checked
