"""What ``train.compile`` costs on a bucketed dataset: graphs compiled, and the time until the last one.

Each variant (default: ``dynamic``, sizes symbolic from the first step, the default; ``static``,
``train.compile_dynamic=false``) trains ``--steps`` steps of the factory benchmark's synthetic dataset
(mixed buckets, captions of one and two 75-token chunks) in a fresh process, so nothing one compiled
serves another (inductor's on-disk caches are off too). Per run it reports the graphs dynamo compiled,
the step that compiled the last one, the wall and process CPU seconds from the first step to the end of
that step, the compile's own share of them (those steps less what they take once compiled), and the later
steps' median wall time. The variants take turns, ``--repeats`` times; the graph counts are exact, the
times are medians with spread.

On CPU, ``--backend aot_eager`` counts the graphs quickly (capture without code generation); on a GPU the
default inductor backend gives the real compile time. ``--tiny`` uses the tiny model at 128 px.

    PYTHONPATH=src:benchmarks python benchmarks/compile_graphs.py [--steps 40] [--repeats 3] [--batch 4]
        [--resolution 512] [--images 48] [--backend inductor] [--tiny] [--out benchmarks/results]
        [--variant NAME=SETTING[,SETTING...]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"dynamic": [], "static": ["train.compile_dynamic=false"]}


def child(args: argparse.Namespace, settings: list[str]) -> dict:
    """One compiled run in this process: what its steps compiled and when."""
    import torch
    from torch._dynamo.utils import counters

    from factory_throughput import factory_dataset
    from gpu_throughput import bench_run
    from lorafactory.testing.tiny_sd import build_tiny_sd

    size = "tiny" if args.tiny else "full"
    model = build_tiny_sd(args.work / f"sd15-{size}", full_size=not args.tiny)
    data = factory_dataset(args.work, args.images, args.tiny)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    run = bench_run(
        model,
        data,
        Path(tempfile.mkdtemp(dir=args.work)),
        args.resolution,
        device,
        f"train.batch_size={args.batch}",
        "train.compile=true",
        f'train.compile_backend="{args.backend}"',
        f'train.latent_cache_dir="{args.work / f"latents-{size}-{args.resolution}"}"',
        *settings,
    )
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    ends, graphs, last = [], 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(1, args.steps + 1):
        run.step()
        sync()
        ends.append((time.perf_counter() - wall, time.process_time() - cpu))
        if counters["stats"]["unique_graphs"] != graphs:
            graphs, last = counters["stats"]["unique_graphs"], step
    if not graphs:
        raise SystemExit(f"nothing was compiled in {args.steps} steps: is train.compile reaching the UNet?")
    later = [b[0] - a[0] for a, b in zip(ends[last - 1 :], ends[last:])]
    step_s = statistics.median(later) if later else 0.0
    return {
        "graphs": graphs,
        "eager_fallbacks": counters["frames"]["total"] - counters["frames"]["ok"],
        "last_compile_step": last,
        "to_last_compile_s": round(ends[last - 1][0], 2),
        "to_last_compile_cpu_s": round(ends[last - 1][1], 2),
        "later_step_ms": round(step_s * 1000, 1) if later else None,
        # the compile's own cost: the steps up to the last compile less what they take once compiled
        "compile_s": round(ends[last - 1][0] - last * step_s, 2) if later else None,
        "buckets": len({ex.bucket for ex in run.examples}),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 128 px: a check of the script")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SETTING[,SETTING...]; replaces defaults")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a variant's settings, as JSON
    args = parser.parse_args()
    if args.tiny:
        args.resolution = 128
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="lorafactory-compile-"))).resolve()
    if args.child is not None:
        print(json.dumps(child(args, json.loads(args.child))))
        return

    from gpu_throughput import variant_settings

    variants = variant_settings(args.variant) if args.variant else VARIANTS
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", "benchmarks", env.get("PYTHONPATH")]))
    flags = [f"--{name}={getattr(args, name)}" for name in ("steps", "batch", "resolution", "images", "backend")]
    flags += ["--tiny"] * args.tiny + [f"--work={args.work}"]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, settings in variants.items():
            command = [sys.executable, __file__, *flags, "--child", json.dumps(settings)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            row = {"variant": name, "settings": settings, "repeat": repeat, **json.loads(done.stdout.splitlines()[-1])}
            rows[name].append(row)
            print(json.dumps(row), flush=True)
    first = next(iter(rows.values()))[0]
    print(
        f"{first['device']}, torch {first['torch']}, {args.backend}; {first['buckets']} buckets, batch {args.batch}, "
        f"{args.resolution} px, {args.steps} steps, {args.repeats} runs each (median [min-max])"
    )
    for name, runs in rows.items():
        figure = {key: spread([r[key] or 0 for r in runs]) for key in runs[0] if key.endswith(("_s", "_ms"))}
        print(
            f"{name:>8}: {runs[0]['graphs']} graphs (last at step {runs[0]['last_compile_step']}); to the end of "
            f"that step {figure['to_last_compile_s']} s wall, {figure['to_last_compile_cpu_s']} s CPU; "
            f"compiling {figure['compile_s']} s; later steps {figure['later_step_ms']} ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    device = first["device"].lower().replace("nvidia ", "").replace(" ", "-")
    path = args.out / f"compile_graphs_{device}_{time.strftime('%Y-%m-%d')}.log"
    with path.open("a", encoding="utf-8") as log:
        for runs in rows.values():
            for row in runs:
                log.write(json.dumps({**row, "backend": args.backend, "steps": args.steps}) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
