"""The release stage: assemble the chosen checkpoint's files, previews, metrics and model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from lorafactory.config import Settings
from lorafactory.evaluate.evaluator import step_dir
from lorafactory.release.card import model_card
from lorafactory.train.trainer import BUNDLED_FILE, EMBEDDING_FILE, EMBEDDING_PT_FILE, LORA_FILE
from lorafactory.workspace import write_bytes_atomic

_TRAIN_SUMMARY_KEYS = (
    "resolution", "max_steps", "batch_size", "lora_rank", "lora_alpha", "unet_lr", "embedding_lr",
    "embedding_vectors", "clip_skip", "seed",
)


def release(
    settings: Settings,
    trigger: str,
    train_dir: Path,
    checkpoints: dict[int, str],
    eval_dir: Path,
    eval_details: dict,
    metrics: dict[int, dict[str, float | None]],
    dataset_manifest_counts: dict,
    core_tags: list[str],
    out_dir: Path,
    stand_in: bool,
    family: str,
) -> dict:
    step = int(eval_details["selected_step"])
    source = train_dir / checkpoints[step]
    shutil.copyfile(source / BUNDLED_FILE, out_dir / f"{trigger}.safetensors")
    shutil.copyfile(source / LORA_FILE, out_dir / f"{trigger}_lora.safetensors")
    (out_dir / "embeddings").mkdir()
    shutil.copyfile(source / EMBEDDING_FILE, out_dir / "embeddings" / f"{trigger}.safetensors")
    shutil.copyfile(source / EMBEDDING_PT_FILE, out_dir / "embeddings" / f"{trigger}.pt")

    previews_dir = out_dir / "previews"
    previews_dir.mkdir()
    previews = sorted(step_dir(eval_dir, step).glob("*.png"))[: settings.release.preview_count]
    for preview in previews:
        shutil.copyfile(preview, previews_dir / preview.name)
    shutil.copyfile(eval_dir / "metrics.csv", out_dir / "metrics.csv")

    card = model_card(
        name=settings.character.name,
        trigger=trigger,
        base_model=settings.train.base_model,
        license=settings.release.license,
        selected_step=step,
        reason=eval_details["reason"],
        metrics=metrics,
        core_tags=core_tags,
        dataset_counts={k: v for k, v in dataset_manifest_counts.items() if k in ("raw", "after_cleaning", "dataset")},
        train_summary={k: getattr(settings.train, k) for k in _TRAIN_SUMMARY_KEYS},
        previews=[f"previews/{p.name}" for p in previews],
        stand_in=stand_in,
        family=family,
    )
    write_bytes_atomic(out_dir / "README.md", card.encode("utf-8"))
    return {"step": step, "previews": len(previews), "files": sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())}
