"""The fleet on a real local Ray: jobs from the durable queue run phase by phase on Ray workers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import check_tensorboard, demo_settings, queued_until_evaluate, side_by_side_job
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


KILLED_AT, STEPS = 5, 10  # a killable training: killed between its two saved states


def _killable_settings(kit, url):
    """Training long enough to be killed between its two saved states (at step 5 of 10)."""
    return demo_settings(kit, url, f"train.max_steps={STEPS}", f"train.save_every={KILLED_AT}")


def _wait_for_saved_state(ws, job_id, queue, alive, step=KILLED_AT, timeout=240):
    """Wait until the job's training saved its state at ``step``; returns the job row."""
    state = ws / "akane_hoshino" / "train.partial" / "state" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if state.is_file() and json.loads(state.read_text())["step"] == step:
            return next(job for job in queue.jobs() if job.id == job_id)
        time.sleep(0.05)
    row = next(job for job in queue.jobs() if job.id == job_id)
    raise AssertionError(f"the job ended before it could be killed during training: {row.status} {row.last_error}")


def _kill_session(leader: int) -> None:
    """SIGKILL every process of the session ``leader`` started: a driver and its local Ray. Ray's workers
    have process groups of their own, and one left to notice its raylet's death on its own may well
    finish a tiny training first, so nothing would be resumed."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    for pid, sid in (line.split() for line in listing.splitlines()):
        if int(sid) == leader:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _trained_once_and_resumed(ws):
    """The train artifact is whole: every step logged once (and in TensorBoard, with both validations), by
    a second training session that resumed the first's state at step 5."""
    from lorafactory.workspace import Workspace, damage

    char = Workspace(ws).character("akane_hoshino")
    manifest = char.manifest("train")
    assert manifest is not None and damage(char.artifact("train"), manifest) is None
    log = [json.loads(line) for line in (char.artifact("train") / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, STEPS + 1))
    assert manifest.details["resumed_at"] == [KILLED_AT]
    check_tensorboard(char.artifact("train") / "tensorboard", steps=STEPS, checkpoints=[KILLED_AT, STEPS])


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
        queue.add("akane_hoshino", good.character.name, _layers(good), until="prepare")  # the demo goes further
        report = run_fleet(ws, db, poll_s=0.5)
    jobs = {job.slug: job for job in queue.jobs()}
    assert report.counts["done"] == 1 and report.counts["failed"] == 1, report.outcomes
    assert jobs["akane_hoshino"].status == "done"
    assert jobs["nobody"].status == "failed" and "has no images" in jobs["nobody"].last_error
    assert (ws / "akane_hoshino" / "prepare" / "manifest.json").is_file()


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


def test_phases_are_routed_by_resources(local_ray):
    """The GPU phase's resident runner holds the (declared) GPU and one CPU; CPU phases get the rest."""
    from lorafactory.fleet.runners import Runners

    runners = Runners(local_ray, job=lambda *_: None)  # no job runs: nothing to import ahead
    assert len(runners.actors) == 1 and runners.cpu_slots == 1 and runners.gpus == 1
    assert len(runners.starting) == 1 and not runners.idle  # it takes jobs once it answers
    deadline = time.monotonic() + 60
    while local_ray.available_resources().get("GPU", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert local_ray.available_resources().get("GPU", 0) == 0
    for actor in list(runners.actors):
        local_ray.kill(actor)


def test_a_resident_gpu_runner_imports_the_model_libraries_as_it_starts(local_ray):
    """The fleet's GPU runner imports what a model phase runs on before its first job, not in it (the demo's
    first model waited 12 s for them, after its dataset was ready). A job here reports what its process
    has imported; each runner gets a process of its own (its own runtime environment)."""
    from lorafactory.fleet.runners import PhaseRunner

    libraries = ("diffusers.pipelines.stable_diffusion", "peft", "imgutils.metrics.ccip", "tensorboardX")

    def imported(*_):
        import sys

        return [name for name in libraries if name in sys.modules]

    runner = local_ray.remote(PhaseRunner)
    cold, warm = (
        runner.options(num_cpus=0, runtime_env={"env_vars": {"LORAFACTORY_TEST_RUNNER": name}}).remote(
            imported, warm=name == "warm"
        )
        for name in ("cold", "warm")
    )
    assert local_ray.get(cold.run.remote("", "", None, "", 0.0)) == []  # nothing of it comes with the job itself
    assert local_ray.get(warm.run.remote("", "", None, "", 0.0)) == list(libraries)
    for actor in (cold, warm):
        local_ray.kill(actor)


def test_a_runner_whose_libraries_fail_to_import_ahead_still_takes_jobs(monkeypatch, caplog):
    """A broken install must not kill the runner at every start (jobs would only see it die): it says so once,
    and its job meets the same error and reports it."""
    from lorafactory.fleet import runners

    def broken():
        raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(runners, "import_model_libraries", broken)
    runner = runners.PhaseRunner(lambda *args: args, warm=True)
    assert "did not import ahead of its jobs: libcudart.so.12" in caplog.text
    assert runner.run("ws", "db", None, "me", 1.0) == ("ws", "db", None, "me", 1.0)


def test_gpu_jobs_share_a_gpu_when_asked(tmp_path, local_ray):
    """With two jobs per GPU, two characters' GPU phases run at once on the one (declared) GPU: each
    waits until the other has started too (one GPU job at a time would time that out)."""
    from lorafactory.errors import ConfigError
    from lorafactory.fleet.runners import Runners

    with pytest.raises(ConfigError, match="jobs per GPU is 0"):
        Runners(local_ray, jobs_per_gpu=0)
    ws, db, _ = queued_until_evaluate(tmp_path, "ai", "ruby")
    report = run_fleet(ws, db, poll_s=0.2, job=side_by_side_job(together=2), jobs_per_gpu=2)
    assert report.counts["done"] == 2, report.outcomes
    assert [(o.phase, o.error) for o in report.outcomes if o.phase == "model"] == [("model", None)] * 2


def test_crawls_share_each_sites_rate_across_the_fleet(kit, tmp_path, local_ray):
    """Two crawls in two Ray worker processes at once, one site budget: together they start at most
    8 requests a second, the rate each was given."""
    from lorafactory.fleet.budget import fleet_budget

    def crawl_in_worker(settings, out_dir, budget, ready):
        from lorafactory.progress import SilentProgress
        from lorafactory.sources.crawl import crawl

        (ready / out_dir.name).touch()  # up and imported; start when the other is too (however long it took)
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        posts, _ = crawl(settings, out_dir, SilentProgress(), budget=budget)
        return len(posts)

    task = local_ray.remote(crawl_in_worker).options(num_cpus=0)
    budget = fleet_budget(local_ray)
    with replay_for(kit) as replay:
        runs = [
            demo_settings(
                kit, replay.url, "crawl.limit=10", "crawl.danbooru.requests_per_second=8", f"crawl.page_size={n}"
            )
            for n in (2, 3)  # each crawl's listing requests are told apart by their page size
        ]
        ready = tmp_path / "ready"
        ready.mkdir()
        counts = local_ray.get([task.remote(s, tmp_path / str(i), budget, ready) for i, s in enumerate(runs)])
    assert counts == [10, 10]
    listings = {
        n: [t for t, path in replay.requests if f"limit={n}&" in path or path.endswith(f"limit={n}")] for n in (2, 3)
    }
    assert min(listings[2]) < max(listings[3]) and min(listings[3]) < max(listings[2])  # the crawls overlapped
    starts = sorted(t for t, _ in replay.requests)
    busiest = max(sum(1 for t in starts if first <= t < first + 2.0) for first in starts)
    assert len(starts) >= 24
    # the fleet's rate: 8 a second, not 16. Fitted over every arrival, not taken from the first and last
    # alone: a worker's first request, stamped late on a loaded machine, once made 32 look like 8.46/s
    rate = np.polyfit(starts, np.arange(len(starts)), 1)[0]
    assert rate <= 8 * 1.1
    # and no burst: 16 in any two seconds (32 if unshared), plus the arrivals a loaded 2-core machine delays
    # into the window from the one before it (the replay stamps them in a thread of this process, after Ray's
    # round trips): a one-second window once counted 12 for 8, and a two-second one 20 for 16. At most 24,
    # halfway to the unshared count, tells the two apart without failing on that delay
    assert busiest <= 24


def test_a_worker_killed_mid_training_loses_nothing(kit, tmp_path, local_ray):
    """SIGKILL to the process training a job: the job goes back to the queue at once, resumes from
    the saved state on the retry and completes once."""
    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    with replay_for(kit) as replay:
        job = queue.add("akane_hoshino", "Akane Hoshino", _layers(_killable_settings(kit, replay.url)), until="train")
        result = {}
        driver = threading.Thread(target=lambda: result.update(report=run_fleet(ws, db, poll_s=0.5)))
        driver.start()
        row = _wait_for_saved_state(ws, job, queue, driver.is_alive)
        assert row.phase == "model" and row.worker
        os.kill(int(row.worker.rsplit(":", 1)[1]), signal.SIGKILL)
        driver.join(timeout=300)
    outcomes = [(o.phase, o.status) for o in result["report"].outcomes]
    assert outcomes == [("dataset", "queued"), ("model", "queued"), ("model", "done")], result["report"].outcomes
    assert "worker died" in result["report"].outcomes[1].error
    final = queue.jobs()[0]
    assert final.status == "done" and final.attempts == 2  # the model phase's second attempt
    _trained_once_and_resumed(ws)


@pytest.mark.slow
def test_a_killed_driver_is_replaced_without_losing_or_repeating_work(kit, tmp_path):
    """SIGKILL to `fleet run` during training: a new driver reclaims the job once its lease runs out,
    training resumes from the saved state, and the other queued character is done too."""
    from lorafactory.demo import DEMO_CHARACTER, offline_env
    from lorafactory.sources.danbooru import character_tag

    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    command = [sys.executable, "-m", "lorafactory", "fleet", "run", "--lease", "8", "--workspace", str(ws)]
    with replay_for(kit) as replay:
        settings = _killable_settings(kit, replay.url)
        job = queue.add("akane_hoshino", "Akane Hoshino", _layers(settings), priority=1, until="train")
        tags = f"crawl.tags={json.dumps([character_tag(DEMO_CHARACTER)])}"  # the replay's images
        other = demo_settings(kit, replay.url, 'character.name="Ruby Hoshino"', tags)
        queue.add("ruby_hoshino", "Ruby Hoshino", _layers(other), until="crawl")
        first = subprocess.Popen(
            command, env=offline_env(kit), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for_saved_state(ws, job, queue, lambda: first.poll() is None)
            _kill_session(first.pid)  # the driver and its local Ray, at once
            first.wait()
            second = subprocess.run(command, env=offline_env(kit), capture_output=True, text=True, timeout=400)
        finally:
            _kill_session(first.pid)  # whatever of the first driver's Ray is still there
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    jobs = {job.slug: job for job in queue.jobs()}
    assert jobs["akane_hoshino"].status == "done" and jobs["akane_hoshino"].attempts == 2
    assert jobs["ruby_hoshino"].status == "done"
    _trained_once_and_resumed(ws)
    stages = Store(db).character_summary("akane_hoshino")["latest_run"]["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("crawl", "skipped"),
        ("prepare", "skipped"),
        ("train", "succeeded"),
    ]


def test_a_model_phase_without_its_dataset_sends_the_job_back_to_the_dataset_phase(kit, tmp_path):
    """A GPU worker never crawls: a model phase whose dataset is missing (or out of date) hands the job
    back to the dataset phase, for a CPU worker, having run and recorded nothing."""
    from lorafactory.fleet.worker import run_job

    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    settings = _layers(demo_settings(kit, "http://127.0.0.1:1"))
    job = queue.add("akane_hoshino", "Akane Hoshino", settings, until="train")
    queue.claim("cpu", 60)
    queue.advance(job, "cpu", "model")  # its dataset phase went on, and the dataset is not there
    outcome = run_job(str(ws), db, queue.claim("gpu", 60), "gpu", 60)
    assert (outcome.status, outcome.phase, outcome.next_phase) == ("queued", "model", "dataset")
    assert outcome.error == "crawl is out of date (it was never finished); it must run again first"
    (row,) = queue.jobs()
    assert (row.phase, row.returns) == ("dataset", 1) and row.last_error == outcome.error
    assert not (ws / "akane_hoshino").exists() and Store(db).character_summary("akane_hoshino") is None


def test_the_dataset_phase_builds_the_regularization_set_so_the_model_phase_never_crawls(kit, tmp_path):
    """The shared regularization set a character trains with is crawled and prepared by its dataset phase,
    on a CPU worker, booking every request in the fleet's site budget: its model phase, on the GPU, sends
    no request."""
    from lorafactory.fleet.worker import run_job
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    mains = [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:12]]
    generic = [ReplayImage(p, ["1girl", "solo"], ["someone_else"]) for p in sorted(kit.images.glob("other_*.png"))]
    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    booked = []

    class Budget:  # the fleet's shared budget (a Ray actor), as the crawls use it
        async def reserve(self, site, interval):
            booked.append(site)
            return 0.0

        def pause(self, site, seconds):
            pass

    with DanbooruReplay(mains + generic) as replay:
        overrides = ('regularization.mode="on"', 'regularization.tags=["solo"]', "train.max_steps=4")
        settings = demo_settings(kit, replay.url, *overrides, "train.save_every=4")
        queue.add("akane_hoshino", "Akane Hoshino", _layers(settings), until="train")
        dataset = run_job(str(ws), db, queue.claim("cpu", 60), "cpu", 60, Budget())
        assert dataset.next_phase == "model" and list(
            (ws / "_shared" / "regularization").glob("*/prepare/manifest.json")
        )
        requests = len(replay.requests)
        assert booked == ["danbooru"] * requests  # the character's crawl and the set's: every request
        model = run_job(str(ws), db, queue.claim("gpu", 60), "gpu", 60)
        assert model.status == "done" and len(replay.requests) == requests  # the model phase crawled nothing
    train = json.loads((ws / "akane_hoshino" / "train" / "manifest.json").read_text())
    assert train["counts"]["regularization_images"] >= len(generic)


def test_out_of_gpu_memory_retries_the_job_with_lighter_settings(kit, tmp_path, monkeypatch):
    """The trainer runs out of GPU memory at step 6 (raised as CUDA raises it; there is no GPU here):
    the job is requeued at once with gradient checkpointing on, without using up an attempt, the
    state saved with the heavier settings is discarded, and the retry trains to the end."""
    import torch

    from lorafactory.fleet.worker import run_job
    from lorafactory.train import trainer

    ws = tmp_path / "ws"
    ws.mkdir()
    db = f"sqlite:///{ws / 'lorafactory.db'}"
    queue = JobQueue(Store(db))
    real_step, calls = trainer._Run.step, []

    def step_until_memory_runs_out(self):
        calls.append(1)
        if len(calls) == 6:  # after the state saved at step 4
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    with replay_for(kit) as replay:
        settings = demo_settings(kit, replay.url, "train.max_steps=8", "train.save_every=4")
        job = queue.add("akane_hoshino", "Akane Hoshino", _layers(settings), until="train")
        dataset = run_job(str(ws), db, queue.claim("me", 60), "me", 60)
    assert (dataset.status, dataset.next_phase) == ("queued", "model")
    monkeypatch.setattr(trainer._Run, "step", step_until_memory_runs_out)
    failed = run_job(str(ws), db, queue.claim("me", 60), "me", 60)
    assert failed.status == "queued" and "out of GPU memory in train" in failed.error
    row = queue.jobs()[0]
    assert row.settings["train"]["gradient_checkpointing"] is True and row.attempts == 0
    assert not (ws / "akane_hoshino" / "train.partial").exists()
    done = run_job(str(ws), db, queue.claim("me", 60), "me", 60)
    assert done.status == "done" and queue.jobs()[0].id == job
    train = json.loads((ws / "akane_hoshino" / "train" / "manifest.json").read_text())
    assert train["counts"]["steps"] == 8
    assert tomllib.loads((ws / "akane_hoshino" / "config.toml").read_text())["train"]["gradient_checkpointing"]
