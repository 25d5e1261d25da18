"""What each attention kernel costs a bucketed training run: the first call on a new shape, and every call after.

cuDNN's attention builds an execution plan for every new tensor shape; bucketed training meets a few
dozen bucket shapes, each with its own sequence lengths at every UNet level. This times SD1.5's (or
SDXL's) attention calls, forward and backward, as the trainer makes them (the query, key and value
are views of [batch, tokens, heads * dim] projections, cross-attention keys are 77 text tokens), over
``--buckets`` buckets spread over the classic list at ``--resolution``, for each backend. Per backend it
reports what the first call on a shape costs beyond a later one (plan building), per shape, and the
attention time of one training step (later calls, every block). Repeats use another batch size each,
so every shape is new to every backend every time; the backends alternate in order between repeats.
Each row is written as it is measured. ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` in the environment (torch's
opt-in for cuDNN to reuse a plan across sequence lengths) is recorded with the results, so a run with
``--backends cudnn`` under it shows whether that removes the per-shape cost. On a GPU, by hand:

    PYTHONPATH=src python benchmarks/attention_shapes.py [--sdxl] [--buckets 4] [--batch 4] [--repeats 3]
        [--backends cudnn,flash,efficient] [--out DIR] [--cpu]

``--cpu`` runs it on this CPU's kernels at 128 px (cuDNN is then reported as unsupported): a check of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorafactory.train.buckets import fixed_buckets

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# (latent downscale, channels, heads) of each UNet level with transformer blocks, and how many blocks it has
SD15_LEVELS = [(1, 320, 8, 2 + 3), (2, 640, 8, 2 + 3), (4, 1280, 8, 2 + 3), (8, 1280, 8, 1)]
SDXL_LEVELS = [(2, 640, 10, 2 * 2 + 3 * 2), (4, 1280, 20, 2 * 10 + 10 + 3 * 10)]  # down, mid, up blocks x depth
TEXT_TOKENS = 77


def projections(batch: int, tokens: int, channels: int, heads: int, device: str) -> torch.Tensor:
    """One [batch, heads, tokens, dim] view of a [batch, tokens, channels] projection, as diffusers makes it."""
    flat = torch.randn(batch, tokens, channels, device=device, dtype=torch.bfloat16, requires_grad=True)
    return flat.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(torch.ones_like(out))


def seconds(*qkv: torch.Tensor) -> float:
    """Wall seconds of one forward and backward, the GPU's queued work included."""
    synchronize = torch.cuda.synchronize if qkv[0].is_cuda else (lambda: None)
    synchronize()
    started = time.perf_counter()
    call(*qkv)
    synchronize()
    return time.perf_counter() - started


def shapes(buckets: list[tuple[int, int]], levels: list[tuple[int, int, int, int]]):
    """(bucket, key tokens, query tokens, channels, heads, calls per step) for self- and cross-attention."""
    for width, height in buckets:
        for scale, channels, heads, blocks in levels:
            tokens = (height // 8 // scale) * (width // 8 // scale)
            for key_tokens in (tokens, TEXT_TOKENS):
                yield (width, height), key_tokens, tokens, channels, heads, blocks


def measure(backend: str, batch: int, buckets, levels, later: int, device: str) -> dict:
    first, steady, count = 0.0, 0.0, 0
    with sdpa_kernel([BACKENDS[backend]]):
        for _, key_tokens, tokens, channels, heads, blocks in shapes(buckets, levels):
            qkv = [projections(batch, n, channels, heads, device) for n in (tokens, key_tokens, key_tokens)]
            once = seconds(*qkv)
            median = statistics.median(seconds(*qkv) for _ in range(later))
            first += once - median  # what the first call cost beyond an ordinary one
            steady += median * blocks
            count += 1
    return {
        "first_call_extra_ms_per_shape": first * 1000 / count,
        "attention_ms_per_step": steady * 1000 / len(buckets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (SD1.5), 1024 (SDXL)")
    parser.add_argument("--buckets", type=int, default=4, help="how many of the classic buckets, spread over them")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--later", type=int, default=5, help="calls timed after the first, per shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cpu", action="store_true", help="a check of the script: CPU kernels, 128 px")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS))
    args = parser.parse_args()
    backends = [name for name in args.backends.split(",") if name]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    device = "cpu" if args.cpu else "cuda"
    resolution = args.resolution or (128 if args.cpu else 1024 if args.sdxl else 512)
    every = fixed_buckets(resolution, 64, resolution // 2, resolution * 2)
    buckets = sorted({every[i * (len(every) - 1) // max(args.buckets - 1, 1)] for i in range(args.buckets)})
    setup = {
        "model": "sdxl" if args.sdxl else "sd15",
        "resolution": resolution,
        "buckets": buckets,
        "shapes_per_bucket": 2 * len(SDXL_LEVELS if args.sdxl else SD15_LEVELS),
        "device": "CPU" if args.cpu else torch.cuda.get_device_name(),
        # torch's opt-in for cuDNN to reuse one plan across sequence lengths, read from the environment
        "TORCH_CUDNN_SDPA_AVOID_RECOMPILE": os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", ""),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"attention_shapes_{setup['model']}{'_cpu' if args.cpu else ''}_{time.strftime('%Y-%m-%d')}"
    rows: list[dict] = []
    with (args.out / f"{stem}.log").open("a", encoding="utf-8") as log:  # a row as each is measured
        log.write(json.dumps(setup) + "\n")
        for repeat in range(args.repeats):
            order = backends[repeat % len(backends) :] + backends[: repeat % len(backends)]
            for backend in order:  # another batch size each repeat: every shape is new to every backend
                wall, cpu = time.perf_counter(), time.process_time()
                row = {"backend": backend, "batch": args.batch + repeat}
                try:
                    levels = SDXL_LEVELS if args.sdxl else SD15_LEVELS
                    row |= measure(backend, row["batch"], buckets, levels, args.later, device)
                except RuntimeError as exc:  # a backend this GPU or these shapes do not support
                    row["error"] = str(exc).splitlines()[0]
                row |= {"wall_s": time.perf_counter() - wall, "process_cpu_s": time.process_time() - cpu}
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
                log.write(json.dumps(rows[-1]) + "\n")
                log.flush()
                print(json.dumps(rows[-1]))
    print("medians over the repeats (first-call cost beyond an ordinary call, per shape; attention per step):")
    for backend in backends:
        good = [r for r in rows if r["backend"] == backend and "error" not in r]
        if good:
            first = [r["first_call_extra_ms_per_shape"] for r in good]
            step = [r["attention_ms_per_step"] for r in good]
            print(
                f"{backend:>10}: first call +{statistics.median(first):.1f} ms [{min(first):.1f}-{max(first):.1f}], "
                f"step {statistics.median(step):.2f} ms [{min(step):.2f}-{max(step):.2f}]"
            )


if __name__ == "__main__":
    main()
