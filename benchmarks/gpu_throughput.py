"""Trainer throughput on random-initialised full-size SD1.5 and SDXL (bf16), run by hand on a CUDA GPU.

For each model, resolution (512, 1024), gradient checkpointing (off, on) and batch (4, 8): steps/s
and images/s after warm-up, and peak GPU memory, through our own trainer's step (LoRA + pivotal
embedding, SDPA attention). Out-of-memory configurations are reported, not fatal.

    PYTHONPATH=src python benchmarks/gpu_throughput.py [WORKDIR] [--tiny]

``--tiny`` uses the tiny test models on CPU: a quick check of the script itself.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from lorafactory.config import load_settings
from lorafactory.progress import SilentProgress
from lorafactory.testing.synthetic import CHARACTERS
from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl
from lorafactory.train.trainer import _Run

WARMUP, TIMED = 2, 6
Run = TypeVar("Run")


def variant_settings(specs: list[str]) -> dict[str, list[str]]:
    """``--variant NAME=SETTING[,SETTING...]`` arguments as name -> settings (``NAME=`` has none)."""
    return {name: [s for s in spec.split(",") if s] for name, _, spec in (v.partition("=") for v in specs)}


def alternated(
    runs: dict[str, Run], repeats: int, measure: Callable[[Run], tuple[float, float]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``measure(run)`` (wall, CPU) of every run ``repeats`` times, the runs taking turns, so that drift on a
    shared machine hits every variant alike: each variant's walls and CPU times."""
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = measure(run)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return walls, cpus


def make_dataset(folder: Path, side: int, count: int = 16, tags: list[str] | None = None) -> Path:
    """Square images exactly ``side`` pixels wide, so every batch fills one bucket; each captioned with
    ``tags`` (default three)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for i in range(count):
        CHARACTERS[i % 2].draw(side, side, outfit=i % 3, rng=rng).save(folder / "images" / f"{i}.png")
        lines.append(
            json.dumps({"file": f"images/{i}.png", "tags": tags or ["1girl", "solo", "smile"], "post_id": str(i)})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bench_run(model: Path, data: Path, work: Path, resolution: int, device: str, *overrides: str) -> _Run:
    """Our trainer's run on ``model`` for timing its steps: no validation hold-out, a step count never reached;
    later ``overrides`` win."""
    settings = load_settings(
        overrides=[
            'character.name="Bench"',
            f'train.base_model="{model}"',
            f"train.resolution={resolution}",
            "train.validation_split=0.0",
            "train.max_steps=100000",
            f'train.device="{device}"',
            *overrides,
        ]
    )
    return _Run(settings, "bench", data, work, SilentProgress())


def measure(run: _Run, batch: int, checkpointing: bool) -> dict:
    run.t.batch_size = batch
    run.position.plan = []
    if checkpointing:
        run.base.unet.enable_gradient_checkpointing()
    else:
        run.base.unet.disable_gradient_checkpointing()
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(WARMUP):
            run.step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(TIMED):
            run.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / TIMED
    except torch.cuda.OutOfMemoryError:
        run.optimizer.zero_grad(set_to_none=True)
        return {"batch": batch, "checkpointing": checkpointing, "result": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        "batch": batch,
        "checkpointing": checkpointing,
        "steps_per_s": round(1 / seconds, 3),
        "images_per_s": round(batch / seconds, 2),
        "peak_gib": None if peak is None else round(peak, 2),
    }


def main(work: Path, tiny: bool) -> None:
    models = {
        "sd15": build_tiny_sd(work / "sd15", full_size=not tiny),
        "sdxl": build_tiny_sdxl(work / "sdxl", full_size=not tiny),
    }
    sides = (64, 128) if tiny else (512, 1024)
    rows = []
    for name, model in models.items():
        for side in sides:
            dataset = make_dataset(work / f"data-{side}", side)
            device = "cpu" if tiny else "cuda"
            run = bench_run(model, dataset, work / "out", side, device, "train.max_steps=1000")
            for checkpointing in (False, True):
                for batch in (4, 8):
                    row = {
                        "model": name,
                        "resolution": side,
                        "dtype": str(run.dtype).replace("torch.", ""),
                        **measure(run, batch, checkpointing),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            del run
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    device = "CPU" if tiny else torch.cuda.get_device_name()
    print(f"\n{device}: steps/s | images/s | peak GiB")
    for r in rows:
        figures = r.get("result") or f"{r['steps_per_s']:>7} | {r['images_per_s']:>7} | {r['peak_gib']}"
        print(
            (
                f"{r['model']:5} {r['resolution']:>5}px batch {r['batch']} "
                f"gc {'on ' if r['checkpointing'] else 'off'}: {figures}"
            )
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0] if args else "/tmp/lorafactory-bench"), "--tiny" in sys.argv)
