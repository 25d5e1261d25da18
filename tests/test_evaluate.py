"""The evaluate stage on the tiny model: adapter swapping, missing metrics, coarse-to-fine, the quality gate."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEMO_GROUP, demo_settings, fresh_compile_counters
from lorafactory.errors import QualityGateFailed, StaleStage
from lorafactory.evaluate.evaluator import evaluate
from lorafactory.evaluate.generate import Generator
from lorafactory.evaluate.layout import step_dir
from lorafactory.evaluate.prompts import jobs, prompt_specs
from lorafactory.pipeline import GATE_FILE, run_pipeline
from lorafactory.progress import SilentProgress
from lorafactory.prune import plan_pruning
from lorafactory.state import Store
from lorafactory.train.model import load_pipeline
from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE, checkpoint_dir, train
from lorafactory.workspace import Workspace

TRIGGER = "akane_hoshino"
pytestmark = DEMO_GROUP  # and one worker trains the checkpoints they share


@pytest.fixture(scope="module")
def dataset(demo_run):
    return demo_run["workspace"].character("akane_hoshino").artifact("prepare")


@pytest.fixture(scope="module")
def trained(kit, dataset, tmp_path_factory):
    """Eight checkpoints, one per step."""
    settings = demo_settings(
        kit, "http://127.0.0.1:1", "train.max_steps=8", "train.save_every=1", "evaluate.cluster_prompts=false"
    )
    out = tmp_path_factory.mktemp("trained")
    result = train(settings, TRIGGER, dataset, out, SilentProgress())
    return settings, out, result.checkpoints


@pytest.fixture
def pipeline_loads(monkeypatch):
    """The base models the kept-pipeline module loads afresh during the test, in order."""
    from lorafactory.evaluate import resident

    loads = []

    def counted_load(*args, **kwargs):
        loads.append(args[0])
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr(resident, "load_pipeline", counted_load)
    return loads


def _render(generator, work, step_folder=None, keep_adapter=False):
    if step_folder is not None:
        generator.load(step_folder / LORA_FILE, step_folder / EMBEDDING_FILE, TRIGGER)
    images = [np.asarray(image) for _, image in generator.render(work)]
    if step_folder is not None:
        generator.unload(TRIGGER, 2, keep_adapter=keep_adapter)
    return images


def test_adapter_swapping_renders_what_a_fresh_pipeline_renders(kit, trained):
    settings, out, _ = trained
    e, t = settings.evaluate, settings.train
    work = jobs(e, prompt_specs(e, []), TRIGGER)[:3]
    cpu = torch.device("cpu")
    swapping = Generator(load_pipeline(t.base_model), e, t.clip_skip, cpu)
    base_before = _render(swapping, work)
    _render(swapping, work, checkpoint_dir(out, 2), keep_adapter=True)
    hotswaps = []
    real_load = swapping.pipe.load_lora_weights
    swapping.pipe.load_lora_weights = lambda *args, **kwargs: (
        hotswaps.append(kwargs.get("hotswap", False)) or real_load(*args, **kwargs)
    )
    swapped = _render(swapping, work, checkpoint_dir(out, 8))  # hotswapped into step 2's LoRA layers
    assert hotswaps == [True] and not swapping.adapter_in
    base_after = _render(swapping, work)
    reloaded = _render(Generator(load_pipeline(t.base_model), e, t.clip_skip, cpu), work, checkpoint_dir(out, 8))
    for a, b in zip(swapped, reloaded):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same images, up to rounding
    for a, b in zip(base_before, base_after):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # unloading leaves the base model as it was
    assert any(
        np.abs(a.astype(int) - b.astype(int)).max() > 1 for a, b in zip(swapped, base_after)
    )  # the LoRA does change them


def test_merged_lora_renders_what_the_adapter_renders_and_puts_the_base_back_exactly(kit, trained):
    """evaluate.merge_lora (with evaluate.channels_last): each checkpoint is merged into the UNet's weights,
    renders the images the adapter renders beside the base layers, the next one is hotswapped in after an
    exact restore, and unloading leaves every base weight as it was, bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings, out, _ = trained
    e, t = settings.evaluate, settings.train
    work = jobs(e, prompt_specs(e, []), TRIGGER)[:3]
    cpu = torch.device("cpu")
    plain = Generator(load_pipeline(t.base_model), e, t.clip_skip, cpu)
    merging = Generator(
        load_pipeline(t.base_model), e.model_copy(update={"merge_lora": True, "channels_last": True}), t.clip_skip, cpu
    )
    before = {key: value.clone() for key, value in merging.pipe.unet.state_dict().items()}
    folder = checkpoint_dir(out, 2)
    merging.load(folder / LORA_FILE, folder / EMBEDDING_FILE, TRIGGER)
    layers = [m for m in merging.pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.merged for layer in layers)
    merging.unload(TRIGGER, 2, keep_adapter=True)
    assert not any(layer.merged for layer in layers)
    for step, keep in ((2, True), (8, False)):  # step 8 is hotswapped into step 2's layers
        for a, b in zip(
            _render(plain, work, checkpoint_dir(out, step), keep),
            _render(merging, work, checkpoint_dir(out, step), keep),
        ):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    after = merging.pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_the_render_batch_size_gives_the_same_images(kit, trained):
    """Each image has its own seeded generator, so evaluate.batch_size (a runtime setting: the fleet halves it
    after running out of GPU memory) changes how many are rendered at once, not which images."""
    settings, _, _ = trained
    e, t = settings.evaluate, settings.train
    work = jobs(e, prompt_specs(e, []), TRIGGER)[:3]
    pipe = load_pipeline(t.base_model)
    one = _render(Generator(pipe, e.model_copy(update={"batch_size": 1}), t.clip_skip, torch.device("cpu")), work)
    three = _render(Generator(pipe, e.model_copy(update={"batch_size": 3}), t.clip_skip, torch.device("cpu")), work)
    assert len(one) == len(three) == 3
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(one, three))
    assert np.abs(one[0].astype(int) - one[1].astype(int)).max() > 1  # the seeds do differ


def test_missing_metrics_broken_checkpoints_and_coarse_to_fine(kit, trained, dataset, tmp_path):
    settings, out, checkpoints = trained
    broken = tmp_path / "train"
    shutil.copytree(out, broken)
    (checkpoint_dir(broken, 6) / LORA_FILE).write_bytes(b"not a safetensors file")
    settings = settings.model_copy(deep=True)
    settings.evaluate.clip_model = "someone/uncached-clip"  # not in the stand-in cache, and offline
    settings.evaluate.checkpoints, settings.evaluate.coarse_every, settings.evaluate.keep = "coarse_to_fine", 3, 1
    result = evaluate(
        settings,
        TRIGGER,
        dataset,
        broken,
        checkpoints,
        {s: 1.0 / s for s in checkpoints},
        tmp_path / "eval",
        SilentProgress(),
        tmp_path / "cache",
    )

    coarse = {3, 6, 8}  # every third checkpoint and the last
    evaluated = set(checkpoints) - set(result.details["skipped"])
    assert coarse <= evaluated and result.details["failed"].keys() == {"6"}
    best_coarse = result.selection.best if result.selection.best in coarse else None
    refined = evaluated - coarse
    assert refined and all(any(abs(r - c) <= 2 for c in coarse - {6}) for r in refined)
    assert result.selection.excluded[6].startswith("failed to load") and result.details["skipped"]
    assert all(result.selection.excluded[s] == "not evaluated (coarse-to-fine)" for s in result.details["skipped"])
    assert best_coarse is None or best_coarse in evaluated

    assert result.details["vision_provider"] == "CPUExecutionProvider"  # what imgutils scored with
    seconds = result.details["seconds"]  # where the wall time went: rendering, and waiting for the worker threads
    assert set(seconds) == {"loading", "rendering", "waiting for scores", "waiting for files"}
    assert seconds["rendering"] > 0 and all(value >= 0 for value in seconds.values())
    missing = result.details["missing_metrics"]
    assert set(missing) == {"clip_alignment", "diversity"}
    assert missing["clip_alignment"].startswith("someone/uncached-clip is not in the Hugging Face cache")
    for step in evaluated - {6}:
        row = result.table[step]
        assert row["clip_alignment"] is None and row["diversity"] is None  # missing, never zero
        assert row["ccip_recscore"] is not None and row["ai_corrupt"] is not None and row["bikini_plus"] is not None
        assert row["validation_loss"] == pytest.approx(1.0 / step)
        record = json.loads((step_dir(tmp_path / "eval", step) / "metrics.json").read_text())
        assert len(record["per_image"]) == result.counts["images_per_checkpoint"]
        assert (step_dir(tmp_path / "eval", step) / "grid.png").is_file()
    header, *rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(checkpoints) and header.split(",")[-2:] == ["score", "kept_rank"]
    assert (tmp_path / "eval" / "metrics_plot.png").stat().st_size > 10_000
    assert len(list((tmp_path / "cache").glob("ccip-*.npy"))) == 1  # dataset features cached for the next evaluation


@pytest.mark.slow
def test_quality_gate_retrains_then_fails_for_good(demo_run, tmp_path):
    """Stand-in images never look like the character (RecScore 0): the gate retrains once with more
    steps, then fails the run; a rerun does not retrain again."""
    root = tmp_path / "ws"
    shutil.copytree(demo_run["workspace"].root, root)
    workspace, store = Workspace(root), Store(Workspace(root).default_db_url)
    settings = demo_run["settings"].model_copy(deep=True)
    settings.evaluate.gate_recscore, settings.evaluate.gate_attempts = 0.5, 1
    settings.release.prune = "models"  # the run the gate stops is over: nothing reads those files any more
    with pytest.raises(QualityGateFailed, match="after 2 training attempt.*below evaluate.gate_recscore 0.50"):
        run_pipeline(workspace, store, settings, SilentProgress())
    char = workspace.character("akane_hoshino")
    assert json.loads((char.path / GATE_FILE).read_text())["attempt"] == 1
    train = char.manifest("train")
    assert train.details["checkpoints"].keys() >= {"40", "45"}  # 30 steps * 1.5
    assert store.character_summary("akane_hoshino")["latest_run"]["status"] == "failed"
    assert char.manifest("train").pruned and char.manifest("evaluate").pruned
    assert plan_pruning(char, "models").files == {}  # as `lorafactory prune` would have
    gate = json.loads((char.path / GATE_FILE).read_text())
    del gate["settings"]["train"]["noise_offset"]  # as a lorafactory without that setting wrote it
    (char.path / GATE_FILE).write_text(json.dumps(gate))
    with pytest.raises(QualityGateFailed):
        run_pipeline(workspace, store, settings, SilentProgress())
    assert char.manifest("train").created_at == train.created_at  # the failed final attempt is not retrained,
    assert char.manifest("train").pruned  # nor made again: the gate stops the run before anything reads it
    assert (
        char.manifest("release").fingerprint
        == demo_run["workspace"].character("akane_hoshino").manifest("release").fingerprint
    )
    with pytest.raises(StaleStage, match="evaluate is out of date .its best checkpoint failed the quality gate"):
        run_pipeline(workspace, store, settings, SilentProgress(), start="release")  # a fleet's release phase


def test_no_loadable_checkpoint_gives_no_release(kit, trained, dataset, tmp_path):
    from lorafactory.errors import StageError
    from lorafactory.release.builder import release

    settings, out, checkpoints = trained
    broken = tmp_path / "train"
    shutil.copytree(out, broken)
    for step in checkpoints:
        (checkpoint_dir(broken, step) / LORA_FILE).write_bytes(b"broken")
    result = evaluate(settings, TRIGGER, dataset, broken, checkpoints, {}, tmp_path / "eval", SilentProgress())
    assert result.counts["failed_checkpoints"] == len(checkpoints) and result.selection.kept == [max(checkpoints)]
    assert "fell back to the last step" in result.selection.reason
    (tmp_path / "release").mkdir()
    trained = {"checkpoints": {str(step): path for step, path in checkpoints.items()}}
    with pytest.raises(StageError, match="no checkpoint loaded during evaluation.*nothing to release"):
        release(
            settings, TRIGGER, broken, trained, tmp_path / "eval", result.details, {}, [], tmp_path / "release", True
        )
    assert not (tmp_path / "release" / f"{TRIGGER}.safetensors").exists()  # a broken file is never released


def test_a_run_shorter_than_its_save_every_is_released_with_the_schedule_it_was_set(kit, dataset, tmp_path):
    """Such a run saves one checkpoint, at its last step; its release's train.toml still gives the
    train.save_every it ran with (the trainer records the schedule), not that step."""
    from lorafactory.config import tomllib
    from lorafactory.release.builder import release

    settings = demo_settings(
        kit, "http://127.0.0.1:1", "train.max_steps=3", "train.save_every=10", "evaluate.cluster_prompts=false"
    )
    trained = train(settings, TRIGGER, dataset, tmp_path / "train", SilentProgress())
    assert list(trained.checkpoints) == [3] and trained.details["schedule"] == {"steps": 3, "save_every": 10}
    result = evaluate(
        settings, TRIGGER, dataset, tmp_path / "train", trained.checkpoints, {}, tmp_path / "eval", SilentProgress()
    )
    out = tmp_path / "release"
    out.mkdir()
    release(
        settings, TRIGGER, tmp_path / "train", trained.details, tmp_path / "eval", result.details, {}, [], out, True
    )
    summary = tomllib.loads((out / "train.toml").read_text())["train"]
    assert (summary["steps"], summary["save_every"]) == (3, 10)


def test_the_base_pipeline_stays_loaded_between_evaluations(kit, trained, dataset, tmp_path, pipeline_loads):
    """A second evaluation in the same process (the next character on a fleet's GPU worker, or a
    quality-gate retrain) reuses the pipeline the first one loaded, and scores exactly the same."""
    from lorafactory.evaluate import resident

    settings, out, checkpoints = trained
    resident.forget()
    two = {step: checkpoints[step] for step in (4, 8)}
    tables = [
        evaluate(settings, TRIGGER, dataset, out, two, {}, tmp_path / name, SilentProgress(), tmp_path / "cache").table
        for name in ("first", "second")
    ]
    assert pipeline_loads == [settings.train.base_model] and tables[0] == tables[1]
    (kept,) = resident._kept.values()  # kept clean: no LoRA layers left from the last checkpoint
    assert not any("lora" in name for name, _ in kept.unet.named_modules())
    other = settings.model_copy(deep=True)
    other.train.mixed_precision = "bf16"  # another dtype is another pipeline
    with resident.base_pipeline(other.train.base_model, torch.bfloat16, "", torch.device("cpu")):
        pass
    assert len(pipeline_loads) == 2


def test_sequential_evaluation_stops_a_ruled_out_checkpoint_after_a_part_and_never_keeps_it(
    kit, trained, dataset, tmp_path, monkeypatch
):
    """The decision itself is tested on synthetic runs (test_sequential.py); here the evaluator's side:
    latest checkpoints first, a look after each part of the images but the last, a ruled-out checkpoint's
    images only up to its look, its reason, and no release of it."""
    from lorafactory.evaluate import schedule

    settings, out, checkpoints = trained
    settings = settings.model_copy(deep=True)
    settings.evaluate.sequential, settings.evaluate.keep, settings.evaluate.sequential_every = True, 3, 2
    checkpoints = {step: checkpoints[step] for step in (4, 5, 6, 7, 8)}
    work = jobs(settings.evaluate, prompt_specs(settings.evaluate, []), TRIGGER)
    assert len(work) == 5  # three parts: images 0 and 3, then 1 and 4, then 2
    looks: dict[int, list[tuple]] = {}

    def decide(table, step, probe, intervals, e, keep, ineligible):
        assert keep == 3 and probe["ccip_recscore"] is not None and intervals
        looks.setdefault(step, []).append((sorted(table), set(ineligible)))
        return len(looks[step]) == {4: 1, 5: 2}.get(step)  # 4 stops at its first look, 5 at its second

    monkeypatch.setattr(schedule, "ruled_out", decide)
    result = evaluate(settings, TRIGGER, dataset, out, checkpoints, {}, tmp_path / "eval", SilentProgress())
    assert result.details["ruled_out"] == [4, 5] and result.counts["ruled_out_early"] == 2
    assert looks[8] == [([], set())] * 2 and looks[5] == [([6, 7, 8], set())] * 2
    assert looks[4] == [([5, 6, 7, 8], {5})]  # an earlier ruled-out row counts, as ineligible
    assert result.counts["images_rendered"] == 3 * 5 + 4 + 2
    for step, shown in {4: [0, 3], 5: [0, 1, 3, 4], 6: range(5), 8: range(5)}.items():
        folder = step_dir(tmp_path / "eval", step)
        rendered = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
        per_image = json.loads((folder / "metrics.json").read_text())["per_image"]
        assert rendered == sorted(work[i].filename for i in shown) == sorted(per_image)
    assert set(result.selection.kept) == {6, 7, 8}
    excluded = result.selection.excluded
    assert excluded[4].startswith("ruled out after 2 of 5 images") and excluded[5].startswith("ruled out after 4 of 5")


def test_pngs_are_written_in_the_background_with_their_parameters_and_a_failure_is_raised(tmp_path):
    from PIL import Image

    from lorafactory.evaluate.generate import BackgroundPngs

    images = [Image.new("RGB", (64, 48), (i * 40, 10, 0)) for i in range(6)]
    with BackgroundPngs(workers=2) as pngs:
        for i, image in enumerate(images):
            pngs.save(image, tmp_path / f"{i}.png", f"prompt {i}, Steps: 25")
    for i in range(6):
        with Image.open(tmp_path / f"{i}.png") as written:
            assert written.text["parameters"] == f"prompt {i}, Steps: 25"
            assert written.size == (64, 48) and written.getpixel((5, 5)) == (i * 40, 10, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(6)]  # no partial files left
    with pytest.raises(FileNotFoundError), BackgroundPngs() as pngs:
        pngs.save(images[0], tmp_path / "no-such-folder" / "x.png", "p")


def test_scores_measured_batch_by_batch_equal_the_scores_measured_at_once(kit, monkeypatch):
    """The evaluator measures each rendered batch on a worker thread and summarises at the end: the same
    values and intervals as measuring every image in one go; a model that fails on any batch leaves its
    metric missing for the whole checkpoint."""
    import random

    from lorafactory.evaluate import scoring
    from lorafactory.testing.synthetic import CHARACTERS
    from lorafactory.vision.ccip import default_threshold, extract_features

    settings = demo_settings(kit, "http://127.0.0.1:1")
    e, model = settings.evaluate, settings.vision.ccip_model
    work = jobs(e, prompt_specs(e, [["1girl", "red_hair"]]), "akane_hoshino")
    rng = random.Random(0)
    images = [CHARACTERS[i % 2].draw(128, 128, outfit=i % 3, rng=rng) for i in range(len(work))]
    dataset = extract_features(images[:3], model)

    def scorer():
        return scoring.Scorer(settings, "akane_hoshino", dataset, default_threshold(model), torch.device("cpu"))

    whole = scorer().score(work, images)
    batched = scorer()
    parts = [batched.measure(work[i : i + 2], images[i : i + 2]) for i in range(0, len(work), 2)]
    split = batched.summarise(work, parts[::-1])  # parts may come in any order
    assert len(work) == 5 and split.images == whole.images == 5 and not batched.missing
    assert whole.values["diversity"] is not None and whole.values["ccip_recscore"] is not None
    for metric, value in whole.values.items():
        assert split.values[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
        assert split.intervals[metric] == pytest.approx(whole.intervals[metric], rel=1e-5, abs=1e-6), metric
    assert list(split.per_image) == [job.filename for job in work]

    failing = scorer()
    first = failing.measure(work[:2], images[:2])

    def broken(image, model):
        raise RuntimeError("the model file is damaged")

    monkeypatch.setattr(scoring, "ai_corrupt_score", broken)
    result = failing.summarise(work, [first, failing.measure(work[2:], images[2:])])
    assert result.values["ai_corrupt"] is None and "damaged" in failing.missing["ai_corrupt"]
    assert all("ai_corrupt" not in values for values in result.per_image.values())  # not half a metric
    assert result.values["ccip_recscore"] == pytest.approx(whole.values["ccip_recscore"], rel=1e-5)


def test_a_compiled_unet_renders_what_the_eager_one_does_and_later_checkpoints_and_models_compile_nothing(
    kit, trained, dataset, tmp_path, pipeline_loads
):
    """evaluate.compile compiles the UNet's transformer blocks (here with aot_eager, graph capture without code
    generation; the GPU session times inductor) with symbolic sizes: one graph per block width serves the
    whole evaluation, its batches of 3 and of 2 and every checkpoint hotswapped into the compiled LoRA layers.
    With evaluate.merge_lora the merged layers take another branch: one more graph per width, for every
    checkpoint merged, restored and merged again. The next evaluation in the process (a fleet's next model)
    compiles nothing and, after the merged one, renders the first one's images exactly (the base weights were
    put back); the images are eager's. An evaluation without it never gets the compiled pipeline kept between
    evaluations."""
    from lorafactory.evaluate import resident

    settings, out, checkpoints = trained
    settings = settings.model_copy(deep=True)
    settings.evaluate.width = settings.evaluate.height = 128  # at 64 px a level's sequence of 1 compiles apart
    eager_settings = settings.model_copy(deep=True)
    settings.evaluate.compile, settings.evaluate.compile_backend = True, "aot_eager"
    merging = settings.model_copy(deep=True)
    merging.evaluate.merge_lora = True
    two = {step: checkpoints[step] for step in (4, 8)}
    resident.forget()
    counters = fresh_compile_counters()  # nothing compiled earlier in this process is reused

    def evaluated(chosen, name):
        evaluate(chosen, TRIGGER, dataset, out, two, {}, tmp_path / name, SilentProgress(), tmp_path / "cache")
        return {
            png.relative_to(tmp_path / name): np.asarray(Image.open(png), dtype=int)
            for png in sorted((tmp_path / name / "steps").rglob("*.png"))
            if png.name != "grid.png"
        }

    compiled = evaluated(settings, "compiled")
    (pipe,) = resident._kept.values()
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    widths = len({block.norm1.normalized_shape for block in blocks})
    assert counters["stats"]["unique_graphs"] == widths
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0  # nothing fell back to eager
    counters.clear()
    merged = evaluated(merging, "merged")
    assert counters["stats"]["unique_graphs"] == widths, dict(counters["stats"])
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])
    counters.clear()
    again = evaluated(settings, "again")
    assert not counters["frames"]["total"], dict(counters["frames"])  # new LoRA layers, the same graphs
    assert again.keys() == compiled.keys() and all(np.array_equal(again[name], compiled[name]) for name in again)
    eager = evaluated(eager_settings, "eager")
    assert len(pipeline_loads) == 2  # the kept pipeline is compiled: an evaluation without compile loads its own
    assert compiled.keys() == eager.keys() == merged.keys() and len(compiled) == 2 * len(
        jobs(settings.evaluate, prompt_specs(settings.evaluate, []), TRIGGER)
    )
    assert all(np.abs(merged[name] - eager[name]).max() <= 1 for name in merged)
    assert all(np.abs(compiled[name] - eager[name]).max() <= 1 for name in compiled)
