"""Models per GPU-day: the real train and evaluate stages of a preset, timed, on random-initialised weights.

For each preset (default ``sd15-anime``; also ``sdxl-anime``) it writes a prepared synthetic dataset
(``--images``, mixed aspect ratios, three crop groups), trains it with the preset's own settings
(planned step count, checkpoint interval, batch, precision) on full-size random weights, evaluates
every checkpoint with the preset's prompt set, sampler, image size and scorers, and prints seconds per
stage, GPU-seconds per model and models per GPU-day, with process CPU time beside wall time.

A GPU's time budget rarely allows the whole planned run, so ``--steps`` trains fewer steps (on the
preset's checkpoint grid) and the figures are projected to the planned run: everything up to the step
after the first checkpoint once (set-up, compiling, the first validation), later steps at their mean
and checkpoints at the last one's time (``project_training``), evaluation per checkpoint. Measured and
projected figures are both written. Sequential evaluation needs as many scored checkpoints as are kept
before it drops one, and random weights score alike, so a short measured run renders every image and the
projected evaluation is an upper bound; the ``*_sequential`` figures scale its rendering by the share of
batches sequential evaluation renders on synthetic runs of the planned checkpoints and suite
(``evaluation_budget.sequential_share``), an expectation for real training, not a measurement.

``--concurrent 1,3`` runs each measurement as that many models at once, in as many processes on the
one GPU (alternating the counts between repeats): a trainer bound by its host leaves the GPU idle
between kernels, and a fleet can run several GPU jobs on one GPU (``fleet run --jobs-per-gpu``). The
aggregate models per GPU-day of a concurrent run is the sum over its models; each model's figures are
projected from what it measured while sharing the GPU (all of them training, then all evaluating).
The GPU's mean utilisation (NVML, whole device) is recorded during training and during evaluation.

``--models-per-process 2`` trains and evaluates models one after another in each process, as a fleet's
resident GPU worker serves job after job: the first pays what a process pays once (CUDA and library
set-up, compiled graphs, kernel plans, loading the evaluation pipeline), the later ones show the
worker's steady state. Rows carry ``model_in_process``; the summary gives the first and the later
models apart.

The vision models are the stand-in hub's (tiny ONNX models with imgutils' I/O) and CLIP is a random
ViT-L/14, so the scoring share is a lower bound for the ONNX part. ``--tiny`` runs the tiny models on
CPU with small sizes: a check of the script itself, not a measurement.

    PYTHONPATH=src python benchmarks/factory_throughput.py [--preset sd15-anime] [--preset sdxl-anime]
        [--images 200] [--steps 200] [--repeats 3] [--out benchmarks/results] [--work DIR] [--tiny]
        [--set train.compile=true --tag compiled] [--concurrent 1,3] [--models-per-process 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

ASPECTS = (1.0, 0.75, 0.66, 0.5, 1.33, 1.5)  # width / height, as crawled crops come
GROUPS = ("person", "halfbody", "head")
# Short sides (px) per crop group: crops of crawled images; head crops are mostly below 512 px, so at
# 512 px without upscaling they fall into many small buckets.
FULL_SIZE_SIDES = {"person": (512, 1100), "halfbody": (384, 900), "head": (160, 512)}
TINY_SIDES = dict.fromkeys(GROUPS, (96, 200))
# General tags per caption, per crop group, as WD14 at threshold 0.35 tags crawled crops once the core tags
# are pruned (an estimate: a head crop shows less). At about 2 tokens and a comma per tag, full-body
# captions pass 75 tokens, so many batches need a second chunk, as real runs do.
TAG_COUNTS = {"person": (18, 32), "halfbody": (14, 24), "head": (8, 16)}
# Danbooru-style tags made of words the local tokenizer knows (a token or two each, about as many as CLIP's).
TAG_POOL = (
    [f"{colour} {item}" for colour in ("red", "blue", "green", "light") for item in ("dress", "skirt", "coat")]
    + [f"{colour} {item}" for colour in ("red", "blue", "green", "light") for item in ("shirt", "bikini", "apron")]
    + "solo smile standing portrait yukata festival night beach 1girl".split()
    + ["looking at viewer", "full body", "upper body", "maid headdress", "starry sky", "long skirt", "blue sky"]
)


class TimedProgress:
    """A Progress that records when each named task begins and ends (the stages' own bars), and for the last
    task of each name when it advanced: (seconds since its start, units done so far)."""

    def __init__(self, synchronize) -> None:
        self.synchronize = synchronize
        self.spans: dict[str, list[float]] = {}
        self.advances: dict[str, list[tuple[float, int]]] = {}

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator:
        self.synchronize()
        start = time.perf_counter()
        marks: list[tuple[float, int]] = []
        self.advances[description] = marks

        class _Task:
            def advance(self, amount: int = 1) -> None:
                marks.append((time.perf_counter() - start, (marks[-1][1] if marks else 0) + amount))

            def complete(self) -> None:
                return None

        yield _Task()
        self.synchronize()
        self.spans.setdefault(description, []).append(time.perf_counter() - start)

    def note(self, message: str) -> None:
        return None


class GpuLoad:
    """The GPU's mean utilisation (percent of time a kernel ran, NVML) while the block runs; ``mean`` stays
    None without NVML or a GPU."""

    def __init__(self, active: bool, every_s: float = 0.5) -> None:
        self.active, self.every_s, self.samples = active, every_s, []
        self.mean: float | None = None

    def __enter__(self) -> GpuLoad:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        if self.active:
            self.thread.start()
        return self

    def _sample(self) -> None:
        import torch

        try:
            while not self.stop.wait(self.every_s):
                self.samples.append(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - no NVML (pynvml) here: no figure, the benchmark goes on
            self.samples = []

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.active:
            self.thread.join()
        self.mean = round(statistics.fmean(self.samples), 1) if self.samples else None


def write_dataset(folder: Path, count: int, sides: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """A prepared dataset (metadata.jsonl + images/) of one synthetic character in three crop groups,
    with short sides drawn from ``sides[group]`` and as many tags as ``TAG_COUNTS[group]`` allows."""
    from lorafactory.testing.synthetic import CHARACTERS

    if (folder / "metadata.jsonl").is_file() and len((folder / "metadata.jsonl").read_text().splitlines()) == count:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, tag_rng, character, lines = random.Random(seed), random.Random(seed + 1), CHARACTERS[0], []
    for i in range(count):
        group = GROUPS[i % 3]
        side, aspect = rng.randint(*sides[group]), rng.choice(ASPECTS)
        size = (side, round(side / aspect)) if aspect <= 1 else (round(side * aspect), side)
        outfit = i % len(character.accents)
        character.draw(*size, outfit=outfit, rng=rng).save(folder / "images" / f"{i:04d}.png")
        tags = tag_rng.sample(TAG_POOL, tag_rng.randint(*TAG_COUNTS[group]))
        record = {"file": f"images/{i:04d}.png", "group": group, "source": "bench", "post_id": str(i)}
        lines.append(json.dumps({**record, "tags": tags}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def factory_dataset(work: Path, images: int, tiny: bool) -> Path:
    """The benchmark's dataset of ``images`` images under ``work`` (written once, then found there by every
    benchmark that trains on it): full-size crops, or small ones for the tiny models."""
    size = "tiny" if tiny else "full"
    return write_dataset(work / f"dataset-{images}-{size}-v3", images, TINY_SIDES if tiny else FULL_SIZE_SIDES)


def project_training(step_times: list[float], train_wall: float, save_every: int, planned: int) -> dict | None:
    """The planned run's training seconds from a shorter run's step log (``t`` of each step, from the start).

    Up to the step after the first checkpoint, everything counts once: set-up, compiling each new shape,
    the first validation. Later steps count at their mean (checkpoint steps left out), and each later
    checkpoint at what the last one took (the time after the last step). None when the run was too short
    to have steps after its first checkpoint."""
    warm = save_every + 1
    steady = [
        later - earlier
        for step, (earlier, later) in enumerate(zip(step_times, step_times[1:]), start=2)
        if step > warm and (step - 1) % save_every
    ]
    if not steady:
        return None
    step_s = statistics.fmean(steady)
    deciles = statistics.quantiles(steady, n=10) if len(steady) > 1 else steady * 9
    spread = {"median": statistics.median(steady), "p10": deciles[0], "p90": deciles[-1]}
    checkpoint_s = train_wall - step_times[-1]
    later_checkpoints = math.ceil(planned / save_every) - 1  # the last one ends an off-grid run too
    projected = step_times[warm - 1] + step_s * (planned - warm) + checkpoint_s * later_checkpoints
    return {
        "warm_up_s": round(step_times[warm - 1], 2),
        "steady_step_s": step_s,
        "step_ms": {key: round(value * 1000, 1) for key, value in spread.items()},
        "projected_s": projected,
    }


def checkpoint_seconds(marks: list[tuple[float, int]], images: int, checkpoints: int) -> list[float] | None:
    """Seconds each checkpoint took, from the evaluation task's advances (one per image rendered): from one
    checkpoint's last image to the next one's (the first from the task's start, so it holds the one-time costs:
    the first adapter load, kernel plans, a compile). None unless every image of every checkpoint was rendered."""
    ends = []
    for seconds, done in marks:
        if done == images * (len(ends) + 1) and len(ends) < checkpoints:
            ends.append(seconds)
    if len(ends) < checkpoints:
        return None
    return [later - earlier for earlier, later in zip([0.0, *ends], ends)]


def inputs(preset: str, work: Path, images: int, tiny: bool) -> tuple[list[str], Path]:
    """The random base model, CLIP and dataset a measurement uses (built once, then found in ``work``): the
    settings that point at them, and the dataset folder."""
    from lorafactory.testing.tiny_sd import build_tiny_clip, build_tiny_sd, build_tiny_sdxl

    sdxl = preset.startswith("sdxl")
    size = "tiny" if tiny else "full"
    base = (build_tiny_sdxl if sdxl else build_tiny_sd)(
        work / f"{'sdxl' if sdxl else 'sd15'}-{size}", full_size=not tiny
    )
    overrides = [
        'character.name="Bench"',
        f'train.base_model="{base}"',
        f'evaluate.clip_model="{build_tiny_clip(work / f"clip-{size}", full_size=not tiny)}"',
    ]
    if tiny:
        overrides += ["train.resolution=128", "train.device='cpu'", "train.save_every=50", "train.min_steps=10"]
        overrides += ["evaluate.width=128", "evaluate.height=128", "evaluate.steps=4", "evaluate.bootstrap=50"]
    return overrides, factory_dataset(work, images, tiny)


_SHARES: dict[tuple[int, int, str], float] = {}  # sequential evaluation's simulated share of batches, per suite


def measure(preset: str, work: Path, images: int, steps: int | None, tiny: bool, extra: list[str]) -> dict:
    """One train + evaluate of ``preset``: measured spans, and the figures projected to the planned run."""
    import torch

    from evaluation_budget import sequential_share
    from lorafactory.config import load_settings
    from lorafactory.evaluate.evaluator import evaluate
    from lorafactory.train.length import planned_schedule, samples_per_step
    from lorafactory.train.trainer import train

    overrides, dataset = inputs(preset, work, images, tiny)
    settings = load_settings(preset=preset, overrides=overrides + extra)
    t = settings.train
    planned, t.save_every = planned_schedule(t, images)  # a long run's checkpoint interval widens
    measured = min(planned, math.ceil((steps or planned) / t.save_every) * t.save_every)
    t.max_steps = measured
    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # an earlier model in this process evaluated last
    timing = TimedProgress(torch.cuda.synchronize if cuda else lambda: None)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))

    wall, cpu = time.perf_counter(), time.process_time()
    with GpuLoad(cuda) as train_load:
        trained = train(settings, "bench", dataset, run_dir / "train", timing)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    if cuda:
        torch.cuda.synchronize()
        train_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    with GpuLoad(cuda) as eval_load:
        result = evaluate(
            settings, "bench", dataset, run_dir / "train", trained.checkpoints, {}, run_dir / "eval", timing
        )
    eval_wall, eval_cpu = time.perf_counter() - wall, time.process_time() - cpu

    loop = sum(timing.spans["training"])
    checkpoints = len(trained.checkpoints)
    evaluating = sum(timing.spans["evaluating checkpoints"])
    planned_checkpoints = math.ceil(planned / t.save_every)
    step_times = [json.loads(line)["t"] for line in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
    steady = project_training(step_times, train_wall, t.save_every, planned)
    # without steps after the first checkpoint: every step at the loop's mean (warm-up and compiling included)
    train_projected = steady["projected_s"] if steady else (train_wall - loop) + loop / measured * planned
    per_checkpoint = checkpoint_seconds(
        timing.advances["evaluating checkpoints"], result.counts["images_per_checkpoint"], checkpoints
    )
    # the first checkpoint once (its one-time costs), the later ones at their mean; one checkpoint: at its time
    first_s = per_checkpoint[0] if per_checkpoint else evaluating / checkpoints
    checkpoint_s = statistics.fmean(per_checkpoint[1:]) if per_checkpoint and checkpoints > 1 else first_s
    measured_s = sum(per_checkpoint) if per_checkpoint else evaluating
    eval_projected = eval_wall - measured_s + first_s + checkpoint_s * (planned_checkpoints - 1)
    gpu_seconds = train_projected + eval_projected
    suite = (result.counts["images_per_checkpoint"], planned_checkpoints, settings.evaluate.model_dump_json())
    if suite not in _SHARES:  # a simulation of some seconds: once per process
        _SHARES[suite] = sequential_share(settings.evaluate, *suite[:2])
    share = _SHARES[suite]
    sequential_seconds = gpu_seconds - checkpoint_s * planned_checkpoints * (1 - share)
    return {
        "preset": preset,
        "settings": extra,
        "images": images,
        "batch": t.batch_size,
        "full_batches": t.full_batches,
        "resolution": t.resolution,
        "dtype": trained.details["dtype"],
        "eval_images_per_checkpoint": result.counts["images_per_checkpoint"],
        "eval_images_rendered": result.counts["images_rendered"],
        "eval_seconds": result.details["seconds"],  # rendering, loading, waiting for scores and files
        "eval_size": f"{settings.evaluate.width}x{settings.evaluate.height}",
        "sampler_steps": settings.evaluate.steps,
        "measured_steps": measured,
        "measured_checkpoints": checkpoints,
        "planned_steps": planned,
        "planned_checkpoints": planned_checkpoints,
        "train_wall_s": round(train_wall, 2),
        "train_cpu_s": round(train_cpu, 2),
        "train_loop_s": round(loop, 2),
        # samples per step are known only when every batch is full (train.full_batches, the default)
        "samples_per_s": round(measured * samples_per_step(t) / loop, 2) if t.full_batches else None,
        "steady_samples_per_s": (
            round(samples_per_step(t) / steady["steady_step_s"], 2) if steady and t.full_batches else None
        ),
        "warm_up_s": steady["warm_up_s"] if steady else None,  # to the step after the first checkpoint
        "steady_step_ms": steady["step_ms"] if steady else None,  # median, 10th and 90th percentile
        "train_peak_gib": round(train_peak, 2) if cuda else None,
        "train_gpu_util": train_load.mean,  # percent, whole device (every concurrent model counts)
        "eval_gpu_util": eval_load.mean,
        "eval_wall_s": round(eval_wall, 2),
        "eval_cpu_s": round(eval_cpu, 2),
        "eval_s_per_checkpoint": round(checkpoint_s, 2),  # a later checkpoint's, when one was measured
        "eval_first_checkpoint_s": round(first_s, 2),
        "projected_train_s": round(train_projected, 1),
        "projected_eval_s": round(eval_projected, 1),
        "projected_gpu_s_per_model": round(gpu_seconds, 1),
        "eval_share": round(eval_projected / gpu_seconds, 3),
        "models_per_gpu_day": round(86400 / gpu_seconds, 1),
        "eval_sequential_share": round(share, 3),
        "projected_gpu_s_per_model_sequential": round(sequential_seconds, 1),
        "models_per_gpu_day_sequential": round(86400 / sequential_seconds, 1),
    }


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> dict:
    """Median, min and max of the headline figures per preset and number of concurrent models; for a
    concurrent run also its models per GPU-day summed over the models that shared the GPU."""
    keys = (
        "samples_per_s",
        "steady_samples_per_s",
        "warm_up_s",
        "eval_s_per_checkpoint",
        "eval_first_checkpoint_s",
        "train_gpu_util",
        "eval_gpu_util",
        "projected_gpu_s_per_model",
        "models_per_gpu_day",
        "projected_gpu_s_per_model_sequential",
        "models_per_gpu_day_sequential",
    )
    summary = {}
    groups = dict.fromkeys((r["preset"], r["concurrent"], r["model_in_process"] > 0) for r in rows)
    several = any(r["model_in_process"] > 0 for r in rows)
    for preset, concurrent, later in groups:
        mine = [
            r
            for r in rows
            if r["preset"] == preset and r["concurrent"] == concurrent and (r["model_in_process"] > 0) == later
        ]
        figures = {key: _spread(values) for key in keys if (values := [r[key] for r in mine if r[key] is not None])}
        runs: dict[tuple[int, int], list[float]] = {}
        for row in mine:
            runs.setdefault((row["repeat"], row["model_in_process"]), []).append(row["models_per_gpu_day"])
        whole = [round(sum(day), 1) for day in runs.values() if len(day) == concurrent]
        if concurrent > 1 and whole:
            figures["models_per_gpu_day_all_together"] = _spread(whole)
        name = f"{preset} x{concurrent}" + ((" later models" if later else " first model") if several else "")
        summary[name] = figures  # "x3": three models at once on the GPU
    return summary


def _use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def measure_in_turn(models: int, *args) -> list[dict]:
    """``models`` measurements one after another in this process, as a resident fleet worker runs its jobs;
    each is printed as it ends, so that a run cut short by a time limit still shows what it measured."""
    rows = []
    for index in range(models):
        rows.append({"model_in_process": index, **measure(*args)})
        print("measured:", json.dumps(rows[-1]), flush=True)
    return rows


def run_together(preset: str, concurrent: int, work: Path, args: argparse.Namespace) -> list[list[dict]]:
    """``concurrent`` processes at once, each measuring ``args.models_per_process`` models of ``preset`` in
    turn; every process is fresh (also a single one, so that every count starts alike). The shared inputs
    are built first, here. One list of measurements per process."""
    inputs(preset, work, args.images, args.tiny)
    threads = max(1, (os.cpu_count() or 1) // concurrent)  # the CPUs shared out, as a fleet's GPU jobs get them
    with ProcessPoolExecutor(concurrent, get_context("spawn"), _use_threads, (threads,)) as pool:
        measured = (preset, work, args.images, args.steps, args.tiny, args.set)
        runs = [pool.submit(measure_in_turn, args.models_per_process, *measured) for _ in range(concurrent)]
        return [run.result() for run in runs]


def environment(tiny: bool) -> dict:
    import diffusers
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else platform.processor() or "CPU"
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="sd15-anime (default) and/or sdxl-anime; repeatable")
    parser.add_argument("--images", type=int, default=200, help="dataset images (default 200)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps and project (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per preset, alternating presets (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the results")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and datasets (kept)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks the script only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every run")
    parser.add_argument("--tag", default="", help="added to the result file's name (e.g. 'compiled')")
    parser.add_argument(
        "--concurrent", default="1", help="models at once on the GPU, comma-separated counts to compare (default 1)"
    )
    parser.add_argument(
        "--models-per-process", type=int, default=1, help="models one after another in each process (default 1)"
    )
    args = parser.parse_args()
    counts = [int(count) for count in args.concurrent.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafactory-factory-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from lorafactory.testing.standin_hub import build_standin_hub

    os.environ["HF_HUB_OFFLINE"], os.environ["HF_HUB_CACHE"] = "1", str(build_standin_hub(work / "hub"))
    presets = args.preset or ["sd15-anime"]
    env = environment(args.tiny)
    stem = "tiny" if args.tiny else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out / f"factory_throughput_{'_'.join(presets)}{tag}_{stem}_{env['date'][:10]}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for repeat in range(args.repeats):
        order = [(preset, count) for preset in presets for count in counts]
        for preset, count in order if repeat % 2 == 0 else reversed(order):  # alternate the order
            for lane, in_turn in enumerate(run_together(preset, count, work, args)):
                rows += [{"repeat": repeat, "concurrent": count, "lane": lane, **measured} for measured in in_turn]
            summary = summarise(rows)  # written after every run: a run cut short keeps what it measured
            path.write_text(json.dumps({"environment": env, "runs": rows, "summary": summary}, indent=1) + "\n")

    print(f"\n{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}; {args.images} images")
    for name, figures in summary.items():
        last = next(r for r in reversed(rows) if r["preset"] == name.split(" x", 1)[0])
        print(
            f"{name}: {last['planned_steps']} planned steps at batch {last['batch']}, "
            f"{last['planned_checkpoints']} checkpoints x {last['eval_images_per_checkpoint']} images "
            f"({last['eval_size']}, {last['sampler_steps']} sampler steps); measured {last['measured_steps']} steps"
        )
        for key, stats in figures.items():
            print(f"  {key:<38} median {stats['median']:>9} (min {stats['min']}, max {stats['max']})")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
