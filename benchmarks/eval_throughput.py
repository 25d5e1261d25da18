"""Evaluation throughput: images per second, and the time adapter swapping saves over reloading
the base pipeline for every checkpoint. Run by hand:

    PYTHONPATH=src python benchmarks/eval_throughput.py [WORKDIR] [--checkpoints 4] [--full-size]

Both ways render the same prompts with the same seeds for the same checkpoints, measured side by
side in one run. ``--full-size`` uses random-initialised full-size SD1.5 at 512x768 and 25 sampler
steps (for a GPU); the default is the tiny test model on CPU. Scoring (CCIP, tagger, classifiers,
CLIP with the stand-in models) is timed separately.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--full-size", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lorafactory-eval-bench-"))

    from lorafactory.testing.standin_hub import build_standin_hub

    os.environ["HF_HUB_OFFLINE"], os.environ["HF_HUB_CACHE"] = "1", str(build_standin_hub(work / "hub"))

    from gpu_throughput import make_dataset  # noqa: E402 - the benchmarks folder is the script's own
    from lorafactory.config import load_settings
    from lorafactory.evaluate.generate import Generator
    from lorafactory.evaluate.prompts import jobs, prompt_specs
    from lorafactory.evaluate.scoring import Scorer
    from lorafactory.progress import SilentProgress
    from lorafactory.testing.tiny_sd import build_tiny_clip, build_tiny_sd
    from lorafactory.train.model import load_pipeline, resolve_device, resolve_dtype
    from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE, checkpoint_dir, train
    from lorafactory.vision.ccip import default_threshold, extract_features

    model = build_tiny_sd(work / ("sd15-full" if args.full_size else "tiny-sd"), full_size=args.full_size)
    overrides = [
        f'train.base_model="{model}"',
        f"train.max_steps={args.checkpoints}",
        "train.save_every=1",
        "train.validation_split=0",
        f'evaluate.clip_model="{build_tiny_clip(work / "tiny-clip")}"',
        'evaluate.prompt_set="custom"',
        "evaluate.cluster_prompts=false",
        'evaluate.prompts=[{name = "portrait", prompt = "portrait", count = 4}, '
        '{name = "bikini", prompt = "beach, bikini", count = 4}]',
    ]
    if args.full_size:
        overrides += [
            "train.resolution=512",
            "train.batch_size=1",
            "evaluate.steps=25",
            "evaluate.width=512",
            "evaluate.height=768",
            "evaluate.batch_size=8",
        ]
    else:
        overrides += [
            "train.resolution=128",
            "train.batch_size=2",
            "evaluate.steps=6",
            "evaluate.width=128",
            "evaluate.height=128",
            "evaluate.batch_size=4",
        ]
    settings = load_settings(preset="tiny-demo", overrides=overrides)
    dataset = make_dataset(work / f"dataset-{settings.train.resolution}", settings.train.resolution, count=8)
    out = work / ("train-full" if args.full_size else "train")
    checkpoints = train(settings, "akane_hoshino", dataset, out, SilentProgress()).checkpoints
    e, t = settings.evaluate, settings.train
    device = resolve_device(t.device if not args.full_size else "auto")
    dtype = resolve_dtype(t.mixed_precision, device)
    work_items = jobs(e, prompt_specs(e, []), "akane_hoshino")
    folders = [checkpoint_dir(out, step) for step in sorted(checkpoints)]

    def render(generator, folder):
        generator.load(folder / LORA_FILE, folder / EMBEDDING_FILE, "akane_hoshino")
        images = [image for _, image in generator.render(work_items)]
        generator.unload("akane_hoshino", t.embedding_vectors)
        return images

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    render(
        Generator(load_pipeline(t.base_model, dtype), e, t.clip_skip, device), folders[0]
    )  # warm-up (kernels, caches)
    start = synced()
    swapping = Generator(load_pipeline(t.base_model, dtype), e, t.clip_skip, device)
    images = [render(swapping, folder) for folder in folders]
    swap_s = synced() - start
    start = synced()
    for folder in folders:
        render(Generator(load_pipeline(t.base_model, dtype), e, t.clip_skip, device), folder)
    reload_s = synced() - start

    features = extract_features(images[0][:4], settings.vision.ccip_model)
    scorer = Scorer(settings, "akane_hoshino", features, default_threshold(settings.vision.ccip_model), device)
    start = synced()
    for batch in images:
        scorer.score(work_items, batch)
    score_s = synced() - start

    n = len(folders) * len(work_items)
    print(
        f"device {device}, {'full-size SD1.5 512x768' if args.full_size else 'tiny SD1 128x128'}, "
        f"{e.steps} sampler steps, "
        f"{len(folders)} checkpoints x {len(work_items)} images"
    )
    print(f"{'mode':<26}{'seconds':>10}{'images/s':>10}")
    print(f"{'adapter swapping':<26}{swap_s:>10.2f}{n / swap_s:>10.2f}")
    print(f"{'reload per checkpoint':<26}{reload_s:>10.2f}{n / reload_s:>10.2f}")
    print(f"{'scoring (all metrics)':<26}{score_s:>10.2f}{n / score_s:>10.2f}")
    print(
        f"swapping saves {reload_s - swap_s:.2f} s ({(reload_s - swap_s) / len(folders):.2f} "
        f"s per checkpoint); time ratio swap/reload {swap_s / reload_s:.2f}"
    )
    if scorer.missing:
        print(f"missing metrics: {scorer.missing}")


if __name__ == "__main__":
    main()
