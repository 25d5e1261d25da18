"""The release stage: the kept checkpoints' files, previews, metrics, plot and model card.

Layout::

    README.md                      model card (Hugging Face front matter)
    <trigger>.safetensors          best step: LoRA with the embedding bundled (A1111)
    <trigger>_lora.safetensors     best step: plain kohya LoRA (ComfyUI, diffusers, ...)
    embeddings/<trigger>.{safetensors,pt}
    previews/*.png                 best step
    metrics.csv, metrics_plot.png, train.toml
    steps/<step>/                  every kept step: the same four files, previews/, metrics.json

Nothing in it holds a secret or a local absolute path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tomli_w

from lorafactory.config import Settings
from lorafactory.errors import StageError
from lorafactory.evaluate.layout import step_dir
from lorafactory.evaluate.scoring import METRICS
from lorafactory.export.kohya import PLAIN_LORA_SUFFIX
from lorafactory.export.verify import verify_model_files
from lorafactory.release.card import CardInput, model_card
from lorafactory.train.trainer import BUNDLED_FILE, EMBEDDING_FILE, EMBEDDING_PT_FILE, LORA_FILE
from lorafactory.workspace import write_bytes_atomic

_TRAIN_SUMMARY_KEYS = (
    "base_model",
    "resolution",
    "max_steps",
    "save_every",
    "batch_size",
    "gradient_accumulation",
    "lora_rank",
    "lora_alpha",
    "unet_lr",
    "embedding_lr",
    "embedding_vectors",
    "embedding_pivot",
    "text_encoder_lora_rank",
    "optimizer",
    "lr_scheduler",
    "clip_skip",
    "noise_offset",
    "min_snr_gamma",
    "prior_loss_weight",
    "seed",
    "mixed_precision",
)
# prompts shown first in previews, as on the reference's cards
_PREVIEW_ORDER = ("portrait", "full_body", "smile", "free", "bikini")


def model_name(base_model: str) -> str:
    """A base model as others can find it: a hub id stays, a local path becomes its file or folder name."""
    path = Path(base_model).expanduser()
    return path.name if path.is_absolute() or base_model.startswith((".", "~")) or path.exists() else base_model


def train_summary(settings: Settings, family: str) -> dict:
    t = settings.train
    summary = {key: getattr(t, key) for key in _TRAIN_SUMMARY_KEYS if getattr(t, key) is not None}
    summary["base_model"] = model_name(t.base_model)
    summary["family"] = family
    summary["regularization"] = bool(t.regularization_dir)
    return summary


def _copy_step_files(source: Path, target: Path, trigger: str) -> list[str]:
    """Copy a checkpoint's files under their release names, each read back whole first."""
    (target / "embeddings").mkdir(parents=True, exist_ok=True)
    pairs = [
        (BUNDLED_FILE, f"{trigger}.safetensors"),
        (LORA_FILE, f"{trigger}{PLAIN_LORA_SUFFIX}.safetensors"),
        (EMBEDDING_FILE, f"embeddings/{trigger}.safetensors"),
        (EMBEDDING_PT_FILE, f"embeddings/{trigger}.pt"),
    ]
    for name, destination in pairs:
        shutil.copyfile(source / name, target / destination)
    verify_model_files(
        [target / destination for _, destination in pairs],
        f"nothing was released: rerun with --force train (checkpoint {source.name})",
    )
    return [destination for _, destination in pairs]


def choose_previews(step_metrics: dict, count: int, nsfw: bool) -> list[str]:
    """Image files to show: the best-recognised image of each prompt, favourite prompts first."""
    per_image = step_metrics.get("per_image", {})
    best: dict[str, tuple[float, str]] = {}
    for filename, values in per_image.items():
        prompt = filename.rsplit("_", 1)[0]
        if prompt.startswith("n_") and not nsfw:
            continue
        score = values.get("ccip", 0.0)
        if prompt not in best or score > best[prompt][0]:
            best[prompt] = (score, filename)
    order = sorted(best, key=lambda p: (_PREVIEW_ORDER.index(p) if p in _PREVIEW_ORDER else len(_PREVIEW_ORDER), p))
    return [best[p][1] for p in order][:count]


def release(
    settings: Settings,
    trigger: str,
    train_dir: Path,
    trained: dict,
    eval_dir: Path,
    evaluation: dict,
    dataset_counts: dict,
    core_tags: list[str],
    out_dir: Path,
    stand_in: bool,
) -> dict:
    """Release the kept steps of the run whose train manifest details are ``trained``."""
    checkpoints = {int(step): path for step, path in trained["checkpoints"].items()}
    family = trained.get("family", "sd1")
    failed = {int(step): why for step, why in evaluation.get("failed", {}).items()}
    kept = [int(step) for step in evaluation["kept_steps"] if int(step) not in failed]
    if not kept:
        step, why = next(iter(failed.items()))
        raise StageError(
            (
                f"no checkpoint loaded during evaluation (step {step}: {why}); nothing "
                "to release — check train/checkpoints, then rerun with --force train"
            )
        )
    best = kept[0]
    previews: dict[int, list[str]] = {}
    for step in kept:
        target = out_dir / "steps" / str(step)
        _copy_step_files(train_dir / checkpoints[step], target, trigger)
        metrics_file = step_dir(eval_dir, step) / "metrics.json"
        step_metrics = json.loads(metrics_file.read_text())
        shutil.copyfile(metrics_file, target / "metrics.json")
        (target / "previews").mkdir()
        previews[step] = choose_previews(step_metrics, settings.release.preview_count, settings.release.nsfw_previews)
        for name in previews[step]:
            shutil.copyfile(step_dir(eval_dir, step) / name, target / "previews" / name)
    _copy_step_files(train_dir / checkpoints[best], out_dir, trigger)
    (out_dir / "previews").mkdir()
    for name in previews[best]:
        shutil.copyfile(step_dir(eval_dir, best) / name, out_dir / "previews" / name)
    shutil.copyfile(eval_dir / "metrics.csv", out_dir / "metrics.csv")
    shutil.copyfile(eval_dir / "metrics_plot.png", out_dir / "metrics_plot.png")
    # the run's planned length and grid, as the trainer recorded them (a dataset-sized run widens
    # train.save_every to keep within train.max_checkpoints); read off the checkpoints for older manifests
    schedule = trained.get("schedule") or {"steps": max(checkpoints), "save_every": min(checkpoints)}
    summary = {**train_summary(settings, family), **schedule}
    write_bytes_atomic(out_dir / "train.toml", tomli_w.dumps({"train": summary}).encode())

    table = {int(s): row for s, row in evaluation["metrics"].items()}
    card = model_card(
        CardInput(
            name=settings.character.name,
            trigger=trigger,
            base_model=summary["base_model"],
            license=settings.release.license,
            kept=kept,
            reason=evaluation["reason"],
            table=table,
            labels=METRICS,
            intervals=_intervals(eval_dir),
            missing=evaluation.get("missing_metrics", {}),
            core_tags=core_tags,
            dataset_counts=dataset_counts,
            train_summary=summary,
            previews=[f"previews/{name}" for name in previews[best]],
            stand_in=stand_in,
            family=family,
            tags=settings.release.tags,
        )
    )
    write_bytes_atomic(out_dir / "README.md", card.encode("utf-8"))
    files = sorted(
        str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    return {"step": best, "kept_steps": kept, "previews": len(previews[best]), "files": files}


def _intervals(eval_dir: Path) -> dict[int, dict[str, list[float] | None]]:
    data = json.loads((eval_dir / "metrics.json").read_text())
    return {int(step): entry.get("intervals", {}) for step, entry in data.items()}
