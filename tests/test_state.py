import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect

from lorafactory.errors import CharacterBusy
from lorafactory.state import Store
from lorafactory.state.lock import STALE_S, acquire
from lorafactory.state.models import SCHEMA_VERSION, CharacterLock, Run


def test_schema_and_records(state_url):
    store = Store(state_url)
    assert store.schema_version == SCHEMA_VERSION
    assert {"characters", "runs", "stage_executions", "checkpoints", "metrics", "schema_info"} <= set(
        inspect(store.engine).get_table_names()
    )
    character = store.ensure_character("alice", "Alice", "alice")
    assert store.ensure_character("alice", "Alice", "alice") == character
    run = store.start_run(character, "cfg")
    stage = store.start_stage(run, "crawl", "fp")
    store.finish_stage(stage, "failed", "no images", counts={"raw": 0})
    store.record_checkpoints(run, {10: "a", 20: "b"}, {10: {"ccip": 0.5}, 20: {"ccip": None}}, kept=[10])
    store.finish_run(run, "failed", "crawl: no images")
    summary = store.character_summary("alice")
    assert summary["latest_run"]["status"] == "failed"
    assert summary["latest_run"]["stages"][0] == {
        **summary["latest_run"]["stages"][0],
        "status": "failed",
        "error": "no images",
    }
    assert summary["checkpoints"] == [
        {"step": 10, "selected": True, "kept_rank": 1, "metrics": {"ccip": 0.5}},
        {"step": 20, "selected": False, "kept_rank": None, "metrics": {"ccip": None}},
    ]
    # a second handle (as another worker would open) sees the same state
    assert Store(store.url).character_summary("alice")["runs"] == 1


def test_runs_of_dead_processes_become_interrupted(state_url):
    store = Store(state_url)
    character = store.ensure_character("bob", "Bob", "bob")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = store.start_run(character, "cfg")
    store.start_stage(run, "train", "fp")
    with store.session() as session:
        session.get(Run, run).pid = int(dead.stdout)
    store.start_run(character, "cfg")
    first = store.character_summary("bob")
    with store.session() as session:
        stale = session.get(Run, run)
        assert stale.status == "interrupted"
        assert stale.stages[0].status == "interrupted"
    assert first["runs"] == 2


def _dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_a_second_run_of_a_character_is_refused_with_one_line(state_url):
    store = Store(state_url)
    held = acquire(store, "carol")
    with pytest.raises(CharacterBusy) as info:
        acquire(Store(store.url), "carol")  # another handle, as another process opens it
    message = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "--wait" in message and "\n" not in message
    acquire(store, "dave").release()  # other characters are free
    held.release()
    acquire(store, "carol").release()  # released: free again


def test_a_dead_holders_lock_is_recovered(state_url):
    store = Store(state_url)
    now = datetime.now(timezone.utc)
    with store.session() as session:  # a killed run on this host, and a silent one on another machine
        session.add(
            CharacterLock(
                slug="erin", token="x", host=socket.gethostname(), pid=_dead_pid(), acquired_at=now, heartbeat_at=now
            )
        )
        old = now - timedelta(seconds=STALE_S + 5)
        session.add(CharacterLock(slug="finn", token="y", host="elsewhere", pid=1, acquired_at=old, heartbeat_at=old))
        session.add(CharacterLock(slug="gus", token="z", host="elsewhere", pid=1, acquired_at=now, heartbeat_at=now))
    acquire(store, "erin").release()
    acquire(store, "finn").release()
    with pytest.raises(CharacterBusy, match="on elsewhere"):
        acquire(store, "gus")  # a fresh heartbeat from another machine: alive


def test_wait_takes_the_lock_once_the_holder_is_done_and_heartbeats_keep_it(state_url):
    store = Store(state_url)
    held = acquire(store, "hal", heartbeat_s=0.05)
    timer = threading.Timer(0.6, held.release)
    timer.start()
    started = time.monotonic()
    waited = acquire(Store(store.url), "hal", wait=True, poll_s=0.05, stale_s=0.3)  # stale_s < the hold: beats
    assert time.monotonic() - started >= 0.55
    waited.check()
    waited.release()


def test_status_never_shows_a_dead_run_as_running(state_url):
    store = Store(state_url)
    character = store.ensure_character("ivy", "Ivy", "ivy")
    run = store.start_run(character, "cfg")
    with store.session() as session:  # a run on another machine whose lock is gone (it died there)
        record = session.get(Run, run)
        record.host, record.pid = "elsewhere", 1
    assert store.character_summary("ivy")["latest_run"]["status"] == "interrupted"


def test_the_cli_refuses_a_run_while_another_holds_the_character(tmp_path):
    from typer.testing import CliRunner

    from lorafactory.cli import app

    workspace = tmp_path / "ws"
    workspace.mkdir()
    held = acquire(Store(f"sqlite:///{workspace / 'lorafactory.db'}"), "jo")
    result = CliRunner().invoke(app, ["crawl", "Jo", "--from-dir", str(tmp_path), "--workspace", str(workspace)])
    held.release()
    assert result.exit_code == 6 and "is being run by another lorafactory" in result.output
    assert "Traceback" not in result.output and not (workspace / "jo").exists()


def test_an_older_database_gains_the_new_columns(state_url):
    """A v6 store (no job phase, worker or returns, no character copyright or popularity) is upgraded in
    place, its rows kept; an existing job starts at the first phase, never sent back."""
    from sqlalchemy import text

    from lorafactory.fleet.queue import JobQueue

    store = Store(state_url)
    job = JobQueue(store).add("old", "Old", {})
    with store.engine.begin() as connection:
        for table, column in (
            ("jobs", "phase"),
            ("jobs", "worker"),
            ("jobs", "returns"),
            ("characters", "popularity"),
        ):
            connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        connection.execute(text("UPDATE schema_info SET version = 6"))
    store.engine.dispose()
    upgraded = Store(state_url)
    assert upgraded.schema_version == SCHEMA_VERSION
    columns = {c["name"] for c in inspect(upgraded.engine).get_columns("jobs")}
    assert {"phase", "worker", "returns"} <= columns
    assert {"popularity", "copyright"} <= {c["name"] for c in inspect(upgraded.engine).get_columns("characters")}
    claim = JobQueue(upgraded).claim("w", 60)
    assert claim.id == job and claim.phase == "dataset" and JobQueue(upgraded).jobs()[0].returns == 0
