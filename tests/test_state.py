import subprocess
import sys

from sqlalchemy import inspect

from lorafactory.state import Store
from lorafactory.state.models import SCHEMA_VERSION


def test_schema_and_records(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
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


def test_runs_of_dead_processes_become_interrupted(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    character = store.ensure_character("bob", "Bob", "bob")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = store.start_run(character, "cfg")
    store.start_stage(run, "train", "fp")
    from lorafactory.state.models import Run

    with store.session() as session:
        session.get(Run, run).pid = int(dead.stdout)
    store.start_run(character, "cfg")
    first = store.character_summary("bob")
    with store.session() as session:
        stale = session.get(Run, run)
        assert stale.status == "interrupted"
        assert stale.stages[0].status == "interrupted"
    assert first["runs"] == 2
