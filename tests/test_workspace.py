import json

import pytest

from lorafactory.errors import StageError
from lorafactory.workspace import Manifest, Workspace, read_manifest, slugify, write_json_atomic


def test_slugify():
    assert slugify("Surtr (Arknights)") == "surtr_arknights"
    assert slugify("  Akane Hoshino ") == "akane_hoshino"
    assert slugify("初音ミク").startswith("char_")
    long_a, long_b = "Very Long Name " * 20, "Very Long Name " * 20 + "II"
    assert len(slugify(long_a)) <= 64 and slugify(long_a) != slugify(long_b)
    assert slugify(long_a).startswith("very_long_name_very")


def test_atomic_json_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "data.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["data.json"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask: the atomic write matches it, not owner-only
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_commit_swaps_in_the_partial_folder_with_the_manifest_last(tmp_path):
    char = Workspace(tmp_path).character("alice")
    work = char.begin("crawl", "f1")
    (work / "one.txt").write_text("1")
    assert read_manifest(work) is None  # unfinished artifacts have no manifest
    char.commit("crawl", Manifest(stage="crawl", fingerprint="f1", counts={"n": 1}))
    assert (char.artifact("crawl") / "one.txt").read_text() == "1"
    assert not char.partial("crawl").exists()
    # a rebuild replaces the old artifact whole
    work = char.begin("crawl", "f2")
    (work / "two.txt").write_text("2")
    char.commit("crawl", Manifest(stage="crawl", fingerprint="f2"))
    assert sorted(p.name for p in char.artifact("crawl").iterdir()) == ["manifest.json", "two.txt"]
    manifest = char.manifest("crawl")
    assert manifest.fingerprint == "f2" and "lorafactory" in manifest.versions


def test_resumable_stages_keep_their_unfinished_folder_only_for_the_same_settings(tmp_path):
    char = Workspace(tmp_path).character("alice")
    (char.begin("train", "f1", resumable=True) / "state.pt").write_text("s")
    assert (char.begin("train", "f1", resumable=True) / "state.pt").is_file()  # resumed
    with pytest.raises(StageError, match="--force train"):
        char.begin("train", "f2", resumable=True)
    assert not (char.begin("crawl", "f1") / "state.pt").exists()
    char.invalidate("train")  # what --force does
    assert not (char.begin("train", "f2", resumable=True) / "state.pt").exists()
