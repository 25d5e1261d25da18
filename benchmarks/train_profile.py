"""Where a training step's milliseconds go: the torch profiler over steps of our own trainer, variant beside variant.

Builds random full-size SD1.5 (or SDXL with ``--sdxl``) and one trainer run per variant
(``--variant NAME=SETTING[,SETTING...]``, repeatable; default one run with the ``--set`` settings),
trains ``--warmup`` steps of each (timed: with ``train.compile`` this is the compile), then times
``--timed`` steps of each without the profiler, the variants alternated, ``--repeats`` times (median,
spread and process CPU time), then profiles ``--steps`` steps of each and writes, under ``--out``:
- ``train_profile_<model>.txt``: per variant, the step's wall time against its GPU work (kernel and
  copy time, and their number: a loop far from its GPU time is bound by the host), the host-device
  synchronisations and copies counted, and the operators by device time and by host time;
- with ``--trace``, ``train_profile_<model>_<variant>.json.gz``: each Chrome trace (open in Perfetto).

The steps come from one square bucket with short captions, unless ``--factory-dataset N``: the factory
benchmark's synthetic dataset of N images (mixed buckets, caption lengths like WD14's), whose batches change
shape from step to step as a real run's do; its latents are encoded once, for every variant.

    PYTHONPATH=src:benchmarks python benchmarks/train_profile.py [--sdxl] [--batch 8] [--resolution 512]
        [--out DIR] [--tiny] [--warmup 5] [--timed 10] [--repeats 3] [--steps 10] [--trace]
        [--variant autocast= --variant half=train.autocast=false] [--set train.compile=true --tag compiled]
        [--factory-dataset 200]

``--tiny`` runs the tiny model on CPU: a check of the script itself.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::item",
    "aten::_local_scalar_dense",
)
COPY_EVENTS = ("cudaMemcpyAsync", "aten::copy_", "aten::to")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (SD1.5), 1024 (SDXL)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timed", type=int, default=10, help="steps timed without the profiler, per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per variant, alternated")
    parser.add_argument("--steps", type=int, default=10, help="steps profiled")
    parser.add_argument("--trace", action="store_true", help="also write the Chrome traces")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SETTING[,SETTING...], repeatable")
    parser.add_argument("--set", action="append", default=[], help="a train setting for every variant")
    parser.add_argument("--tag", default="", help="added to the output names, e.g. compiled")
    parser.add_argument(
        "--factory-dataset",
        type=int,
        default=0,
        metavar="IMAGES",
        help="the factory benchmark's synthetic dataset of IMAGES images (many buckets) instead of one square bucket",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafactory-profile-"))

    # the benchmarks folder is the script's own
    from gpu_throughput import alternated, bench_run, make_dataset, variant_settings  # noqa: E402
    from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    name = "sdxl" if args.sdxl else "sd15"
    size = "tiny" if args.tiny else "full"
    model = (build_tiny_sdxl if args.sdxl else build_tiny_sd)(work / f"{name}-{size}", full_size=not args.tiny)
    side = args.resolution or (128 if args.tiny else 1024 if args.sdxl else 512)
    shared = []
    if args.factory_dataset:
        from factory_throughput import factory_dataset

        data = factory_dataset(work, args.factory_dataset, args.tiny)
        shared = [f'train.latent_cache_dir="{work / f"latents-{name}-{size}"}"']
    else:
        data = make_dataset(work / f"data-{side}", side, count=4 * args.batch)
    variants = variant_settings(args.variant)
    device = "cpu" if args.tiny else "cuda"
    runs = {
        variant: bench_run(
            model,
            data,
            work / f"out-{variant}",
            side,
            device,
            f"train.batch_size={args.batch}",
            *shared,
            *args.set,
            *extra,
        )
        for variant, extra in (variants or {"default": []}).items()
    }
    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    def seconds(run, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds of ``steps`` training steps, the GPU's queued work included."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            run.step()
        synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    warmup = {variant: seconds(run, args.warmup)[0] for variant, run in runs.items()}

    def per_step_ms(run) -> tuple[float, float]:
        """Wall and process CPU milliseconds per step, over a block of ``args.timed`` steps."""
        wall, cpu = seconds(run, args.timed)
        steps = max(args.timed, 1)
        return wall * 1000 / steps, cpu * 1000 / steps

    walls, cpus = alternated(runs, args.repeats, per_step_ms)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"train_profile_{name}{'_tiny' if args.tiny else ''}_b{args.batch}_{side}{'_' + args.tag if args.tag else ''}"
    )
    header = f"{name} {side}px batch {args.batch}, {torch.cuda.get_device_name() if cuda else 'CPU'}" + (
        f"; for every variant: {', '.join(args.set)}" if args.set else ""
    )
    if args.factory_dataset:
        buckets = {example.bucket for example in next(iter(runs.values())).examples}
        header += f"; the factory's {args.factory_dataset}-image dataset, {len(buckets)} buckets"
    lines, summary = [header, ""], [header]
    for variant, run in runs.items():
        step_ms = statistics.median(walls[variant])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=False) as prof:
            wall = seconds(run, args.steps)[0] / args.steps
        events = prof.key_averages()
        device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
        # the GPU's own rows (kernels, copies): an operator's row repeats the time of the kernels it launched
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1000 / args.steps if cuda else float("nan")
        launches = sum(e.count for e in kernels) / args.steps
        counts = {key: sum(e.count for e in events if e.key == key) / args.steps for key in SYNC_EVENTS + COPY_EVENTS}
        operators = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
        figures = [
            f"== {variant}: {', '.join(variants.get(variant, [])) or 'as set'}; {run.dtype}",
            f"warm-up: {args.warmup} steps in {warmup[variant]:.1f} s",
            f"without the profiler: step wall time {step_ms:.1f} ms (median of {args.repeats} blocks of "
            f"{args.timed}, {min(walls[variant]):.1f}-{max(walls[variant]):.1f}), process CPU "
            f"{statistics.median(cpus[variant]):.1f} ms, samples/s {args.batch * 1000 / step_ms:.1f}",
            f"profiled: step wall time {wall * 1000:.1f} ms; per step {operators:g} aten operators, "
            f"{kernel_ms:.1f} ms of GPU work in {launches:g} kernels and copies, so the GPU is busy "
            f"{kernel_ms / step_ms:.0%} of an unprofiled step",
            "per step: " + ", ".join(f"{key} {value:g}" for key, value in counts.items()),
        ]
        summary += figures
        lines += [
            *figures,
            "",
            "by device time:" if cuda else "by host time:",
            events.table(sort_by=device_key, row_limit=40),
            "by host time:",
            events.table(sort_by="self_cpu_time_total", row_limit=25),
            "",
        ]
        if args.trace:
            trace = work / f"{stem}_{variant}.json"
            prof.export_chrome_trace(str(trace))
            with trace.open("rb") as source, gzip.open(args.out / f"{stem}_{variant}.json.gz", "wb") as target:
                shutil.copyfileobj(source, target)
    (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(summary))
    print(f"written: {args.out / (stem + '.txt')}")


if __name__ == "__main__":
    main()
