"""Image generation for evaluation: one base pipeline, checkpoints swapped in through diffusers' own loaders.

Each checkpoint's released files (kohya LoRA, embedding) go through ``load_lora_weights`` and
``load_textual_inversion``, so evaluation also proves that the files load in diffusers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file

from lorafactory.config import EvaluateSettings
from lorafactory.evaluate.attention import parse_attention
from lorafactory.evaluate.merge import MergedLora
from lorafactory.evaluate.prompts import Job
from lorafactory.train.embedding import token_names
from lorafactory.train.model import compile_blocks, family_of
from lorafactory.train.text import BREAK, ENCODER_KEYS, Conditioning, encode_weighted

ADAPTER = "checkpoint"
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)  # what a bad or mismatched checkpoint file raises


def make_scheduler(name: str, config: dict):
    """A1111's sampler names as diffusers schedulers (DPM++ 2M Karras = multistep DPM-Solver++ with Karras sigmas)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config)


def a1111_parameters(job: Job, settings: EvaluateSettings, clip_skip: int, model: str) -> str:
    """The ``parameters`` text chunk A1111 writes, so tools can read the prompt back."""
    sampler = {"dpmpp_2m_karras": "DPM++ 2M Karras", "euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM"}[
        settings.sampler
    ]
    return (
        f"{job.prompt}\nNegative prompt: {job.negative}\n"
        f"Steps: {settings.steps}, Sampler: {sampler}, CFG scale: {settings.cfg_scale}, Seed: {job.seed}, "
        f"Size: {settings.width}x{settings.height}, Model: {model}, Clip skip: {clip_skip}"
    )


def set_layout(pipe, channels_last: bool) -> None:
    """The pipeline's UNet and VAE in channels-last (NHWC) layout, or back in the ordinary one."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for model in (pipe.unet, pipe.vae):
        model.to(memory_format=layout)


class Generator:
    """Holds the base pipeline; ``load()``/``unload()`` swap a checkpoint's adapter weights in and out.

    Between checkpoints of one run the LoRA layers stay in place (``unload(..., keep_adapter=True)``) and the
    next checkpoint's weights are hotswapped into them: diffusers copies the tensors instead of building the
    layers again: the same weights (tested) for about a fifth of the host time (benchmarks/adapter_swap.py)."""

    def __init__(self, pipe, settings: EvaluateSettings, clip_skip: int, device: torch.device) -> None:
        self.pipe = pipe.to(device)
        self.pipe.scheduler = make_scheduler(settings.sampler, dict(pipe.scheduler.config))
        self.pipe.set_progress_bar_config(disable=True)
        self.family = family_of(pipe)
        self.pairs = [(pipe.tokenizer, pipe.text_encoder)] + (
            [(pipe.tokenizer_2, pipe.text_encoder_2)] if self.family == "sdxl" else []
        )
        self.settings = settings
        self.clip_skip = clip_skip
        self.device = device
        self.adapter_in = False  # LoRA layers of an earlier checkpoint are in place, ready for a hotswap
        self.merged = MergedLora(ADAPTER) if settings.merge_lora else None
        set_layout(self.pipe, settings.channels_last)  # a kept pipeline may come in either layout
        if settings.compile:  # a kept pipeline's blocks go on through the graphs compiled before
            compile_blocks(self.pipe.unet, settings.compile_backend, dynamic=True)  # batches and prompts vary

    def load(self, lora_file: Path, embedding_file: Path, trigger: str) -> None:
        if self.adapter_in:
            try:
                self.pipe.load_lora_weights(str(lora_file), adapter_name=ADAPTER, hotswap=True)
            except LOAD_ERRORS:  # not the same layers (or a bad file): start from the base model
                self.pipe.unload_lora_weights()
                self.adapter_in = False
        if not self.adapter_in:
            self.pipe.load_lora_weights(str(lora_file), adapter_name=ADAPTER)
            self.adapter_in = True
        self.pipe.set_adapters([ADAPTER], adapter_weights=[self.settings.lora_scale])
        if self.merged is not None:
            self.merged.merge(self.pipe.unet)
        if self.family == "sd1":
            self.pipe.load_textual_inversion(str(embedding_file), token=trigger)
            return
        tensors = load_file(str(embedding_file))
        for key, (tokenizer, encoder) in zip(ENCODER_KEYS, self.pairs):
            self.pipe.load_textual_inversion(tensors[key], token=trigger, tokenizer=tokenizer, text_encoder=encoder)

    def unload(self, trigger: str, vectors: int, keep_adapter: bool = False) -> None:
        """Back to the base model; also after a load that failed halfway. ``keep_adapter`` leaves the LoRA
        layers in for the next checkpoint's hotswap (the trigger's embedding always goes)."""
        if self.merged is not None:
            self.merged.restore()
        if not keep_adapter:
            self.pipe.unload_lora_weights()
            self.adapter_in = False
        names = token_names(trigger, vectors)
        for tokenizer, encoder in self.pairs:
            if any(name in tokenizer.get_vocab() for name in names):
                self.pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=encoder)

    @torch.no_grad()
    def encode(self, prompts: list[str], negatives: list[str]) -> tuple[Conditioning, Conditioning]:
        """Prompt and negative conditioning computed here, with clip skip (diffusers 0.42's own
        clip-skip path reads ``text_encoder.text_model``, which transformers 5.6 and later no longer have).
        Emphasis such as ``(tag:1.2)`` is applied as in AUTOMATIC1111, and prompts longer than 75
        tokens are encoded in chunks; both halves get the same number of chunks, which
        classifier-free guidance needs."""
        weighted = [
            [(self._expand(text) if weight != BREAK else text, weight) for text, weight in parse_attention(prompt)]
            for prompt in prompts + negatives
        ]
        tokenizers, encoders = zip(*self.pairs)
        both = encode_weighted(self.family, list(tokenizers), list(encoders), weighted, self.clip_skip, self.device)
        n = len(prompts)
        pooled = (both.pooled[:n], both.pooled[n:]) if both.pooled is not None else (None, None)
        return Conditioning(both.hidden[:n], pooled[0]), Conditioning(both.hidden[n:], pooled[1])

    def _expand(self, text: str) -> str:
        """A multi-vector trigger becomes its N tokens (diffusers' textual-inversion convention)."""
        return self.pipe.maybe_convert_prompt(text, self.pipe.tokenizer)

    def render(self, work: list[Job], on_image: Callable[[], None] | None = None) -> Iterator[tuple[Job, Image.Image]]:
        s = self.settings
        for start in range(0, len(work), s.batch_size):
            batch = work[start : start + s.batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in batch]
            positive, negative = self.encode([job.prompt for job in batch], [job.negative for job in batch])
            extra = {}
            if self.family == "sdxl":
                extra = {"pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled}
            output = self.pipe(
                prompt_embeds=positive.hidden,
                negative_prompt_embeds=negative.hidden,
                num_inference_steps=s.steps,
                guidance_scale=s.cfg_scale,
                width=s.width,
                height=s.height,
                generator=generators,
                **extra,
            )
            for job, image in zip(batch, output.images):
                if on_image:
                    on_image()
                yield job, image


PNG_COMPRESS_LEVEL = 1  # zlib level: 3x faster than PIL's default 6, files 17% larger (benchmarks/png_encoding.py)
PNG_WRITERS = min(4, os.cpu_count() or 1)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """The image with its A1111 ``parameters`` text chunk, written to a temporary name and then renamed."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    partial.replace(path)


class BackgroundPngs:
    """Writes PNGs on worker threads (PIL compresses without holding the GIL), so the GPU renders the next
    batch meanwhile instead of waiting for each file; leaving the block waits for every file and raises the
    first failure."""

    def __init__(self, times: Counter[str] | None = None, workers: int = PNG_WRITERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._pending: list[Future] = []
        self.times = times if times is not None else Counter()  # "waiting for files": seconds left at the end

    def save(self, image: Image.Image, path: Path, parameters: str) -> None:
        self._pending.append(self._pool.submit(save_png, image, path, parameters))

    def __enter__(self) -> BackgroundPngs:
        return self

    def __exit__(self, *exc_info) -> None:
        started = time.perf_counter()
        self._pool.shutdown(wait=True)
        self.times["waiting for files"] += time.perf_counter() - started
        if exc_info[0] is None:
            for future in self._pending:
                future.result()
