"""Where a training step's milliseconds go: the torch profiler over steps of our own trainer.

Builds random full-size SD1.5 (or SDXL with ``--sdxl``), trains ``--warmup`` steps (timed: with
``train.compile`` this is the compile), times ``--timed`` steps without the profiler, then profiles
``--steps`` steps and writes, under ``--out``:
- ``train_profile_<model>.txt``: the operators by device time and by host time, the host-device
  synchronisations and copies counted, and the step's wall time against its GPU work (kernel and
  copy time, and their number): a loop that is far from its GPU time is bound by the host;
- with ``--trace``, ``train_profile_<model>.json.gz``: the Chrome trace (open in Perfetto).

    PYTHONPATH=src python benchmarks/train_profile.py [--sdxl] [--batch 8] [--resolution 512] [--out DIR] [--tiny]
        [--warmup 5] [--timed 10] [--steps 10] [--trace] [--set train.compile=true --tag compiled]

``--tiny`` runs the tiny model on CPU: a check of the script itself.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
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
    parser.add_argument("--timed", type=int, default=10, help="steps timed without the profiler")
    parser.add_argument("--steps", type=int, default=10, help="steps profiled")
    parser.add_argument("--trace", action="store_true", help="also write the Chrome trace")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="a train setting, e.g. train.compile=true")
    parser.add_argument("--tag", default="", help="added to the output names, e.g. compiled")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafactory-profile-"))

    from gpu_throughput import bench_run, make_dataset  # noqa: E402 - the benchmarks folder is the script's own
    from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    name = "sdxl" if args.sdxl else "sd15"
    size = "tiny" if args.tiny else "full"
    model = (build_tiny_sdxl if args.sdxl else build_tiny_sd)(work / f"{name}-{size}", full_size=not args.tiny)
    side = args.resolution or (128 if args.tiny else 1024 if args.sdxl else 512)
    run = bench_run(
        model,
        make_dataset(work / f"data-{side}", side, count=4 * args.batch),
        work / "out",
        side,
        "cpu" if args.tiny else "cuda",
        f"train.batch_size={args.batch}",
        *args.set,
    )
    cuda = run.device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    def seconds(steps: int) -> float:
        """Wall seconds of ``steps`` training steps, the GPU's queued work included."""
        started = time.perf_counter()
        for _ in range(steps):
            run.step()
        synchronize()
        return time.perf_counter() - started

    warmup = seconds(args.warmup)
    timed = seconds(args.timed) / max(args.timed, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        wall = seconds(args.steps) / args.steps
    events = prof.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # the GPU's own rows (kernels, copies): an operator's row repeats the time of the kernels it launched
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1000 / args.steps if cuda else float("nan")
    launches = sum(e.count for e in kernels) / args.steps
    counts = {key: sum(e.count for e in events if e.key == key) / args.steps for key in SYNC_EVENTS + COPY_EVENTS}

    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"train_profile_{name}{'_tiny' if args.tiny else ''}_b{args.batch}_{side}{'_' + args.tag if args.tag else ''}"
    )
    lines = [
        f"{name} {side}px batch {args.batch}, {run.dtype}, {torch.cuda.get_device_name() if cuda else 'CPU'}"
        + (f"; {', '.join(args.set)}" if args.set else ""),
        f"warm-up: {args.warmup} steps in {warmup:.1f} s",
        f"without the profiler: step wall time {timed * 1000:.1f} ms, samples/s {args.batch / timed:.1f}",
        f"profiled: step wall time {wall * 1000:.1f} ms; per step {kernel_ms:.1f} ms of GPU work in {launches:g} "
        f"kernels and copies, so the GPU is busy {kernel_ms / (timed * 1000):.0%} of an unprofiled step",
        "per step: " + ", ".join(f"{key} {value:g}" for key, value in counts.items()),
        "",
        "by device time:" if cuda else "by host time:",
        events.table(sort_by=device_key, row_limit=40),
        "by host time:",
        events.table(sort_by="self_cpu_time_total", row_limit=25),
    ]
    (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    if args.trace:
        trace = work / f"{stem}.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as source, gzip.open(args.out / f"{stem}.json.gz", "wb") as target:
            shutil.copyfileobj(source, target)
    print("\n".join(lines[:5]))
    print(f"written: {args.out / (stem + '.txt')}")


if __name__ == "__main__":
    main()
