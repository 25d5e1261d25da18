"""The train stage: pivotal tuning on diffusers + peft, step-based, with a checkpoint every N steps.

Each checkpoint writes the release formats (kohya LoRA, bundled LoRA, embeddings), a validation
loss, and the full training state, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorafactory.config import Settings, changed_setting, legacy_dump, recorded_settings, settings_hash
from lorafactory.errors import ConfigError, StageError
from lorafactory.export.embedding import write_a1111_pt, write_embedding_safetensors
from lorafactory.export.kohya import (
    PLAIN_LORA_SUFFIX,
    bundle_tensors,
    lora_metadata,
    text_encoder_lora_tensors,
    unet_lora_tensors,
    write_safetensors,
)
from lorafactory.progress import Progress
from lorafactory.train.buckets import fixed_buckets
from lorafactory.train.collective import Collective, in_worker
from lorafactory.train.data import (
    Example,
    LatentCache,
    batch_plan,
    build_caption,
    load_examples,
    make_resident,
    read_metadata,
    split_validation,
)
from lorafactory.train.events import TrainEvents
from lorafactory.train.length import with_planned_steps
from lorafactory.train.master import MasterWeights
from lorafactory.train.model import compile_blocks, host_tensor, load_base, resolve_device, resolve_dtype
from lorafactory.train.objective import per_sample_mse, sample_noise, snr_weights, target_for
from lorafactory.train.optim import build_optimizer, build_scheduler
from lorafactory.train.resume import LoopPosition, Stateful, load_state, save_state, saved_state
from lorafactory.train.steplog import StepLog
from lorafactory.train.text import TextEncoders
from lorafactory.train.validation import ValidationSet

log = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
BUNDLED_FILE = "bundled.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
EMBEDDING_PT_FILE = "embedding.pt"
LOG_FILE = "train_log.jsonl"
NO_CUDNN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BeforeState = Callable[[dict[str, float] | None], None]  # gets a checkpoint's validation loss


@dataclass
class TrainResult:
    checkpoints: dict[int, str]
    counts: dict[str, int]
    details: dict
    finished: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def _dataset_hash(dataset_dir: Path) -> str:
    return hashlib.sha256((dataset_dir / "metadata.jsonl").read_bytes()).hexdigest()[:16]


def skip_lora_input_casts(*modules: torch.nn.Module) -> None:
    """Turn off peft's cast of each LoRA layer's input to its weights' dtype (float32 here). Under autocast the
    LoRA matmuls run in the half-precision dtype anyway, so that cast and autocast's cast back only added two
    elementwise kernels per layer each way; the values are the same bit for bit. This is the switch
    ``peft.helpers.disable_input_dtype_casting`` sets, kept for the whole run."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in modules:
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.cast_input_dtype_enabled = False


def _rewind_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the saved state, before an interruption)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


class _Run:
    """Everything one training run holds; ``step()`` advances it by one optimizer step."""

    def __init__(self, settings: Settings, trigger: str, dataset_dir: Path, out_dir: Path, progress: Progress) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        t = self.t = settings.train
        self.settings, self.trigger, self.out_dir = settings, trigger, out_dir
        seed_everything(t.seed)
        self.device = resolve_device(t.device)
        self.collective = Collective(self.device)
        self.device = self.collective.device or self.device
        self.dtype = resolve_dtype(t.mixed_precision, self.device)
        base = self.base = load_base(t.base_model, t.base_config)
        for module in (*base.text_encoders, base.unet, base.vae):
            module.requires_grad_(False)
            module.to(self.device)
        base.vae.to(dtype=torch.float32)  # encoding once; float32 avoids NaN latents from half-precision VAEs
        cache_dir = Path(t.latent_cache_dir).expanduser() if t.latent_cache_dir else None
        model_key = settings_hash(t.base_model, json.loads(json.dumps(dict(base.vae.config), default=str)))
        self.cache = LatentCache(base.vae, model_key, self.device, cache_dir)
        fixed = (
            fixed_buckets(t.resolution, t.bucket_step, t.resolution // 2, t.resolution * 2)
            if t.bucket_mode == "fixed"
            else None
        )
        regularization_dir = Path(t.regularization_dir).expanduser() if t.regularization_dir else None
        if regularization_dir is not None and not (regularization_dir / "metadata.jsonl").is_file():
            raise StageError(
                f"train.regularization_dir {regularization_dir} is not a prepared dataset (no metadata.jsonl)"
            )
        total = len(read_metadata(dataset_dir)) + (len(read_metadata(regularization_dir)) if regularization_dir else 0)
        with progress.task("encoding images", total=total) as task:
            load = dict(
                resolution=t.resolution,
                step=t.bucket_step,
                flip=t.flip,
                cached=t.cache_latents,
                on_item=task.advance,
                fixed=fixed,
            )
            examples, self.counts = load_examples(dataset_dir, self.cache, **load)
            regular = (
                load_examples(regularization_dir, self.cache, regularization=True, **load)[0]
                if regularization_dir
                else []
            )
        self.examples, held_out = split_validation(examples, t.validation_split, t.seed)
        self.counts["regularization_images"] = len(regular)
        self.examples += regular
        for example in held_out:  # the validation set is fixed: always encoded once
            if example.latent is None:
                example.latent = self.cache.encode(example.pixels.unsqueeze(0))[0].cpu()
        self.counts["latents_encoded"] = self.cache.encoded
        if t.cache_latents:
            base.vae.to("cpu")
            if self.device.type != "cpu":
                self.counts["resident_latents"] = int(make_resident(self.examples, self.device))
        if not self.examples:
            raise StageError(
                f"no training images fit train.resolution={t.resolution}; lower train.bucket_step or add larger images"
            )

        for module in (*base.text_encoders, base.unet):
            module.to(dtype=self.dtype)
        self.text = TextEncoders(
            base.family,
            base.tokenizers,
            base.text_encoders,
            trigger,
            t.embedding_vectors,
            t.embedding_init,
            t.clip_skip,
            t.seed,
            t.max_token_length // 75,
        )
        self.text.to(self.device)
        self.text_lora = self._add_text_encoder_lora() if t.text_encoder_lora_rank else {}
        try:
            base.unet.add_adapter(
                LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=list(t.lora_targets))
            )
        except ValueError:  # peft: no module matches
            self.lora = {}
        else:
            if t.channels_last:  # every 4-D weight, the LoRA's convolutions included; later casts keep the layout
                base.unet.to(memory_format=torch.channels_last)
            self.lora = {name: p for name, p in base.unet.named_parameters() if p.requires_grad}
        if not self.lora:
            raise ConfigError(
                f"train.lora_targets {t.lora_targets} matched no UNet layer; use names such as to_q, to_k, to_v"
            )
        for param in self.lora.values():
            param.data = param.data.float()
        skip_lora_input_casts(base.unet, *base.text_encoders)
        self.masters = None
        if not t.autocast and self.dtype != torch.float32:  # half-precision working copies, float32 masters
            self.masters = MasterWeights({**self.lora, **self.text_lora}, self.dtype)
            self.lora = {name: self.masters.masters[name] for name in self.lora}
            self.text_lora = {name: self.masters.masters[name] for name in self.text_lora}
        if t.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        if t.compile:  # in place, after the LoRA layers are in: parameter names and exports are unchanged
            compile_blocks(base.unet, t.compile_backend, dynamic=t.compile_dynamic or None)
        base.unet.train()

        config = dict(base.scheduler_config)
        if t.prediction_type != "auto":
            config["prediction_type"] = t.prediction_type
        self.noise_scheduler = DDPMScheduler.from_config(config, rescale_betas_zero_snr=t.zero_terminal_snr)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.optimizer = build_optimizer(
            t, list(self.lora.values()), self.text.parameters(), list(self.text_lora.values()), self.device
        )
        self.lr_scheduler = build_scheduler(t, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.rng = random.Random(t.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        self.validation = ValidationSet(held_out, t.validation_timesteps, t.seed)
        self.pivot_step = math.ceil(t.embedding_pivot * t.max_steps)
        data = (trigger, _dataset_hash(dataset_dir), _dataset_hash(regularization_dir) if regularization_dir else "")
        self.made_with = {"fingerprint": settings_hash(*data), "settings": recorded_settings(t)}
        # what states saved before they recorded their settings hold instead
        self.legacy_fingerprint = settings_hash(legacy_dump("train", t), *data)
        character = [ex for ex in self.examples if not ex.regularization]
        self.character_images = len(character)
        self.tag_frequency = {
            "dataset": dict(Counter(tag for ex in character for tag in [trigger] + ex.tags).most_common())
        }
        self.position = LoopPosition()
        self.trainables = {
            **self.lora,
            **self.text_lora,
            **{f"trigger_{key}": vec for key, vec in self.text.vectors.items()},
        }

    def _add_text_encoder_lora(self) -> dict[str, torch.nn.Parameter]:
        """peft LoRA layers in every text encoder; their float32 parameters by name."""
        from peft import LoraConfig, inject_adapter_in_model

        t = self.t
        params: dict[str, torch.nn.Parameter] = {}
        config = LoraConfig(
            r=t.text_encoder_lora_rank,
            lora_alpha=t.text_encoder_lora_alpha,
            target_modules=list(t.text_encoder_lora_targets),
        )
        for index, encoder in enumerate(self.base.text_encoders):
            try:
                inject_adapter_in_model(config, encoder)
            except ValueError:  # peft: no module matches
                raise ConfigError(
                    f"train.text_encoder_lora_targets {t.text_encoder_lora_targets} matched no text-encoder "
                    "layer; use names such as q_proj, k_proj, v_proj"
                ) from None
            for name, param in encoder.named_parameters():
                if "lora_" in name:
                    param.data = param.data.float()
                    params[f"te{index}.{name}"] = param
        if not params:
            raise StageError(
                f"train.text_encoder_lora_targets {t.text_encoder_lora_targets} matched no text-encoder layer"
            )
        return params

    # --- pieces of a step -------------------------------------------------------------

    def compute(self) -> ExitStack:
        """Autocast to the run's dtype (unless ``train.autocast`` is off), with the attention kernels
        ``train.cudnn_attention`` allows."""
        stack = ExitStack()
        autocast = self.t.autocast and self.dtype != torch.float32
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast))
        if not self.t.cudnn_attention:
            stack.enter_context(sdpa_kernel(NO_CUDNN_ATTENTION))
        return stack

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str], batch: list[Example]
    ) -> torch.Tensor:
        """The UNet's prediction; SDXL also gets the pooled text embedding and size/crop conditioning."""
        cond = self.text(captions, self.device)
        added = None
        if self.base.family == "sdxl":
            time_ids = [[*ex.original_size, *ex.crop, ex.bucket[1], ex.bucket[0]] for ex in batch]
            added = {
                "text_embeds": cond.pooled,
                "time_ids": host_tensor(time_ids, self.device, cond.hidden.dtype),
            }
        layout = torch.channels_last if self.t.channels_last else torch.preserve_format
        noisy = noisy.to(self.dtype, memory_format=layout)
        return self.base.unet(noisy, timesteps, cond.hidden, added_cond_kwargs=added).sample

    @cached_property
    def steps_per_epoch(self) -> float:
        """Optimizer steps in one epoch (one pass over the repeated dataset, over all processes)."""
        t = self.t
        plan = batch_plan(self.examples, t.batch_size, random.Random(0), t.group_repeats)
        batches = sum(map(len, plan)) / t.batch_size if t.full_batches else len(plan)
        return round(batches / (t.gradient_accumulation * self.collective.size), 3)

    def _micro_batch(self, compute: bool) -> torch.Tensor | None:
        """The next micro-batch's loss; with ``compute`` false only its random draws are made
        (another process computes it), so every process's RNGs stay in step."""
        t = self.t
        waiting = self.position.waiting if t.full_batches else None
        while not self.position.plan:  # with full batches, an epoch may leave everything waiting
            self.position.plan = batch_plan(self.examples, t.batch_size, self.rng, t.group_repeats, waiting)
            self.position.epoch += 1
        batch: list[Example] = [self.examples[i] for i in self.position.plan.pop()]
        if t.cache_latents:
            chosen = [ex.flipped if ex.flipped is not None and self.rng.random() < 0.5 else ex.latent for ex in batch]
            shape = (len(batch), *chosen[0].shape)
            latents = host_tensor(torch.stack(chosen), self.device) if compute else None
        else:
            pixels = [ex.pixels.flip(-1) if t.flip and self.rng.random() < 0.5 else ex.pixels for ex in batch]
            shape = (len(batch), self.cache.channels, *(size // self.cache.factor for size in pixels[0].shape[-2:]))
            latents = self.cache.encode(torch.stack(pixels)) if compute else None
        captions = [
            build_caption(
                None if ex.regularization else self.trigger,
                ex.tags,
                self.rng,
                t.shuffle_tags,
                t.tag_dropout,
                t.caption_dropout,
                t.keep_tokens,
            )
            for ex in batch
        ]
        noise = sample_noise(shape, self.device, self.generator, t.noise_offset)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (len(batch),),
            generator=self.generator,
            device=self.device,
        )
        if latents is None:
            return None
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = target_for(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        with self.compute():
            prediction = self.predict(noisy, timesteps, captions, batch)
        weights = snr_weights(self.noise_scheduler, timesteps, t.min_snr_gamma, self.prediction_type)
        sample_weights = [
            t.prior_loss_weight if ex.regularization else t.group_loss_weights.get(ex.group, 1.0) for ex in batch
        ]
        weights = weights * host_tensor(sample_weights, self.device)
        return (per_sample_mse(prediction, target) * weights).mean()

    def step(self) -> torch.Tensor:
        """One optimizer step; its loss stays on the device (``StepLog`` reads losses back in batches)."""
        t = self.t
        step = self.position.step + 1
        if step > self.pivot_step:
            self.text.freeze_vectors()  # the pivot: from here on only the LoRA trains
        share = t.gradient_accumulation * self.collective.size  # micro-batches per step, over all processes
        total = torch.zeros((), device=self.device)
        for micro in range(share):
            loss = self._micro_batch(compute=self.collective.owns(micro))
            if loss is None:
                continue
            loss = loss / share
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if self.masters:
                self.masters.gather_gradients()
            total += loss.detach().float()
        total = self.collective.sum_gradients(self.trainables.values(), total)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:
            self.masters.publish()
        self.position.step = step
        return total

    # --- checkpoints --------------------------------------------------------------------

    def validate(self) -> dict[str, float] | None:
        """The held-out loss. With ``train.compile`` it runs eager: its no-grad passes over the held-out
        images' shapes and its last, smaller batches would each be compiled for a few passes a checkpoint."""
        if not self.validation:
            return None
        self.base.unet.eval()
        stance = torch.compiler.set_stance("force_eager") if self.t.compile else nullcontext()
        with self.compute(), stance:
            result = self.validation.loss(
                self.noise_scheduler,
                self.prediction_type,
                lambda noisy, timesteps, batch: self.predict(
                    noisy, timesteps, [", ".join([self.trigger, *ex.tags]) for ex in batch], batch
                ),
                self.device,
                self.t.batch_size,
            )
        self.base.unet.train()
        return result

    def checkpoint(self, before_state: BeforeState | None = None) -> None:
        """Write the step's files and the training state (the main process only; the others wait).
        ``before_state`` gets the validation loss just before the state is saved: what it writes then
        covers the steps a resumed run will not repeat."""
        step = self.position.step
        folder = checkpoint_dir(self.out_dir, step)
        self.position.checkpoints[step] = str(folder.relative_to(self.out_dir))
        if self.collective.is_main:
            self._write_checkpoint(folder, before_state)
        self.collective.barrier()

    def _write_checkpoint(self, folder: Path, before_state: BeforeState | None) -> None:
        t, step = self.t, self.position.step
        folder.mkdir(parents=True, exist_ok=True)
        masters = {"source": self.masters.master_of} if self.masters else {}  # else the modules' own weights
        tensors = unet_lora_tensors(self.base.unet, t.lora_alpha, self.base.family, **masters)
        if self.text_lora:
            tensors.update(text_encoder_lora_tensors(self.base.text_encoders, t.text_encoder_lora_alpha, **masters))
        common = dict(
            output_name=self.trigger,
            trigger=self.trigger,
            rank=t.lora_rank,
            alpha=t.lora_alpha,
            steps=step,
            epoch=self.position.epoch,
            resolution=t.resolution,
            clip_skip=t.clip_skip,
            max_token_length=t.max_token_length,
            num_train_images=self.character_images,
            tag_frequency=self.tag_frequency,
            base_model_name=Path(t.base_model).name,
            seed=t.seed,
            family=self.base.family,
        )
        plain_name = {"output_name": self.trigger + PLAIN_LORA_SUFFIX}
        write_safetensors(folder / LORA_FILE, tensors, lora_metadata(tensors=tensors, **{**common, **plain_name}))
        bundled = {**tensors, **bundle_tensors(self.trigger, self.text.vectors)}
        write_safetensors(folder / BUNDLED_FILE, bundled, lora_metadata(tensors=bundled, **common))
        write_embedding_safetensors(folder / EMBEDDING_FILE, self.text.vectors)
        write_a1111_pt(folder / EMBEDDING_PT_FILE, self.trigger, self.text.vectors, step, Path(t.base_model).name)
        validation = self.validate()
        if validation is not None:
            self.position.validation[step] = validation
        if before_state is not None:
            before_state(validation)
        save_state(self.out_dir, self.made_with, self.live(), self.position)

    def live(self) -> Stateful:
        return Stateful(self.trainables, self.optimizer, self.lr_scheduler, self.scaler, self.rng, self.generator)

    def misfit(self, saved: dict) -> str | None:
        """Why a saved state was not made with this run's settings and data (None when it was). A train
        setting added to lorafactory since, at its default, changes nothing."""
        if "settings" not in saved:
            same = saved.get("fingerprint") == self.legacy_fingerprint
            return None if same else "a different base model, dataset or train settings"
        if saved.get("fingerprint") != self.made_with["fingerprint"]:
            return "a different dataset, regularization set or trigger"
        changed = changed_setting(saved["settings"], self.t, "train.")
        return None if changed is None else f"other train settings ({changed})"

    def resume(self) -> None:
        if saved_state(self.out_dir) is None:
            return
        self.position = load_state(self.out_dir, self.misfit, self.live())
        if self.masters:
            self.masters.publish()
        self.position.resumed_at.append(self.position.step)
        if self.position.step >= self.pivot_step:
            self.text.freeze_vectors()
        log.info("resuming training at step %d", self.position.step)


def train(
    settings: Settings,
    trigger: str,
    dataset_dir: Path,
    out_dir: Path,
    progress: Progress,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a UNet LoRA plus the trigger embedding into ``out_dir``, resuming a saved state there.

    ``stop_after`` ends the run (state saved) at the first checkpoint at or after that step;
    calling again continues it exactly.
    """
    if settings.train.num_processes > 1 and not in_worker():
        raise ConfigError(
            "train.num_processes > 1 starts its processes through lorafactory.launch.torchrun.train, not trainer.train"
        )
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = with_planned_steps(settings, len(read_metadata(dataset_dir)))
    run = _Run(settings, trigger, dataset_dir, out_dir, progress)
    run.resume()
    t = run.t
    log_path = out_dir / LOG_FILE
    main = run.collective.is_main
    if main:
        _rewind_log(log_path, run.position.step)
    finished = True
    try:
        with progress.task("training", total=t.max_steps) as task, ExitStack() as files:
            log_file = files.enter_context(log_path.open("a", encoding="utf-8")) if main else None
            events = None
            if main and t.tensorboard:
                events = TrainEvents(out_dir, run.position.step, round(run.steps_per_epoch))
                files.callback(events.close)
            task.advance(run.position.step)
            steps = StepLog(run.position.losses, log_file, events)
            names = [g["name"] for g in run.optimizer.param_groups]
            while run.position.step < t.max_steps:
                loss = run.step()
                step = run.position.step
                lrs = dict(zip(names, run.lr_scheduler.get_last_lr()))
                steps.add(step, loss, lrs, run.position.epoch, time.monotonic() - started)
                task.advance()
                if step % t.save_every == 0 or step == t.max_steps:
                    steps.settle()  # a diverged loss stops the run before its state is saved
                    run.checkpoint(events.up_to if events else None)  # events on disk before the state
                    if stop_after is not None and step >= stop_after and step < t.max_steps:
                        finished = False
                        break
    except torch.cuda.OutOfMemoryError as exc:
        raise StageError(
            "out of GPU memory while training; lower train.batch_size or train.resolution, "
            "or set train.gradient_checkpointing = true or train.mixed_precision = 'bf16'"
        ) from exc

    position = run.position
    counts = {
        **run.counts,
        "images": run.character_images,
        "validation_images": len(run.validation.examples),
        "steps": position.step,
        "steps_per_epoch": run.steps_per_epoch,
        "checkpoints": len(position.checkpoints),
    }
    details = {
        "trigger": trigger,
        "buckets": dict(Counter(f"{w}x{h}" for w, h in (ex.bucket for ex in run.examples))),
        "final_loss": float(np.mean(position.losses[-10:])) if position.losses else None,
        "validation_loss": {str(step): values for step, values in position.validation.items()},
        "device": str(run.device),
        "processes": run.collective.size,
        "dtype": str(run.dtype).replace("torch.", ""),
        "prediction_type": run.prediction_type,
        "family": run.base.family,
        "seconds": round(time.monotonic() - started, 2),
        "checkpoints": {str(step): path for step, path in position.checkpoints.items()},
        "schedule": {"steps": t.max_steps, "save_every": t.save_every},  # as planned for this dataset
        "resumed_at": position.resumed_at,  # empty for a run trained in one go
    }
    return TrainResult(dict(position.checkpoints), counts, details, finished)
