"""Evaluation rendering, variant against variant: seconds per image of the evaluation's own renderer.

On a GPU the evaluation renders at full load yet far below the card's matrix rate, so the question is
what makes its kernels cheaper. Each variant renders the same batch (a preset's first prompts, its
size, sampler steps and batch) with a random LoRA on the preset's target layers, as evaluation does:
- ``lora``: the LoRA layers computed beside the base layers, as evaluation renders today;
- ``merged``: the LoRA merged into the base weights (``evaluate.merge_lora``; as AUTOMATIC1111 and
  ComfyUI apply a LoRA), then the exact base weights put back;
- ``channels_last``: the UNet and VAE in channels-last memory format (``evaluate.channels_last``; cuDNN's
  own layout for convolutions);
- ``merged+channels_last``;
- ``compiled``: the UNet's transformer blocks compiled (``evaluate.compile``; regional, sizes symbolic), the
  other variants run eager under ``torch.compiler.set_stance("force_eager")`` in the same process;
- ``merged+compiled`` (a merged layer is another graph).
Each variant renders once first (kernels, cuDNN plans, each layout, the compiles): those seconds per
image are reported apart as its warm-up.
Variants alternate (the order reversed every other round), each repeated; per variant it prints the
median and spread of seconds per image, process CPU seconds, and the mean absolute pixel difference
from ``lora``'s images (0-255), beside how far the LoRA moves the base model's images (it must, or
the run stops: a LoRA left out would make every variant look free). By hand, never as a test:

    PYTHONPATH=src:benchmarks python benchmarks/render_variants.py [--preset sd15-anime] [--repeats 3]
        [--out benchmarks/results] [--work DIR] [--tiny] [--compile-backend inductor]

``--tiny`` runs the tiny model on CPU: a check of the script itself (with ``--compile-backend aot_eager``,
graph capture without code generation, a quick one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

VARIANTS = ("lora", "merged", "channels_last", "merged+channels_last", "compiled", "merged+compiled")


@contextmanager
def variant(pipe, name: str) -> Iterator[None]:
    """The pipeline as ``name`` renders, restored afterwards; merging is the evaluator's own
    (``evaluate.merge_lora``: the exact base weights are put back, not subtracted)."""
    from lorafactory.evaluate.generate import set_layout
    from lorafactory.evaluate.merge import MergedLora

    merged = MergedLora("default") if "merged" in name else None
    if merged is not None:
        merged.merge(pipe.unet)
    if "channels_last" in name:
        set_layout(pipe, channels_last=True)
    try:
        with torch.compiler.set_stance("default" if "compiled" in name else "force_eager"):
            yield
    finally:
        set_layout(pipe, channels_last=False)
        if merged is not None:
            merged.restore()


def timed(render: Callable[[], list], cuda: bool) -> tuple[float, float, list]:
    """Wall and process CPU seconds of ``render()``, and what it returned."""
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    images = render()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15-anime")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafactory-render-"))

    from peft import LoraConfig

    from lorafactory.config import load_settings
    from lorafactory.evaluate.generate import Generator
    from lorafactory.evaluate.prompts import jobs, prompt_specs
    from lorafactory.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl
    from lorafactory.train.model import compile_blocks, load_pipeline, resolve_device, resolve_dtype

    sdxl = args.preset.startswith("sdxl")
    name = "sdxl" if sdxl else "sd15"
    size = "tiny" if args.tiny else "full"
    base = (build_tiny_sdxl if sdxl else build_tiny_sd)(work / f"{name}-{size}", full_size=not args.tiny)
    overrides = ['character.name="Bench"', f'train.base_model="{base}"']
    if args.tiny:
        overrides += ["train.device='cpu'", "evaluate.width=128", "evaluate.height=128", "evaluate.steps=4"]
    settings = load_settings(preset=args.preset, overrides=overrides)
    e, t = settings.evaluate, settings.train
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.mixed_precision, device)
    generator = Generator(load_pipeline(t.base_model, dtype), e, t.clip_skip, device)
    config = LoraConfig(
        r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=list(t.lora_targets), init_lora_weights=False
    )
    generator.pipe.unet.add_adapter(config)  # random A and B: the LoRA path is computed, never skipped
    compile_blocks(generator.pipe.unet, args.compile_backend, dynamic=True)  # as evaluate.compile does
    batch = jobs(e, prompt_specs(e, []), "bench")[: e.batch_size]
    cuda = device.type == "cuda"

    def render() -> list:
        return [np.asarray(image, dtype=np.float32) for _, image in generator.render(batch)]

    warm_up = {}
    for name_ in VARIANTS:  # kernels, cuDNN plans, each layout once, the compiles
        with variant(generator.pipe, name_):
            warm_up[name_] = timed(render, cuda)[0] / len(batch)
    generator.pipe.unet.disable_adapters()
    with variant(generator.pipe, "lora"):  # eager
        base_images = render()
    generator.pipe.unet.enable_adapters()
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
    images: dict[str, list] = {}
    for repeat in range(args.repeats):
        for name_ in VARIANTS if repeat % 2 == 0 else reversed(VARIANTS):
            with variant(generator.pipe, name_):
                wall, cpu, rendered = timed(render, cuda)
            walls[name_].append(wall / len(batch))
            cpus[name_].append(cpu / len(batch))
            images.setdefault(name_, rendered)
    lora_effect = float(np.mean([np.abs(a - b).mean() for a, b in zip(images["lora"], base_images)]))
    if lora_effect == 0:
        raise SystemExit("the random LoRA did not change the images: its layers were not rendered")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    rows = [
        {
            "preset": args.preset,
            "variant": name_,
            "device": device_name,
            "size": f"{e.width}x{e.height}",
            "sampler_steps": e.steps,
            "batch": len(batch),
            "dtype": str(dtype).replace("torch.", ""),
            "s_per_image_median": round(statistics.median(walls[name_]), 4),
            "s_per_image_min": round(min(walls[name_]), 4),
            "s_per_image_max": round(max(walls[name_]), 4),
            "cpu_s_per_image_median": round(statistics.median(cpus[name_]), 4),
            "warm_up_s_per_image": round(warm_up[name_], 4),
            "mean_abs_pixel_diff_from_lora": round(
                float(np.mean([np.abs(a - b).mean() for a, b in zip(images[name_], images["lora"])])), 3
            ),
            "lora_vs_base_mean_abs_pixel_diff": round(lora_effect, 3),
            "repeats": args.repeats,
            "compile_backend": args.compile_backend if "compiled" in name_ else None,
            "torch": torch.__version__,
        }
        for name_ in VARIANTS
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tiny" if args.tiny else "".join(c if c.isalnum() else "-" for c in device_name.lower())
    path = args.out / f"render_variants_{name}_{stem}_{time.strftime('%Y-%m-%d')}.log"
    with path.open("a", encoding="utf-8") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
    print(
        f"{device_name}, {args.preset}: {len(batch)} images a batch, {e.width}x{e.height}, {e.steps} steps, "
        f"{dtype}; the random LoRA moves pixels by {lora_effect:.3f} on average"
    )
    for row in rows:
        print(
            f"{row['variant']:>22}: {row['s_per_image_median']:.3f} s/image "
            f"[{row['s_per_image_min']:.3f}-{row['s_per_image_max']:.3f}], CPU {row['cpu_s_per_image_median']:.3f} s, "
            f"warm-up {row['warm_up_s_per_image']:.3f} s/image, "
            f"pixels differ from lora by {row['mean_abs_pixel_diff_from_lora']}"
        )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
