"""The fleet's durable queue, on SQLite and on a real PostgreSQL server."""

import json
import re
import shutil
import threading
import time
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace

import pytest
from rich.filesize import decimal

import lorafactory.fleet.queue as queue_module
from lorafactory.fleet.queue import JobQueue
from lorafactory.state import Store
from lorafactory.workspace import utcnow


def test_concurrent_claimers_never_claim_a_job_twice(state_url):
    queue = JobQueue(Store(state_url))
    for index in range(1000):
        queue.add(f"c{index}", f"C{index}", {})
    claimed: list[int] = []
    guard = threading.Lock()

    def claimer(worker: int) -> None:
        own = JobQueue(Store(state_url))  # its own engine and connections, as another process has
        while (claim := own.claim(f"w{worker}", lease_s=600)) is not None:
            with guard:
                claimed.append(claim.id)

    threads = [threading.Thread(target=claimer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 1000 and max(Counter(claimed).values()) == 1  # 0 double claims
    assert {job.status for job in queue.jobs()} == {"running"}


def test_priority_order_and_one_active_job_per_character(state_url):
    queue = JobQueue(Store(state_url))
    low, high = queue.add("a", "A", {"x": 1}), queue.add("b", "B", {}, priority=5)
    assert queue.add("a", "A", {"x": 2}) == low  # already queued: the same job
    first = queue.claim("w", lease_s=60)
    assert (first.id, first.slug, first.attempt) == (high, "b", 1)
    assert queue.claim("w", lease_s=60).settings == {"x": 1}
    assert queue.claim("w", lease_s=60) is None
    assert queue.finish(high, "w") and not queue.finish(high, "w")  # finished once
    assert queue.add("b", "B", {}) != high  # done: a new job may be queued


def test_an_expired_lease_is_claimed_again_then_quarantined(state_url):
    queue = JobQueue(Store(state_url), max_attempts=2)
    job = queue.add("a", "A", {})
    assert queue.claim("dead-1", lease_s=0.2).attempt == 1
    assert queue.claim("w", lease_s=0.2) is None  # the lease holds
    time.sleep(0.3)
    again = queue.claim("dead-2", lease_s=0.2)
    assert again.id == job and again.attempt == 2
    assert not queue.renew(job, "dead-1", 60)  # the first worker lost it
    time.sleep(0.3)
    assert queue.claim("w", lease_s=60) is None  # two attempts died: set aside, not claimed a third time
    [record] = queue.jobs()
    assert record.status == "quarantined" and "quarantined" in record.last_error
    crashing = queue.add("b", "B", {})  # a worker that dies outright (the driver sees it) ends the same way
    for attempt in (1, 2):
        assert queue.claim("w", 60).id == crashing
        status = queue.fail(crashing, "w", "worker died: ActorDiedError", transient=True, backoff=False, crashed=True)
        assert status == ("queued" if attempt == 1 else "quarantined")


def test_retry_requeues_the_newest_ended_job_of_a_character_once(state_url):
    queue = JobQueue(Store(state_url))
    first = queue.add("a", "A", {})
    queue.claim("w", lease_s=60)
    queue.fail(first, "w", "bad", transient=False)
    second = queue.add("a", "A", {})
    queue.cancel(["a"])
    assert queue.retry(["a"]) == 1 and queue.retry([str(first)]) == 0  # one active job per character
    assert {job.id: job.status for job in queue.jobs()} == {first: "failed", second: "queued"}


def test_transient_failures_back_off_and_bad_input_fails_for_good(state_url):
    queue = JobQueue(Store(state_url), max_attempts=3)
    flaky, bad = queue.add("flaky", "Flaky", {}), queue.add("bad", "Bad", {})
    assert queue.claim("w", lease_s=60).id == flaky
    assert queue.fail(flaky, "w", "HTTP 503", transient=True) == "queued"
    assert queue.claim("w", lease_s=60).id == bad  # the flaky one waits for its backoff
    assert queue.fail(bad, "w", "image folder is empty", transient=False) == "failed"
    assert queue.claim("w", lease_s=60) is None
    by_slug = {job.slug: job for job in queue.jobs()}
    assert by_slug["flaky"].not_before is not None and by_slug["flaky"].last_error == "HTTP 503"
    assert by_slug["bad"].status == "failed" and by_slug["bad"].last_error == "image folder is empty"
    assert queue.renew(flaky, "w", 60) is False  # requeued: no longer leased


def test_queue_commands(tmp_path):
    from typer.testing import CliRunner

    from lorafactory.cli import app

    runner, ws = CliRunner(), ["--workspace", str(tmp_path / "ws")]
    names = tmp_path / "names.txt"
    names.write_text("# Arknights\nSurtr (Arknights)\nAmiya (Arknights)\n\n", encoding="utf-8")
    added = runner.invoke(app, ["queue", "add", "Akane", "--file", str(names), "--priority", "2", *ws])
    assert added.exit_code == 0 and added.output.count("queued") == 3, added.output
    secret = runner.invoke(app, ["queue", "add", "Mika", "--set", 'crawl.danbooru.key="sekrit"', *ws])
    assert secret.exit_code == 0
    listed = runner.invoke(app, ["queue", "list", "--json", *ws])
    rows = json.loads(listed.output)
    assert [r["name"] for r in rows] == ["Akane", "Surtr (Arknights)", "Amiya (Arknights)", "Mika"]
    assert all(r["status"] == "queued" for r in rows) and rows[0]["priority"] == 2
    queue = JobQueue(Store(f"sqlite:///{tmp_path / 'ws' / 'lorafactory.db'}"))
    settings = {job.name: job.settings for job in queue.jobs()}
    assert settings["Surtr (Arknights)"]["character"]["name"] == "Surtr (Arknights)"
    assert "sekrit" not in json.dumps(settings)  # credentials never enter the queue
    assert runner.invoke(app, ["queue", "cancel", "Amiya (Arknights)", *ws]).output.startswith("1 job")
    assert runner.invoke(app, ["queue", "retry", "amiya_arknights", *ws]).output.startswith("1 job")
    assert runner.invoke(app, ["queue", "retry", "amiya_arknights", *ws]).output.startswith("0 job")  # active now
    bad = runner.invoke(app, ["queue", "add", *ws])
    assert bad.exit_code == 2 and "no characters to queue" in bad.output


def test_commands_that_read_the_queue_refuse_a_workspace_that_does_not_exist(tmp_path):
    """A mistyped --workspace is named, not shown as an empty queue (nor left behind as an empty store)."""
    from typer.testing import CliRunner

    from lorafactory.cli import app

    runner, missing = CliRunner(), tmp_path / "mistyped"
    for command in (["queue", "list"], ["queue", "retry", "1"], ["queue", "cancel", "X"], ["fleet", "status"]):
        result = runner.invoke(app, [*command, "--workspace", str(missing)])
        assert result.exit_code == 1 and f"workspace {missing} does not exist" in result.output, result.output
        assert "lorafactory queue add NAME" in result.output and not missing.exists()
    ran = runner.invoke(app, ["fleet", "run", "--workspace", str(missing)])  # refused before Ray starts
    assert ran.exit_code == 1 and "does not exist" in ran.output and not missing.exists()
    added = runner.invoke(app, ["queue", "add", "Akane", "--workspace", str(missing)])  # queueing makes it
    assert added.exit_code == 0 and (missing / "lorafactory.db").is_file()
    listed = runner.invoke(app, ["queue", "list", "--json", "--workspace", str(missing)])
    assert listed.exit_code == 0 and [row["name"] for row in json.loads(listed.output)] == ["Akane"]
    elsewhere = f"sqlite:///{tmp_path / 'state.db'}"  # the store named by --db: no workspace folder needed
    shown = runner.invoke(app, ["fleet", "status", "--workspace", str(tmp_path / "none"), "--db", elsewhere])
    assert shown.exit_code == 0 and "fleet" in shown.output and not (tmp_path / "none").exists()


def test_fleet_run_refuses_at_once_a_ray_address_where_nothing_answers(tmp_path):
    """Ray would wait minutes for it, warning every few seconds; the command names the address instead."""
    import socket

    from typer.testing import CliRunner

    from lorafactory.cli import app
    from lorafactory.fleet.connect import host_and_port

    assert host_and_port("10.0.0.5:6379") == ("10.0.0.5", 6379) and host_and_port("auto") is None
    assert host_and_port("ray://head:10001") == ("head", 10001) and host_and_port("[::1]:6379") == ("::1", 6379)
    with socket.socket() as probe:  # a loopback port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "ws").mkdir()
    runner, ws = CliRunner(), ["--workspace", str(tmp_path / "ws")]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        result = runner.invoke(app, ["fleet", "run", "--address", address, *ws])
        assert result.exit_code == 2 and f"no Ray cluster answers at {address}" in result.output, result.output
        assert "--address" in result.output and time.monotonic() - started < 10
    bad = runner.invoke(app, ["fleet", "run", "--address", "head:port", *ws])
    assert bad.exit_code == 2 and "'head:port' has no valid port" in bad.output


def test_fleet_status_counts_and_eta(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorafactory.cli import app

    (tmp_path / "ws").mkdir()
    queue = JobQueue(Store(f"sqlite:///{tmp_path / 'ws' / 'lorafactory.db'}"))
    for slug in "abcde":
        queue.add(slug, slug.upper(), {})
    for outcome in ("done", "done", "failed"):
        claim = queue.claim("hostA:1:0", lease_s=60)
        if outcome == "done":
            queue.finish(claim.id, "hostA:1:0")
        else:
            queue.fail(claim.id, "hostA:1:0", "bad input", transient=False)
    queue.claim("hostB:7:3", lease_s=60)
    _record_releases(queue.store.url, (2, "succeeded"))
    now = utcnow()
    monkeypatch.setattr(queue_module, "utcnow", lambda: now)  # the summary and `fleet status` at the same moment
    summary = queue.summary()
    assert summary["by_status"] == {"done": 2, "failed": 1, "queued": 1, "running": 1}
    assert summary["running_per_host"] == {"hostB": 1} and summary["done_today"] == 2
    assert summary["failed_today"] == 1 and summary["jobs_per_day"] == 2
    assert summary["models_per_day"] == 1  # the releases made, not the jobs done
    assert summary["pace_hours"] == pytest.approx(2, abs=0.01)  # the fleet's first run started 2 h ago
    assert summary["pace_per_day"] == 24.0 and summary["eta_hours"] == 2.0  # 2 waiting at 2 jobs in 2 h
    shown = CliRunner().invoke(app, ["fleet", "status", "--workspace", str(tmp_path / "ws")])
    assert shown.exit_code == 0 and "running on hostB" in shown.output
    assert _cell(shown.output, "jobs per day at the pace") == "24.0 (of the last 2.0 h)"
    assert _cell(shown.output, "queue empty in") == "2.0 h"
    assert "models per day (last 24 h) │ 1" in shown.output and "jobs per day (last 24 h)   │ 2" in shown.output
    total = decimal(shutil.disk_usage(tmp_path / "ws").total)
    assert re.fullmatch(rf"[\d.]+ (bytes|[kMGTP]B) of {total}", _cell(shown.output, "workspace disk free"))


def test_fleet_status_suggests_pruning_when_the_workspace_disk_runs_low(tmp_path, monkeypatch):
    """Where this machine holds the workspace: its free share below 10% names `lorafactory prune`."""
    from typer.testing import CliRunner

    from lorafactory.cli import app

    (tmp_path / "ws").mkdir()
    JobQueue(Store(f"sqlite:///{tmp_path / 'ws' / 'lorafactory.db'}")).add("a", "A", {})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, free=5 * 10**10))
    shown = CliRunner().invoke(app, ["fleet", "status", "--workspace", str(tmp_path / "ws")], terminal_width=200)
    assert _cell(shown.output, "workspace disk free").startswith("50.0 GB of 1.0 TB (low: `lorafactory prune`")
    as_json = CliRunner().invoke(app, ["fleet", "status", "--workspace", str(tmp_path / "ws"), "--json"])
    assert json.loads(as_json.output)["workspace_disk"] == {"free": 5 * 10**10, "total": 10**12}
    monkeypatch.chdir(tmp_path)  # where no ./workspace is
    elsewhere = CliRunner().invoke(app, ["fleet", "status", "--db", f"sqlite:///{tmp_path / 'ws' / 'lorafactory.db'}"])
    assert "workspace disk free" not in elsewhere.output  # the default workspace is not on this machine


def _record_releases(url: str, *releases: tuple[float, str]) -> None:
    """A run per (hours ago, status) whose release stage ended then so."""
    now = utcnow()
    for hours_ago, status in releases:
        store = Store(url, clock=lambda hours=hours_ago: now - timedelta(hours=hours))
        run = store.start_run(store.ensure_character("a", "A", "a"), "hash")
        store.finish_stage(store.start_stage(run, "release", "f"), status)


def test_the_eta_follows_the_pace_since_the_earliest_run_of_the_last_day(tmp_path, monkeypatch):
    """Jobs done in the last 24 hours over the time since the earliest run still going or ended in them
    (at most 24 hours): a fleet started 30 minutes ago is not judged by a whole day."""
    from typer.testing import CliRunner

    from lorafactory.cli import app

    url = f"sqlite:///{tmp_path / 'state.db'}"
    queue = JobQueue(Store(url))
    for slug in "abcdef":
        queue.add(slug, slug.upper(), {})
    for _ in range(2):
        queue.finish(queue.claim("host:1:0", lease_s=60).id, "host:1:0")
    assert queue.summary()["pace_hours"] == 24 and queue.summary()["eta_hours"] == 48.0  # no runs: the whole day
    now = utcnow()
    monkeypatch.setattr(queue_module, "utcnow", lambda: now)  # `fleet status` reads the pace at `now`, not later

    def run(started_h: float, finished_h: float | None) -> None:
        store = Store(url, clock=lambda: now - timedelta(hours=started_h))
        run_id = store.start_run(store.ensure_character("a", "A", "a"), "hash")
        if finished_h is not None:
            store.clock = lambda: now - timedelta(hours=finished_h)
            store.finish_run(run_id, "succeeded")

    run(30, 25)  # ended before the last day: not counted
    run(0.5, None)
    summary = queue.summary(now)
    assert summary["pace_hours"] == 0.5 and summary["pace_per_day"] == 96.0 and summary["eta_hours"] == 1.0
    shown = CliRunner().invoke(app, ["fleet", "status", "--db", url])
    assert _cell(shown.output, "jobs per day at the pace") == "96.0 (of the last 30 min)", shown.output
    assert _cell(shown.output, "queue empty in") == "1.0 h"
    run(30, 23)  # began before the last day and ended in it: the window is the whole day
    assert queue.summary(now)["pace_hours"] == 24 and queue.summary(now)["eta_hours"] == 48.0
    for _ in range(4):
        queue.finish(queue.claim("host:1:0", lease_s=60).id, "host:1:0")
    assert queue.summary(now)["eta_hours"] == 0.0
    assert _cell(CliRunner().invoke(app, ["fleet", "status", "--db", url]).output, "queue empty in") == "0.0 h"


def _cell(table: str, label: str) -> str:
    """The value beside ``label`` in a two-column table as rich prints it."""
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in table.splitlines() if "│" in line]
    return next(value for name, value in rows if name == label)


def test_models_per_day_counts_the_releases_made_in_the_last_24_hours(state_url):
    """A job whose stages were all up to date made no model: only releases that ran and succeeded count."""
    queue = JobQueue(Store(state_url))
    _record_releases(
        state_url, (2, "succeeded"), (23.9, "succeeded"), (1, "skipped"), (1, "failed"), (24.1, "succeeded")
    )
    assert queue.summary()["models_per_day"] == 2


def test_jobs_go_phase_by_phase_each_claimed_by_its_kind_of_worker(state_url):
    from lorafactory.fleet.phases import CPU_PHASES, GPU_PHASES

    queue = JobQueue(Store(state_url))
    job = queue.add("a", "A", {"x": 1})
    assert queue.claim("gpu", 60, GPU_PHASES) is None  # a new job builds its dataset first, on a CPU
    dataset = queue.claim("cpu", 60, CPU_PHASES)
    assert (dataset.id, dataset.phase) == (job, "dataset")
    assert queue.renew(job, "cpu", 60, worker="node1:42")
    assert queue.advance(job, "cpu", "model") and not queue.advance(job, "cpu", "model")  # not its lease any more
    assert queue.waiting("model") == 1 and queue.claim("cpu", 60, CPU_PHASES) is None
    model = queue.claim("gpu", 60, GPU_PHASES)
    assert (model.phase, model.attempt) == ("model", 1)  # attempts count per phase
    assert queue.summary()["running_per_phase"] == {"model": 1}
    # an out-of-memory retry with lighter settings does not use up an attempt
    assert queue.fail(job, "gpu", "out of GPU memory", transient=True, backoff=False, settings={"x": 2}) == "queued"
    again = queue.claim("gpu", 60, GPU_PHASES)
    assert (again.settings, again.attempt) == ({"x": 2}, 1)
    assert queue.pending()
    queue.finish(job, "gpu")
    assert not queue.pending()


def test_a_job_goes_back_to_an_earlier_phase_a_bounded_number_of_times(state_url):
    """Workers that keep disagreeing on what is up to date (different lorafactory versions) would pass a
    job back and forth for ever: after MAX_RETURNS it fails, saying so; a retry starts the count again."""
    from lorafactory.fleet.phases import CPU_PHASES, GPU_PHASES
    from lorafactory.fleet.queue import MAX_RETURNS

    queue = JobQueue(Store(state_url))
    job = queue.add("a", "A", {"x": 1})

    def to_the_gpu():
        queue.claim("cpu", 60, CPU_PHASES)
        assert queue.advance(job, "cpu", "model") and queue.claim("gpu", 60, GPU_PHASES).phase == "model"

    for returns in range(1, MAX_RETURNS + 1):
        to_the_gpu()
        assert queue.send_back(job, "someone else", "dataset", "crawl is out of date") == "lost"
        assert queue.send_back(job, "gpu", "dataset", "crawl is out of date") == "queued"
        (row,) = queue.jobs()
        assert (row.status, row.phase, row.attempts, row.returns) == ("queued", "dataset", 0, returns)
        assert row.last_error == "crawl is out of date" and queue.claim("gpu", 60, GPU_PHASES) is None
    to_the_gpu()
    assert queue.send_back(job, "gpu", "dataset", "crawl is out of date") == "failed"
    (row,) = queue.jobs()
    assert row.last_error == (
        f"crawl is out of date; sent back {MAX_RETURNS} times already: run one lorafactory version on every worker"
    )
    assert queue.retry(["a"]) == 1 and queue.jobs()[0].returns == 0


def test_the_phases_a_job_goes_through():
    from lorafactory.fleet.phases import BY_NAME, last_stage, next_phase

    assert next_phase("dataset", "release") == "model" and next_phase("model", "release") == "release"
    assert next_phase("release", "release") is None and next_phase("release", "publish") == "publish"
    assert next_phase("dataset", "crawl") is None and last_stage(BY_NAME["dataset"], "crawl") == "crawl"
    assert next_phase("dataset", "train") == "model" and last_stage(BY_NAME["model"], "train") == "train"
    assert last_stage(BY_NAME["model"], "publish") == "evaluate" and next_phase("publish", "publish") is None


def test_lighter_settings_after_running_out_of_gpu_memory():
    import torch

    from lorafactory.config import deep_merge, load_settings
    from lorafactory.errors import StageError
    from lorafactory.fleet.memory import lighter, out_of_memory

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError as oom:
            raise StageError("out of GPU memory while training") from oom
    except StageError as wrapped:
        assert out_of_memory(wrapped)
    assert not out_of_memory(StageError("no images"))
    layers: dict = {"train": {"batch_size": 3, "gradient_accumulation": 2}, "evaluate": {"batch_size": 2}}
    seen = []
    while (layer := lighter(load_settings(base=layers), "train")) is not None:
        layers = deep_merge(layers, layer)
        seen.append((layers["train"].get("gradient_checkpointing"), layers["train"]["batch_size"]))
        t = layers["train"]
        assert t["batch_size"] * t["gradient_accumulation"] >= 6  # each step still sees as many images
    assert seen == [(True, 3), (True, 1)]
    assert lighter(load_settings(base=layers), "evaluate") == {"evaluate": {"batch_size": 1}}
    assert lighter(load_settings(base=deep_merge(layers, {"evaluate": {"batch_size": 1}})), "evaluate") is None


def test_lighter_settings_train_about_as_many_samples_as_the_planned_run():
    """With the step count planned from the dataset's size, each lighter retry (smaller batch, more
    accumulation) plans a run over as many images, give or take one checkpoint interval's worth."""
    from lorafactory.config import deep_merge, load_settings
    from lorafactory.fleet.memory import lighter
    from lorafactory.train.length import planned_schedule, samples_per_step

    for start in ({"batch_size": 4}, {"batch_size": 5}, {"batch_size": 3, "gradient_accumulation": 2}):
        layers: dict = {"train": {**start, "gradient_checkpointing": True}}
        first = load_settings(base=layers).train
        assert first.max_steps is None  # the preset's default: planned from the dataset's size
        planned = planned_schedule(first, 200)[0] * samples_per_step(first)
        while (layer := lighter(load_settings(base=layers), "train")) is not None:
            layers = deep_merge(layers, layer)
            t = load_settings(base=layers).train
            assert samples_per_step(t) >= samples_per_step(first)
            steps, _ = planned_schedule(t, 200)
            assert abs(steps * samples_per_step(t) - planned) <= t.save_every * samples_per_step(t)
        assert load_settings(base=layers).train.batch_size == 1


def test_queue_add_copyright_queues_its_most_popular_characters(kit, tmp_path):
    from typer.testing import CliRunner

    from lorafactory.cli import app
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    images = sorted(kit.images.glob("main_*.png"))
    tagged = {"surtr_(arknights)": 3, "texas_the_omertosa_(arknights)": 2, "w_(arknights)": 1, "hatsune_miku": 4}
    items = [ReplayImage(images[i], ["1girl"], [tag]) for tag, n in tagged.items() for i in range(n)]
    runner, ws = CliRunner(), ["--workspace", str(tmp_path / "ws")]
    with DanbooruReplay(items) as replay:
        site = ["--set", f'crawl.danbooru.base_url="{replay.url}"']
        added = runner.invoke(app, ["queue", "add", "--copyright", "Arknights", "--top", "2", *site, *ws])
        unknown = runner.invoke(app, ["queue", "add", "--copyright", "Blue Archive", *site, *ws])
        elsewhere = runner.invoke(app, ["queue", "add", "--copyright", "arknights", "--site", "gelbooru", *ws])
    assert added.exit_code == 0, added.output
    assert "Surtr (Arknights) (3 posts on danbooru)" in added.output
    store = Store(f"sqlite:///{tmp_path / 'ws' / 'lorafactory.db'}")
    jobs = JobQueue(store).jobs()
    assert [job.name for job in jobs] == ["Surtr (Arknights)", "Texas the Omertosa (Arknights)"]  # most posts first
    texas = store.character_summary("texas_the_omertosa_arknights")
    assert (texas["copyright"], texas["popularity"]) == ("arknights", 2)  # as the site's tags spell it
    assert store.site_tag("danbooru", "Texas the Omertosa (Arknights)") == ("texas_the_omertosa_(arknights)", 2)
    assert unknown.exit_code == 3 and "lists no character tagged *_(blue_archive)" in unknown.output
    assert elsewhere.exit_code == 2 and "pass --site danbooru" in elsewhere.output


def test_the_fleet_demo_reports_each_character_once_by_its_latest_job(tmp_path):
    """A rerun of `demo --fleet` queues every character again: the demo lists each one once, as its newest job
    ended (a done job points at the release, a failed one says why)."""
    from lorafactory.cli.demo import fleet_outcomes
    from lorafactory.workspace import Workspace

    queue = JobQueue(Store(f"sqlite:///{tmp_path / 'state.db'}"))
    for _ in range(2):
        for slug in ("akane", "sora"):
            queue.add(slug, slug.title(), {})
            claim = queue.claim("w", lease_s=60)
            if claim.slug == "sora" and claim.id > 2:
                queue.fail(claim.id, "w", "no images found", transient=False)
            else:
                queue.finish(claim.id, "w")
    workspace = Workspace(tmp_path / "ws")
    assert fleet_outcomes(queue, workspace) == [
        f"Akane: done — {workspace.character('akane').artifact('release')}",
        "Sora: failed — no images found",
    ]
