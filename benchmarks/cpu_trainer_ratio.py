"""Our trainer against a minimal diffusers-style loop: step time and peak memory on CPU, as ratios.

Same tiny model, data, batch, resolution, LoRA rank and steps. The baseline is written here the way
the diffusers example scripts do it: VAE-encode every batch, and train the trigger's tokens by
making the whole token-embedding matrix trainable and restoring the other rows after each step.
Ours is measured with latent caching off (re-encoding like the baseline) and on. Each
configuration runs in its own process, so peak memory (max RSS) is its own.

The machine is shared and noisy, so every contender runs REPEATS times, in rounds that rotate the
order; each run reports its mean step time by wall clock and by process CPU time. The table gives
the median over runs with the spread (min-max), and the ratio to the baseline as the median of the
per-round ratios (each round's runs ran back to back) with their spread.

    PYTHONPATH=src python benchmarks/cpu_trainer_ratio.py [STEPS] [REPEATS]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STEPS, WARMUP, BATCH, RESOLUTION, RANK, VECTORS, REPEATS = 40, 5, 4, 128, 4, 2, 3
KINDS = ("baseline", "ours-uncached", "ours-cached")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, process CPU) seconds since ``start``."""
    wall, cpu = _clocks()
    return wall - start[0], cpu - start[1]


def run_ours(model: Path, data: Path, cached: bool, steps: int) -> list[tuple[float, float]]:
    from lorafactory.config import load_settings
    from lorafactory.progress import SilentProgress
    from lorafactory.train.trainer import _Run

    settings = load_settings(
        preset="tiny-demo",
        overrides=[
            'character.name="Bench"',
            f'train.base_model="{model}"',
            f"train.resolution={RESOLUTION}",
            f"train.batch_size={BATCH}",
            f"train.lora_rank={RANK}",
            f"train.embedding_vectors={VECTORS}",
            "train.validation_split=0.0",
            f"train.cache_latents={'true' if cached else 'false'}",
            "train.shuffle_tags=false",
            f"train.max_steps={steps}",
        ],
    )
    run = _Run(settings, "bench", data, data.parent / f"out-{os.getpid()}", SilentProgress())
    times = []
    for _ in range(steps):
        start = _clocks()
        run.step()
        times.append(_since(start))
    return times


def run_baseline(model: Path, data: Path, steps: int) -> list[tuple[float, float]]:
    """A minimal diffusers-example-style loop with the same settings."""
    import random

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
    tokens = [f"<s{i}>" for i in range(VECTORS)]
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids_new = tokenizer.convert_tokens_to_ids(tokens)
    embeddings = text_encoder.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    unet.add_adapter(
        LoraConfig(
            r=RANK,
            lora_alpha=RANK / 2,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
        )
    )
    lora = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": 1e-3}, {"params": [embeddings.weight], "lr": 1e-2}])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    images = [
        torch.from_numpy(np.asarray(Image.open(data / r["file"]).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        for r in records
    ]
    rng = random.Random(0)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[ids_new] = False
    times = []
    for _ in range(steps):
        start = _clocks()
        batch = rng.sample(range(len(images)), BATCH)
        with torch.no_grad():
            latents = (
                vae.encode(torch.stack([images[i] for i in batch])).latent_dist.sample() * vae.config.scaling_factor
            )
        captions = [" ".join(tokens) + ", 1girl, smile"] * BATCH
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        hidden = text_encoder(ids)[0]
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # retract: only the new rows may change
            embeddings.weight[keep] = original[keep]
        times.append(_since(start))
    return times


def child(kind: str, steps: int) -> None:
    root = Path(os.environ["BENCH_ROOT"])
    from gpu_throughput import make_dataset  # the benchmarks folder is the script's own
    from lorafactory.testing.tiny_sd import build_tiny_sd

    model = build_tiny_sd(root / "tiny-sd")
    data = make_dataset(root / "data", RESOLUTION)
    times = (
        run_baseline(model, data, steps) if kind == "baseline" else run_ours(model, data, kind == "ours-cached", steps)
    )
    timed = times[WARMUP:]
    print(
        json.dumps(
            {
                "kind": kind,
                "wall_ms": 1000 * sum(w for w, _ in timed) / len(timed),
                "cpu_ms": 1000 * sum(c for _, c in timed) / len(timed),
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _spread(values: list[float]) -> str:
    return f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(steps: int, repeats: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="lorafactory-bench-"))
    env = {**os.environ, "BENCH_ROOT": str(root), "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(
        [sys.executable, __file__, "--child", "baseline", str(WARMUP + 1)], env=env, check=True, capture_output=True
    )  # builds the kit
    rounds: list[dict[str, dict]] = []
    for index in range(repeats):
        order = KINDS[index % len(KINDS) :] + KINDS[: index % len(KINDS)]  # rotate who goes first
        results = {}
        for kind in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(steps)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        rounds.append(results)
    print(
        f"CPU, {torch.get_num_threads()} threads, tiny SD1 model, {RESOLUTION}px, batch {BATCH}, "
        f"{steps} steps ({WARMUP} warm-up) per run, {repeats} rounds with rotating order; median (min-max)"
    )
    print(f"{'loop':<15}{'wall ms/step':>24}{'CPU ms/step':>24}{'wall ratio':>20}{'CPU ratio':>20}{'peak MiB':>10}")
    for kind in KINDS:
        runs = [r[kind] for r in rounds]
        wall_ratio = [r[kind]["wall_ms"] / r["baseline"]["wall_ms"] for r in rounds]
        cpu_ratio = [r[kind]["cpu_ms"] / r["baseline"]["cpu_ms"] for r in rounds]
        print(
            f"{kind:<15}{_spread([x['wall_ms'] for x in runs]):>24}{_spread([x['cpu_ms'] for x in runs]):>24}"
            f"{_spread(wall_ratio):>20}{_spread(cpu_ratio):>20}{np.median([x['peak_mib'] for x in runs]):>10.0f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else STEPS, int(sys.argv[2]) if len(sys.argv) > 2 else REPEATS)
