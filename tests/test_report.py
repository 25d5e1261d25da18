"""`lorafactory report` over a store seeded through the store's own API with a few hundred runs:
every chart's numbers against an independent computation on the same data."""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

from lorafactory.cli import app
from lorafactory.report.charts import OVERFIT, RECSCORE_BANDS, SIZE_BINS
from lorafactory.report.page import write_report
from lorafactory.state import Store
from lorafactory.workspace import STAGES, Workspace

COPYRIGHTS = ("arknights", "genshin_impact", "azur_lane", "sousou_no_frieren")
pytestmark = pytest.mark.xdist_group("report")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 8, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Truth:
    """What was seeded, kept beside the store for the independent computations."""

    characters: list[dict] = field(default_factory=list)
    released_per_day: dict[str, int] = field(default_factory=dict)


def seed(store: Store, count: int = 240, rng_seed: int = 0) -> Truth:
    rng, clock, truth = random.Random(rng_seed), Clock(), Truth()
    store.clock = clock
    for index in range(count):
        copyright = COPYRIGHTS[index % len(COPYRIGHTS)]
        source = "anime" if copyright == "sousou_no_frieren" else rng.choice(["web", "web", "local"])
        popularity = int(10 ** rng.uniform(1, 4))
        raw = rng.randint(3, 600)
        images = max(1, int(raw * rng.uniform(0.3, 1.5)))
        heads, halfbodies = rng.randint(0, images // 2), rng.randint(0, images // 3)
        slug = f"{copyright}_{index:03d}"
        character_id = store.ensure_character(slug, slug.title(), slug, copyright, popularity)
        run_id = store.start_run(character_id, "settings", source)
        failed = index % 9 == 4
        entry = {"slug": slug, "copyright": copyright, "source": source, "popularity": popularity, "raw": raw}
        entry.update(images=images, heads=heads, halfbodies=halfbodies, failed=failed)
        counts = {
            "crawl": {"kept": raw},
            "prepare": {"raw": raw, "dataset": images, "crops_head": heads, "crops_halfbody": halfbodies},
            "train": {"steps": 1500, "steps_per_epoch": round(images / 4, 3)},
        }
        for stage in STAGES:
            stage_id = store.start_stage(run_id, stage, "print")
            clock.advance(rng.uniform(60, 1800))
            if failed and stage == "train":
                store.finish_stage(stage_id, "failed", "out of GPU memory while training")
                store.finish_run(run_id, "failed", "train: out of GPU memory while training; lower train.batch_size")
                break
            gpu = round(rng.uniform(100, 900), 3) if stage in ("train", "evaluate") else None
            store.finish_stage(stage_id, "succeeded", counts=counts.get(stage, {}), gpu_seconds=gpu)
            if stage == "evaluate":
                steps = list(range(100, 1600, 100))
                best = rng.choice(steps)
                metrics = {
                    step: {"ccip_recscore": rng.random(), "bikini": rng.random(), "bikini_plus": rng.random()}
                    for step in steps
                }
                store.record_checkpoints(run_id, {s: f"/x/{s}" for s in steps}, metrics, [best])
                entry.update(best=best, **metrics[best])
        else:
            store.finish_run(run_id, "succeeded")
            day = clock.now.date().isoformat()
            truth.released_per_day[day] = truth.released_per_day.get(day, 0) + 1
        truth.characters.append(entry)
        clock.advance(rng.uniform(0, 3 * 3600))
    return truth


@pytest.fixture(scope="session")  # with the group below: seeded once, on one worker
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    workspace = Workspace(root / "ws")
    workspace.root.mkdir()
    store = Store(workspace.default_db_url)
    truth = seed(store)
    path = write_report(store, workspace, root / "out")
    return {"root": root, "workspace": workspace, "store": store, "truth": truth, "path": path}


def _table(seeded, name: str) -> list[dict]:
    with (seeded["path"].parent / "tables" / f"{name}.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_dataset_size_bins_count_every_dataset(seeded):
    expected: dict[tuple[str, str], int] = {}
    for c in seeded["truth"].characters:
        label = next(label for low, high, label in SIZE_BINS if low <= c["images"] < high)
        expected[(c["source"], label)] = expected.get((c["source"], label), 0) + 1
    table = _table(seeded, "dataset_sizes")
    assert {(r["source"], r["bin"]): int(r["characters"]) for r in table if int(r["characters"])} == expected


def test_recscore_pies_and_the_share_under_the_overfitting_line(seeded):
    evaluated = [c for c in seeded["truth"].characters if "best" in c]
    table = _table(seeded, "recscore")
    for group in ("all", "anime", "web"):
        members = [c for c in evaluated if group == "all" or c["source"] == group]
        for low, high, label in RECSCORE_BANDS:
            row = next(r for r in table if r["group"] == group and r["band"] == label)
            assert int(row["characters"]) == sum(1 for c in members if low <= c["ccip_recscore"] < high)
    for row in _table(seeded, "bikini"):
        values = [c[row["metric"]] for c in evaluated if c["source"] == row["source"]]
        assert int(row["models"]) == len(values)
        assert int(row["under_0.3"]) == sum(1 for v in values if v < OVERFIT)


def test_spearman_per_copyright_equals_scipy_on_the_same_arrays(seeded):
    table = _table(seeded, "correlations")
    assert {r["copyright"] for r in table} == set(COPYRIGHTS)
    for row in table:
        members = [c for c in seeded["truth"].characters if c["copyright"] == row["copyright"]]
        if row["measure"] == "head_ratio":
            values = [c["heads"] / c["images"] for c in members]
        elif row["measure"] == "halfbody_ratio":
            values = [c["halfbodies"] / c["images"] for c in members]
        else:
            values = [c["images"] / c["raw"] for c in members]
        result = spearmanr([c["popularity"] for c in members], values)
        assert int(row["n"]) == len(members)
        assert float(row["rho"]) == pytest.approx(result.statistic, abs=1e-4)
        assert float(row["p"]) == pytest.approx(result.pvalue, abs=1e-4)


def test_best_steps_throughput_and_failures(seeded):
    truth = seeded["truth"]
    best = {r["slug"]: int(r["best_step"]) for r in _table(seeded, "best_steps")}
    assert best == {c["slug"]: c["best"] for c in truth.characters if "best" in c}
    per_day = {r["day"]: int(r["models"]) for r in _table(seeded, "throughput") if int(r["models"])}
    assert per_day == truth.released_per_day
    failures = _table(seeded, "failures")
    assert failures == [
        {
            "reason": "train: out of GPU memory while training",
            "characters": str(sum(c["failed"] for c in truth.characters)),
        }
    ]
    durations = {r["stage"]: r for r in _table(seeded, "stage_durations")}
    assert int(durations["crawl"]["runs"]) == len(truth.characters)
    assert int(durations["train"]["runs"]) == sum(not c["failed"] for c in truth.characters)
    assert float(durations["train"]["gpu_hours"]) > 0 and float(durations["crawl"]["gpu_hours"]) == 0


def test_the_page_is_self_contained_and_the_same_bytes_twice(seeded, tmp_path):
    page = seeded["path"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 6 and "<script" not in page and "http" not in page
    again = write_report(seeded["store"], seeded["workspace"], tmp_path / "again")
    first = sorted(p.relative_to(seeded["path"].parent) for p in seeded["path"].parent.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.parent) for p in again.parent.rglob("*") if p.is_file())
    assert first == second
    for name in first:
        assert (seeded["path"].parent / name).read_bytes() == (again.parent / name).read_bytes(), name


def test_filters_by_copyright_source_and_date(seeded, tmp_path):
    store, workspace = seeded["store"], seeded["workspace"]
    anime = write_report(store, workspace, tmp_path / "anime", source="anime")
    rows = list(csv.DictReader((anime.parent / "tables" / "characters.csv").open(encoding="utf-8")))
    assert rows and {r["source"] for r in rows} == {"anime"}
    arknights = write_report(store, workspace, tmp_path / "ark", copyright="arknights")
    rows = list(csv.DictReader((arknights.parent / "tables" / "characters.csv").open(encoding="utf-8")))
    assert len(rows) == sum(c["copyright"] == "arknights" for c in seeded["truth"].characters)
    late = write_report(store, workspace, tmp_path / "late", since=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert "No character has run yet (since 2030-01-01)" in late.read_text(encoding="utf-8")


def test_an_empty_store_and_a_single_character_give_a_clear_page(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.root.mkdir()
    store = Store(workspace.default_db_url)
    empty = write_report(store, workspace, tmp_path / "empty")
    assert "No character has run yet" in empty.read_text(encoding="utf-8")
    seed(store, count=1)
    single = write_report(store, workspace, tmp_path / "single").read_text(encoding="utf-8")
    assert "1 character (everything in the store)" in single and "no correlation is shown" in single


def test_the_command_prints_the_page_and_rejects_bad_filters(seeded, tmp_path):
    runner = CliRunner()
    ws = ["--workspace", str(seeded["workspace"].root)]
    result = runner.invoke(app, ["report", *ws, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("report.html") and (tmp_path / "r" / "report.html").is_file()
    bad = runner.invoke(app, ["report", *ws, "--since", "yesterday"])
    assert bad.exit_code == 2 and "YYYY-MM-DD" in bad.output
    wrong = runner.invoke(app, ["report", *ws, "--source", "tv"])
    assert wrong.exit_code == 2 and "web, anime or local" in wrong.output


def test_a_real_browser_shows_every_figure_with_the_network_off(seeded):
    """Headless Chromium opens report.html from disk with no network: every image decodes, nothing is
    fetched; the screenshot is kept in test-artifacts/ (or $LORAFACTORY_TEST_ARTIFACTS)."""
    from PIL import Image

    from lorafactory.testing.browser import Browser, chromium_binary

    if chromium_binary() is None:
        pytest.skip("Chromium not installed (apt-get install chromium; CI does)")
    with Browser() as browser:
        browser.open(seeded["path"])
        images = browser.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        shot = browser.screenshot()
    assert len(images) == 6 and all(complete and width > 0 and height > 0 for complete, width, height in images)
    assert [url for url in browser.requests if not url.startswith(("file:", "data:"))] == []
    artifacts = Path(os.environ.get("LORAFACTORY_TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "report.png").write_bytes(shot)
    with Image.open(io.BytesIO(shot)) as picture:
        assert picture.width >= 1000 and picture.height > 2000  # the whole page, not one screen
