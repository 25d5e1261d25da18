"""Host time of putting a checkpoint into the evaluation pipeline: a fresh LoRA load (and its unload)
against a hotswap into the layers already in place, as ``evaluate.generate.Generator`` does.

The tiny test model has SD1.5's full depth (every attention layer a LoRA targets), so building the
LoRA layers costs here what it costs at full size; the weights themselves are small either way. The
two ways alternate over the checkpoints of a short tiny training run, repeated; it prints the median
and spread of wall time and process CPU time per checkpoint. By hand:

    PYTHONPATH=src python benchmarks/adapter_swap.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def trained_checkpoints(work: Path) -> tuple[Path, list[Path]]:
    """A tiny model and the checkpoint folders of 12 training steps (one every 4)."""
    from gpu_throughput import make_dataset
    from lorafactory.config import load_settings
    from lorafactory.progress import SilentProgress
    from lorafactory.testing.tiny_sd import build_tiny_sd
    from lorafactory.train.trainer import train

    model = build_tiny_sd(work / "tiny-sd")
    settings = load_settings(
        preset="tiny-demo",
        overrides=[
            'character.name="Bench"',
            f'train.base_model="{model}"',
            "train.max_steps=12",
            "train.save_every=4",
            "train.validation_split=0.0",
        ],
    )
    result = train(settings, "bench", make_dataset(work / "data", 128, count=8), work / "out", SilentProgress())
    return model, [work / "out" / folder for _, folder in sorted(result.checkpoints.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lorafactory.config import load_settings
    from lorafactory.evaluate.generate import Generator
    from lorafactory.train.model import load_pipeline
    from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE

    model, checkpoints = trained_checkpoints(Path(tempfile.mkdtemp(prefix="lorafactory-swap-")))
    settings = load_settings(preset="tiny-demo").evaluate
    generator = Generator(load_pipeline(str(model)), settings, 1, torch.device("cpu"))
    times: dict[str, list[tuple[float, float]]] = {"fresh load + unload": [], "hotswap": []}
    for _ in range(args.repeats):
        for way in times:  # alternated
            keep = way == "hotswap"
            generator.load(checkpoints[0] / LORA_FILE, checkpoints[0] / EMBEDDING_FILE, "bench")
            generator.unload("bench", 2, keep_adapter=keep)
            wall, cpu = time.perf_counter(), time.process_time()
            for folder in checkpoints[1:]:
                generator.load(folder / LORA_FILE, folder / EMBEDDING_FILE, "bench")
                generator.unload("bench", 2, keep_adapter=keep)
            count = len(checkpoints) - 1
            times[way].append(
                ((time.perf_counter() - wall) * 1000 / count, (time.process_time() - cpu) * 1000 / count)
            )
            generator.unload("bench", 2)
    for way, rows in times.items():
        walls, cpus = zip(*rows)
        print(
            f"{way:>20}: wall {statistics.median(walls):6.1f} ms [{min(walls):.1f}-{max(walls):.1f}], "
            f"CPU {statistics.median(cpus):6.1f} ms per checkpoint (with its embedding)"
        )


if __name__ == "__main__":
    main()
