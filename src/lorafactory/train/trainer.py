"""The train stage: pivotal tuning on diffusers + peft, step-based, with a checkpoint every N steps."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorafactory.config import Settings
from lorafactory.errors import StageError
from lorafactory.export.embedding import write_a1111_pt, write_embedding_safetensors
from lorafactory.export.kohya import bundle_tensors, lora_metadata, unet_lora_tensors, write_safetensors
from lorafactory.progress import Progress
from lorafactory.train.data import batch_plan, build_caption, load_examples, read_metadata
from lorafactory.train.embedding import encode_text, expand_trigger, install_trigger
from lorafactory.train.model import load_base, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
BUNDLED_FILE = "bundled.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
EMBEDDING_PT_FILE = "embedding.pt"


@dataclass
class TrainResult:
    checkpoints: dict[int, str]
    counts: dict[str, int]
    details: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def _save_checkpoint(
    out_dir: Path, step: int, settings: Settings, trigger: str, unet, vectors: torch.Tensor, num_images: int, tag_frequency
) -> Path:
    folder = checkpoint_dir(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    t = settings.train
    tensors = unet_lora_tensors(unet, t.lora_alpha)
    common = dict(
        trigger=trigger,
        rank=t.lora_rank,
        alpha=t.lora_alpha,
        steps=step,
        resolution=t.resolution,
        clip_skip=t.clip_skip,
        num_train_images=num_images,
        tag_frequency=tag_frequency,
        base_model_name=Path(t.base_model).name,
        seed=t.seed,
    )
    write_safetensors(folder / LORA_FILE, tensors, lora_metadata(output_name=trigger, tensors=tensors, **common))
    bundled = {**tensors, **bundle_tensors(trigger, vectors)}
    write_safetensors(folder / BUNDLED_FILE, bundled, lora_metadata(output_name=trigger, tensors=bundled, **common))
    write_embedding_safetensors(folder / EMBEDDING_FILE, vectors)
    write_a1111_pt(folder / EMBEDDING_PT_FILE, trigger, vectors, step, Path(t.base_model).name)
    return folder


def train(settings: Settings, trigger: str, dataset_dir: Path, out_dir: Path, progress: Progress) -> TrainResult:
    """Train a UNet LoRA plus the trigger embedding; checkpoints land in ``out_dir/checkpoints``."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    t = settings.train
    seed_everything(t.seed)
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.mixed_precision, device)
    started = time.monotonic()

    base = load_base(t.base_model)
    for module in (base.text_encoder, base.unet, base.vae):
        module.requires_grad_(False)
        module.to(device)
    base.vae.to(dtype=torch.float32)  # encoding once; float32 avoids NaN latents from half-precision VAEs

    with progress.task("encoding images", total=len(read_metadata(dataset_dir))) as task:
        examples, counts = load_examples(dataset_dir, base.vae, t.resolution, t.bucket_step, device, on_item=task.advance)
    if not examples:
        raise StageError(f"no training images fit train.resolution={t.resolution}; lower train.bucket_step or add larger images")
    base.vae.to("cpu")

    base.text_encoder.to(dtype=dtype)
    base.unet.to(dtype=dtype)
    vectors = install_trigger(base.tokenizer, base.text_encoder, trigger, t.embedding_vectors, t.embedding_init, t.seed)
    vectors.data = vectors.data.to(device)  # stays float32 while the frozen weights may be half precision
    base.unet.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=list(t.lora_targets)))
    lora_params = [p for p in base.unet.parameters() if p.requires_grad]
    if not lora_params:
        raise StageError(f"train.lora_targets {t.lora_targets} matched no UNet layer; use names such as to_q, to_k, to_v")
    for param in lora_params:
        param.data = param.data.float()
    base.unet.train()

    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": t.unet_lr, "weight_decay": t.weight_decay},
            {"params": [vectors], "lr": t.embedding_lr, "weight_decay": t.embedding_weight_decay},
        ]
    )
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    prediction_type = noise_scheduler.config.prediction_type

    tag_frequency = {"dataset": dict(Counter(tag for ex in examples for tag in [trigger] + ex.tags).most_common())}
    rng = random.Random(t.seed)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    plan: list[list[int]] = []
    losses: list[float] = []
    checkpoints: dict[int, str] = {}
    log_path = out_dir / "train_log.jsonl"
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with progress.task("training", total=t.max_steps) as task, log_path.open("w", encoding="utf-8") as log_file:
        for step in range(1, t.max_steps + 1):
            if not plan:
                plan = batch_plan(examples, t.batch_size, rng)
            batch = [examples[i] for i in plan.pop()]
            latents = torch.stack([ex.latent for ex in batch]).to(device)
            captions = [
                expand_trigger(build_caption(trigger, ex.tags, rng, t.shuffle_tags, t.tag_dropout, t.caption_dropout), trigger, t.embedding_vectors)
                for ex in batch
            ]
            ids = base.tokenizer(
                captions, padding="max_length", truncation=True, max_length=base.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(device)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
            try:
                with autocast:
                    hidden = encode_text(base.text_encoder, ids, t.clip_skip)
                    prediction = base.unet(noisy.to(dtype), timesteps, hidden).sample
                loss = F.mse_loss(prediction.float(), target.float())
                loss.backward()
            except torch.cuda.OutOfMemoryError as exc:
                raise StageError(
                    "out of GPU memory while training; lower train.batch_size or train.resolution, or set train.mixed_precision = 'bf16'"
                ) from exc
            if not torch.isfinite(loss):
                raise StageError(f"training loss became {loss.item()} at step {step}; lower train.unet_lr or train.embedding_lr")
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            record = {"step": step, "loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0], "t": round(time.monotonic() - started, 4)}
            log_file.write(json.dumps(record) + "\n")
            task.advance()
            if step % t.save_every == 0 or step == t.max_steps:
                folder = _save_checkpoint(out_dir, step, settings, trigger, base.unet, vectors, len(examples), tag_frequency)
                checkpoints[step] = str(folder.relative_to(out_dir))

    counts.update({"images": len(examples), "steps": t.max_steps, "checkpoints": len(checkpoints)})
    details = {
        "trigger": trigger,
        "buckets": dict(Counter(f"{w}x{h}" for w, h in (ex.bucket for ex in examples))),
        "final_loss": float(np.mean(losses[-10:])),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(time.monotonic() - started, 2),
        "checkpoints": {str(step): path for step, path in checkpoints.items()},
    }
    return TrainResult(checkpoints, counts, details)
