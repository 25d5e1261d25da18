"""A season of synthetic episodes to named characters' datasets (`lorafactory anime`), end to end:
real video files, the stand-in models, a danbooru replay for the character list and references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from lorafactory.cli import app
from lorafactory.config import load_settings, read_toml
from lorafactory.errors import InputError
from lorafactory.progress import SilentProgress
from lorafactory.show.build import build_show
from lorafactory.show.crops import load_crops
from lorafactory.show.layout import show_dir
from lorafactory.sources.anime import CROPS
from lorafactory.state import Store
from lorafactory.testing.episodes import show_replay, write_show
from lorafactory.testing.synthetic import CHARACTERS
from lorafactory.workspace import Workspace

SHOW, COPYRIGHT = "Synthetic Show", "synthetic_show"
pytestmark = pytest.mark.xdist_group("anime")  # one worker builds the show once
NAMES = {str(i): f"{CHARACTERS[i].name} (Synthetic Show)" for i in range(3)}  # as the site's tags read


def _settings(url: str, *extra: str):
    return load_settings(preset="tiny-demo", overrides=[f'crawl.danbooru.base_url="{url}"', *extra])


@pytest.fixture(scope="session")  # session, not module: a worker interleaves modules, and would build it again
def show(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    written = write_show(root / "episodes")
    (root / "episodes" / "ep04.mkv").write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 4096)  # a corrupt episode
    workspace = Workspace(root / "ws")
    workspace.root.mkdir()
    store = Store(workspace.default_db_url)
    with show_replay(root / "site", COPYRIGHT) as replay:
        settings = _settings(replay.url)
        result = build_show(workspace, store, settings, SHOW, SilentProgress(), root / "episodes", COPYRIGHT)
        yield {
            "root": root,
            "written": written,
            "workspace": workspace,
            "store": store,
            "settings": settings,
            "result": result,
            "replay": replay,
        }


def _truth(show) -> tuple[np.ndarray, np.ndarray]:
    """Who each usable crop shows, and its cluster label."""
    where = show_dir(show["workspace"], SHOW)
    crops = load_crops(where, show["settings"])
    records = {}
    for episode in crops.episodes:
        for line in (where.episodes / episode / CROPS).read_text().splitlines():
            record = json.loads(line)
            records[(episode, record["file"])] = record
    truth = []
    for path in crops.files:
        record = records[(path.parent.name, path.name)]
        truth.append(show["written"].who(path.parent.name, record["time"], record["box"]))
    labels = np.array(json.loads((where.root / "clusters.json").read_text())["labels"])
    return np.array(truth), labels


def test_clusters_are_the_true_characters(show):
    truth, labels = _truth(show)
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert "crowd" not in truth  # background characters are dropped as low-detail
    counts = show["result"].manifest["counts"]
    assert counts["low_detail"] >= 9 and counts["monochrome"] >= 3  # the crowd shots, the flashbacks
    assert counts["near_duplicate"] >= 2 * 3  # the shot each episode shows again
    assert counts["usable"] == len(truth)


def test_main_characters_are_named_and_no_name_is_wrong(show):
    truth, labels = _truth(show)
    clusters = show["result"].manifest["clusters"]
    named = {}
    for cluster in clusters:
        members = truth[labels == cluster["cluster"]]
        who = max(set(members), key=list(members).count)
        if cluster["name"] is not None:
            assert cluster["name"] == NAMES[who], cluster  # never a wrong name
            named[who] = cluster["name"]
    assert set(named) == {"0", "1", "2"}
    unknown = [c for c in clusters if c["name"] is None]
    assert unknown, "character 3 is not on the site's list: her cluster stays unknown"
    characters = {c["name"]: c for c in show["result"].manifest["characters"]}
    assert set(characters) == set(NAMES.values())


def test_the_repeated_opening_is_dropped(show):
    where = show_dir(show["workspace"], SHOW)
    crops = load_crops(where, show["settings"])
    assert show["result"].manifest["counts"]["recurring_shots"] == 2 * 3  # two shots, three episodes
    for path in crops.files:
        record = next(
            json.loads(line)
            for line in (path.parent / CROPS).read_text().splitlines()
            if json.loads(line)["file"] == path.name
        )
        assert not show["written"].in_opening(path.parent.name, record["time"])


def test_a_corrupt_episode_is_reported_and_skipped(show):
    manifest = show["result"].manifest
    assert manifest["episodes"] == ["ep01", "ep02", "ep03"]
    assert "ep04.mkv" in manifest["skipped"]["ep04"]


def test_each_named_character_has_a_dataset_and_settings_that_read_it(show):
    workspace, manifest = show["workspace"], show["result"].manifest
    truth, labels = _truth(show)
    crops = load_crops(show_dir(workspace, SHOW), show["settings"])
    for character in manifest["characters"]:
        dataset = sorted(Path(character["dataset"]).iterdir())
        assert len(dataset) == character["images"] >= 4
        who = next(k for k, v in NAMES.items() if v == character["name"])
        mine = {f"{p.parent.name}_{p.name}" for p, t in zip(crops.files, truth) if t == who}
        assert {p.name for p in dataset} <= mine  # only her crops
        config = read_toml(workspace.character(character["slug"]).config_path)
        assert config["crawl"]["source"] == "anime" and config["crawl"]["from_dir"] == character["dataset"]
        assert config["regularization"]["mode"] == "on"
        frames = {p.name for p in Path(character["regularization"]).iterdir()}
        assert frames and not frames & {name.rsplit("_", 1)[0] + ".jpg" for name in mine}  # none of her frames


def test_names_toml_renames_merges_and_drops_without_extracting_again(show, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    shutil.copytree(show["workspace"].root, workspace.root)
    store = Store(workspace.default_db_url)
    where = show_dir(workspace, SHOW)
    manifest = show["result"].manifest
    by_name = {c["name"]: c["cluster"] for c in manifest["clusters"]}
    unknown = next(c["cluster"] for c in manifest["clusters"] if c["name"] is None)
    where.names_path.write_text(
        f'clustering = "{manifest["clustering"]}"\n[clusters]\n'
        f'{unknown} = "Kiiro Hana"\n{by_name[NAMES["2"]]} = false\n'
    )
    akane = workspace.character(next(c["slug"] for c in manifest["characters"] if c["name"] == NAMES["0"]))
    akane.config_path.write_text(akane.config_path.read_text().replace("max_steps = 30", "max_steps = 77"))
    episode_done = (where.episodes / "ep01" / "done.json").stat().st_mtime_ns
    requests = len(show["replay"].requests)
    result = build_show(workspace, store, show["settings"], SHOW, SilentProgress())
    assert (where.episodes / "ep01" / "done.json").stat().st_mtime_ns == episode_done
    assert len(show["replay"].requests) == requests  # candidates and references were kept: no site needed
    names = {c["name"] for c in result.manifest["characters"]}
    assert names == {NAMES["0"], NAMES["1"], "Kiiro Hana"}
    renamed = next(c for c in result.manifest["clusters"] if c["cluster"] == unknown)
    assert renamed["named_by"] == "names"
    assert not list((where.root / "datasets").glob("sora_aoi*"))  # the dropped one's dataset is gone
    assert read_toml(akane.config_path)["train"]["max_steps"] == 77  # her own settings are kept

    where.names_path.write_text(f'[clusters]\n{unknown} = "{NAMES["0"]}"\n')  # merge into character 0
    merged = build_show(workspace, store, show["settings"], SHOW, SilentProgress())
    akane = next(c for c in merged.manifest["characters"] if c["name"] == NAMES["0"])
    assert sorted(akane["clusters"]) == sorted([by_name[NAMES["0"]], unknown])

    where.names_path.write_text('[clusters]\n99 = "Nobody"\n')
    with pytest.raises(InputError, match="no cluster 99"):
        build_show(workspace, store, show["settings"], SHOW, SilentProgress())
    where.names_path.write_text('clustering = "0123abcd"\n')
    with pytest.raises(InputError, match="written for clusters 0123abcd"):
        build_show(workspace, store, show["settings"], SHOW, SilentProgress())


def test_list_shows_the_clusters_and_queue_adds_the_named(show, tmp_path, monkeypatch):
    from lorafactory import cli

    monkeypatch.setattr(cli.out, "width", 250)  # the table's long cells whole, whatever the terminal
    workspace = tmp_path / "ws"
    shutil.copytree(show["workspace"].root, workspace)
    runner = CliRunner()
    listed = runner.invoke(app, ["anime", SHOW, "--list", "--workspace", str(workspace)], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    for name in NAMES.values():
        assert name in listed.output
    assert "unknown_" in listed.output and "cluster_0.png" in listed.output
    queued = runner.invoke(
        app,
        ["anime", SHOW, "--queue", "--workspace", str(workspace), "--preset", "tiny-demo"],
        env={"COLUMNS": "250"},
    )
    assert queued.exit_code == 0, queued.output
    assert queued.output.count("queued") == 3
    status = runner.invoke(app, ["status", "--workspace", str(workspace)], env={"COLUMNS": "250"})
    assert status.exit_code == 0, status.output
    assert f"{SHOW} (anime): 3 episodes" in status.output and NAMES["1"] in status.output
    listed = json.loads(runner.invoke(app, ["status", "--workspace", str(workspace), "--json"]).output)
    (show,) = listed["shows"]
    assert show["show"] == SHOW and len(show["episodes"]) == 3 and show["counts"]["clusters"] >= 3
    assert {c["name"] for c in show["characters"] if c["dataset"]} >= set(NAMES.values())
    assert {c["slug"] for c in listed["characters"]} >= {c["slug"] for c in show["characters"] if c["dataset"]}
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["anime", "Another Show", "--episodes", str(empty), "--workspace", str(workspace)])
    assert nothing.exit_code == 3 and "no video files" in nothing.output
    missing = runner.invoke(app, ["anime", "Another Show", "--list", "--workspace", str(workspace)])
    assert missing.exit_code != 0 and "--episodes DIR" in missing.output


@pytest.mark.slow
def test_a_named_character_trains_with_frames_of_the_show_as_regularization(show, kit):
    """Her settings, as the anime command wrote them, run the usual pipeline: her crops are the
    crawl, and frames of the show without her are the regularization set."""
    from lorafactory.pipeline import run_pipeline

    workspace, store = show["workspace"], show["store"]
    character = next(c for c in show["result"].manifest["characters"] if c["name"] == NAMES["0"])
    saved = read_toml(workspace.character(character["slug"]).config_path)
    settings = load_settings(overrides=[f'train.base_model="{kit.tiny_sd}"', "train.max_steps=10"], base=saved)
    outcome = run_pipeline(workspace, store, settings, SilentProgress(), until="train")
    assert outcome.executed == ["crawl", "prepare", "train"]
    char = workspace.character(character["slug"])
    assert char.manifest("crawl").counts["kept"] == character["images"]
    assert char.manifest("train").counts["regularization_images"] > 0
    assert list(char.manifest("train").details["checkpoints"]) == ["10"]
