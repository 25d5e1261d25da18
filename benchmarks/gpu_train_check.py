"""CUDA correctness check of the trainer (the CPU test suite cannot reach these paths).

For tiny SD1 and SDXL models, in bf16 and in fp16 (with the grad scaler), each under autocast and
without it (``train.autocast=false``: half-precision working copies of float32 masters), with a
text-encoder LoRA and a validation loss: train 8 steps straight, train 4 + resume 4, compare the
weights, then load the exported files with diffusers' own loaders on the GPU and render one image.
Then, in bf16 with and without autocast, a few steps under CUDA's sync debug mode: a training step
must never make the host wait for the GPU.
Prints one JSON line per case and exits non-zero on any failure.

    PYTHONPATH=src python benchmarks/gpu_train_check.py [WORKDIR]
"""

from __future__ import annotations

import json
import random
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lorafactory.config import load_settings
from lorafactory.progress import SilentProgress
from lorafactory.testing.synthetic import CHARACTERS
from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl
from lorafactory.train.model import load_pipeline
from lorafactory.train.text import ENCODER_KEYS
from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE, _Run, checkpoint_dir, train


def make_dataset(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for i in range(12):
        size = rng.choice([(128, 192), (192, 128), (128, 128)])
        CHARACTERS[0].draw(*size, outfit=i % 3, rng=rng).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"file": f"images/{i}.png", "tags": ["1girl", "smile"], "post_id": str(i)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _settings(model: Path, precision: str, *extra: str):
    overrides = [
        'character.name="Check"',
        f'train.base_model="{model}"',
        'train.device="cuda"',
        f'train.mixed_precision="{precision}"',
        "train.max_steps=8",
        "train.save_every=4",
        "train.text_encoder_lora_rank=2",
        "train.validation_split=0.2",
    ]
    return load_settings(preset="tiny-demo", overrides=[*overrides, *extra])


def check(model: Path, precision: str, autocast: bool, data: Path, work: Path) -> dict:
    settings = _settings(model, precision, f"train.autocast={str(autocast).lower()}")
    straight = train(settings, "check", data, work / "straight", SilentProgress())
    train(settings, "check", data, work / "resumed", SilentProgress(), stop_after=4)
    resumed = train(settings, "check", data, work / "resumed", SilentProgress())
    a = load_file(checkpoint_dir(work / "straight", 8) / LORA_FILE)
    b = load_file(checkpoint_dir(work / "resumed", 8) / LORA_FILE)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    finite = all(torch.isfinite(t).all() for t in a.values())

    pipe = load_pipeline(str(model), dtype=torch.float16).to("cuda")
    folder = checkpoint_dir(work / "straight", 8)
    pipe.load_lora_weights(str(folder / LORA_FILE))
    if hasattr(pipe, "text_encoder_2"):
        emb = load_file(folder / EMBEDDING_FILE)
        for key, tok, enc in zip(
            ENCODER_KEYS, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
        ):
            pipe.load_textual_inversion(emb[key], token="check", tokenizer=tok, text_encoder=enc)
    else:
        pipe.load_textual_inversion(str(folder / EMBEDDING_FILE), token="check")
    image = pipe("check, smile", num_inference_steps=4, height=128, width=128, output_type="np").images[0]
    return {
        "model": straight.details["family"],
        "precision": straight.details["dtype"],
        "autocast": autocast,
        "resume_max_abs_gap": gap,
        "finite": bool(finite),
        "validation_mean": straight.details["validation_loss"]["8"]["mean"],
        "resumed_validation_equal": straight.details["validation_loss"] == resumed.details["validation_loss"],
        "render_finite": bool(np.isfinite(image).all()),
    }


def check_no_sync(model: Path, autocast: bool, data: Path, work: Path) -> dict:
    """Steps after warm-up under ``torch.cuda.set_sync_debug_mode("error")``: the first operation that
    would block the host on the GPU (``.item()``, a copy from pageable memory, ...) raises and is reported."""
    settings = _settings(model, "bf16", "train.max_steps=100", f"train.autocast={str(autocast).lower()}")
    run = _Run(settings, "check", data, work, SilentProgress())
    for _ in range(3):  # first calls move scheduler tables and create optimizer state
        run.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            run.step()
        sync = None
    except RuntimeError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        sync = f"{str(exc).splitlines()[0]} at {frame.filename}:{frame.lineno}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"model": run.base.family, "check": "steps without host sync", "autocast": autocast, "sync": sync}


def main(work: Path) -> None:
    data = make_dataset(work / "data")
    models = {"sd1": build_tiny_sd(work / "tiny-sd"), "sdxl": build_tiny_sdxl(work / "tiny-sdxl")}
    failed = False
    for name, model in models.items():
        for autocast in (True, False):
            for precision in ("bf16", "fp16"):
                result = check(model, precision, autocast, data, work / f"{name}-{precision}-{autocast}")
                ok = result["finite"] and result["render_finite"] and result["resume_max_abs_gap"] < 1e-2
                failed |= not ok
                print(json.dumps({**result, "ok": ok}), flush=True)
            result = check_no_sync(model, autocast, data, work / f"{name}-sync-{autocast}")
            failed |= result["sync"] is not None
            print(json.dumps({**result, "ok": result["sync"] is None}), flush=True)
    if failed:
        raise SystemExit("a CUDA check failed")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lorafactory-gpu-check"))
