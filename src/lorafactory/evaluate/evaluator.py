"""The evaluate stage: render the prompt set for every checkpoint, score it, pick the best step."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from lorafactory.config import Settings
from lorafactory.evaluate.generate import Generator, a1111_parameters, jobs, save_png
from lorafactory.evaluate.metrics import ccip_recscore
from lorafactory.evaluate.select import best_step
from lorafactory.progress import Progress
from lorafactory.train.data import read_metadata
from lorafactory.train.model import load_pipeline, resolve_device, resolve_dtype
from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE
from lorafactory.vision.ccip import default_threshold, differences, extract_features
from lorafactory.workspace import write_json_atomic

log = logging.getLogger(__name__)
METRIC_COLUMNS = ("ccip_recscore", "ccip_image_share", "validation_loss")


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "steps" / f"step-{step:06d}"


def evaluate(
    settings: Settings,
    trigger: str,
    dataset_dir: Path,
    train_dir: Path,
    checkpoints: dict[int, str],
    validation_loss: dict[int, float],
    out_dir: Path,
    progress: Progress,
) -> tuple[dict, dict, dict[int, dict[str, float | None]], int]:
    """Returns (counts, details, metrics per step, selected step); a metric that could not be
    computed is None ("missing"), never zero."""
    e, v, t = settings.evaluate, settings.vision, settings.train
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset_images = []
    for record in read_metadata(dataset_dir):
        with Image.open(dataset_dir / record["file"]) as image:
            dataset_images.append(image.convert("RGB"))
    with progress.task("CCIP features of the dataset", total=len(dataset_images)) as task:
        dataset_features = extract_features(dataset_images, v.ccip_model, on_batch=task.advance)
    np.save(out_dir / "dataset_features.npy", dataset_features)
    threshold = e.ccip_threshold if e.ccip_threshold is not None else default_threshold(v.ccip_model)

    work = jobs(e.prompts, trigger, e.negative_prompt)
    device = resolve_device(t.device)
    generator = Generator(load_pipeline(t.base_model, resolve_dtype(t.mixed_precision, device), t.base_config), e, t.clip_skip, device)
    metrics: dict[int, dict[str, float | None]] = {}
    per_image: dict[int, dict[str, float]] = {}
    failed: dict[int, str] = {}
    with progress.task("evaluating checkpoints", total=len(checkpoints) * len(work)) as task:
        for step in sorted(checkpoints):
            folder = train_dir / checkpoints[step]
            target = step_dir(out_dir, step)
            target.mkdir(parents=True, exist_ok=True)
            try:
                generator.load(folder / LORA_FILE, folder / EMBEDDING_FILE, trigger)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                log.warning("checkpoint at step %d failed to load, skipped: %s", step, exc)
                failed[step] = str(exc).splitlines()[0]
                metrics[step] = {name: None for name in METRIC_COLUMNS} | {"validation_loss": validation_loss.get(step)}
                task.advance(len(work))
                continue
            images = []
            for job, image in generator.render(work, on_image=task.advance):
                save_png(image, target / job.filename, a1111_parameters(job, e, t.clip_skip, Path(t.base_model).name))
                images.append(image)
            generator.unload(trigger, t.embedding_vectors)
            features = extract_features(images, v.ccip_model)
            score = ccip_recscore(differences(features, dataset_features, v.ccip_model), threshold)
            metrics[step] = {
                "ccip_recscore": score.pair_share,
                "ccip_image_share": score.image_share,
                "validation_loss": validation_loss.get(step),
            }
            per_image[step] = {job.filename: value for job, value in zip(work, score.per_image)}
            write_json_atomic(target / "metrics.json", {"step": step, **metrics[step], "per_image": per_image[step]})

    selected, reason = best_step({step: m["ccip_recscore"] for step, m in metrics.items()})
    with (out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *METRIC_COLUMNS, "selected"])
        for step in sorted(metrics):
            writer.writerow([step, *("" if metrics[step][c] is None else f"{metrics[step][c]:.6f}" for c in METRIC_COLUMNS), int(step == selected)])
    write_json_atomic(out_dir / "metrics.json", {str(s): m for s, m in sorted(metrics.items())})
    counts = {"checkpoints": len(checkpoints), "images_per_checkpoint": len(work), "failed_checkpoints": len(failed)}
    details = {"selected_step": selected, "reason": reason, "ccip_threshold": threshold, "failed": {str(k): v for k, v in failed.items()}}
    return counts, details, metrics, selected
