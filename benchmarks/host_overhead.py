"""The host's share of a training step, measured without a GPU.

The tiny test models keep SD1.5's and SDXL's full depth (every block, attention and LoRA layer) at
narrow widths, so at batch 1 and 64 px a step on one CPU thread is almost all host work: Python, the
module tree, autograd and one dispatch per operator, the work that on a GPU launches each kernel. On
the H100 the trainer ran about as many steps/s at batch 8 as at batch 4, so this host work is what
bounds it there; this benchmark shows how large it is and what a change does to it, between GPU sessions.

``--bf16`` trains in bf16 autocast as on a GPU, for the operator counts: the casts autocast adds are
then counted, but this CPU's bf16 arithmetic is slow enough to swamp the host time. Variants are
alternated and repeated; per step it reports the aten operators dispatched (exact; a
compiled region's fused kernels are not aten operators), host wall ms (median and spread) and process
CPU ms. By hand, never as a test:

    PYTHONPATH=src:benchmarks python benchmarks/host_overhead.py [--sdxl] [--bf16] [--repeats 3] [--steps 10]
        [--tags 3] [--variant NAME=SETTING[,SETTING...]] [--out benchmarks/results]

``--tags N`` captions every image with N two-word tags (three by default): past about 17 a caption takes
a second chunk of 75 tokens, as crawled full-body images' WD14 captions often do, past about 35 a third.

Default variants: ``eager``; ``frozen-text`` (past the pivot, the text encoder runs without autograd);
``compiled`` (``train.compile``: each transformer block through inductor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

VARIANTS = {
    "eager": [],
    "frozen-text": ["train.embedding_pivot=0.00001"],
    "compiled": ["train.compile=true"],
}


def build_run(model: Path, data: Path, work: Path, precision: str, overrides: list[str]):
    from gpu_throughput import bench_run

    return bench_run(
        model, data, work, 64, "cpu", "train.batch_size=1", f'train.mixed_precision="{precision}"', *overrides
    )


def timed(run, steps: int) -> tuple[float, float]:
    """Host wall and process CPU milliseconds per step."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        run.step()
    return (time.perf_counter() - wall) * 1000 / steps, (time.process_time() - cpu) * 1000 / steps


def operators_per_step(run) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as on a GPU (for operator counts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tags", type=int, default=3, help="tags per caption (about 17 fill a 75-token chunk)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SETTING[,SETTING...]; replaces defaults")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the host's work, not the arithmetic spread over cores

    from gpu_throughput import alternated, make_dataset, variant_settings
    from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    variants = variant_settings(args.variant) if args.variant else VARIANTS
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafactory-host-"))
    name = "sdxl" if args.sdxl else "sd15"
    precision = "bf16" if args.bf16 else "no"
    model = (build_tiny_sdxl if args.sdxl else build_tiny_sd)(work / f"{name}-tiny")
    tags = [f"{colour} {item}" for item in ("dress", "skirt", "coat", "shirt") for colour in ("red", "blue", "green")]
    data = make_dataset(work / f"data-64-{args.tags}-tags", 64, count=8, tags=(tags * 10)[: args.tags])
    runs, built = {}, {}
    for variant, overrides in variants.items():
        started = time.perf_counter()
        runs[variant] = build_run(model, data, work / f"out-{variant}", precision, overrides)
        timed(runs[variant], args.warmup)  # a compiled variant compiles here
        built[variant] = round(time.perf_counter() - started, 1)
    walls, cpus = alternated(runs, args.repeats, lambda run: timed(run, args.steps))
    rows = []
    for variant, run in runs.items():
        rows.append(
            {
                "model": name,
                "variant": variant,
                "precision": "bf16" if args.bf16 else "fp32",  # under autocast unless the variant turns it off
                "settings": variants[variant],
                "tags_per_caption": args.tags,
                "aten_ops_per_step": operators_per_step(run),
                "wall_ms_median": round(statistics.median(walls[variant]), 1),
                "wall_ms_min": round(min(walls[variant]), 1),
                "wall_ms_max": round(max(walls[variant]), 1),
                "cpu_ms_median": round(statistics.median(cpus[variant]), 1),
                "setup_and_warmup_s": built[variant],
                "repeats": args.repeats,
                "steps": args.steps,
                "torch": torch.__version__,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    with (args.out / f"host_overhead_{name}_cpu_{stamp}.log").open("a", encoding="utf-8") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
    print(f"{name}, batch 1, 64 px, {rows[0]['precision']}, {args.tags} tags a caption, 1 CPU thread: per step")
    for row in rows:
        print(
            f"{row['variant']:>12}: {row['aten_ops_per_step']:6d} aten ops, wall {row['wall_ms_median']:6.1f} ms "
            f"[{row['wall_ms_min']:.1f}-{row['wall_ms_max']:.1f}], CPU {row['cpu_ms_median']:6.1f} ms "
            f"(setup + warm-up {row['setup_and_warmup_s']} s)"
        )


if __name__ == "__main__":
    main()
