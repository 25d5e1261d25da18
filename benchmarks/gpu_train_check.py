"""GPU check of the trainer: a random-initialised full-size SD1.5 at 512 px, bf16 autocast.

Prints one JSON line per batch size with steps/s (after warm-up) and peak GPU memory, and fails
if the loss or the exported LoRA is not finite. Run by hand on a CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_train_check.py /tmp/lorafactory-gpu
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafactory.config import load_settings
from lorafactory.progress import SilentProgress
from lorafactory.testing.synthetic import CHARACTERS
from lorafactory.testing.tiny_sd import build_tiny_sd
from lorafactory.train.trainer import LORA_FILE, train

WARMUP = 5


def make_dataset(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i in range(count):
            size = rng.choice([(512, 768), (768, 512), (640, 640), (704, 896)])
            CHARACTERS[0].draw(*size, outfit=i % 3, rng=rng).save(folder / "images" / f"{i}.png")
            handle.write(json.dumps({"file": f"images/{i}.png", "tags": ["1girl", "solo", "smile"]}) + "\n")
    return folder


def main(work: Path) -> None:
    model = build_tiny_sd(work / "sd15-random", full_size=True)
    dataset = make_dataset(work / "dataset", 32)
    for batch in (4, 8):
        settings = load_settings(
            overrides=[
                'character.name="Akane Hoshino"', f'train.base_model="{model}"', "train.resolution=512",
                f"train.batch_size={batch}", "train.max_steps=30", "train.save_every=30", 'train.device="cuda"',
            ]
        )  # fmt: skip
        out = work / f"train-b{batch}"
        out.mkdir(parents=True, exist_ok=True)
        torch.cuda.reset_peak_memory_stats()
        result = train(settings, "akane_hoshino", dataset, out, SilentProgress())
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        span = log[-1]["t"] - log[WARMUP - 1]["t"]
        lora = load_file(out / result.checkpoints[30] / LORA_FILE)
        finite = all(torch.isfinite(t).all() for t in lora.values()) and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
        print(json.dumps({
            "gpu": torch.cuda.get_device_name(), "resolution": 512, "batch": batch, "dtype": result.details["dtype"],
            "steps_per_s": round((len(log) - WARMUP) / span, 3), "images_per_s": round(batch * (len(log) - WARMUP) / span, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "final_loss": round(result.details["final_loss"], 4),
            "buckets": result.details["buckets"], "finite": bool(finite),
        }), flush=True)  # fmt: skip
        if not finite:
            raise SystemExit("non-finite loss or LoRA weights")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lorafactory-gpu"))
