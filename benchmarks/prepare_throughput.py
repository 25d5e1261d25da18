"""Prepare-stage throughput: images per second through the whole cleaning chain, on CPU, with the
stand-in models (so it measures our code and imgutils' pre/post-processing, not real model cost).

    PYTHONPATH=src python benchmarks/prepare_throughput.py [IMAGES]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="lorafactory-prepare-bench-"))


def main(count: int) -> None:
    from lorafactory.testing.standin_hub import build_standin_hub

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(build_standin_hub(ROOT / "hub"))  # before huggingface_hub is imported

    from lorafactory.config import load_settings
    from lorafactory.dataset.prepare import prepare
    from lorafactory.progress import SilentProgress
    from lorafactory.sources.local import crawl_local
    from lorafactory.testing.synthetic import generate_dataset

    generate_dataset(ROOT / "source", count=count, seed=1, short_side=(300, 600))
    raw = ROOT / "raw"
    (raw / "images").mkdir(parents=True)
    posts, _ = crawl_local(ROOT / "source", raw / "images", limit=10**6)
    (raw / "posts.jsonl").write_text("".join(post.model_dump_json() + "\n" for post in posts))
    settings = load_settings(preset="tiny-demo", overrides=['character.name="Bench"', "prepare.min_images=1"])
    start = time.perf_counter()
    counts, details = prepare(settings, "bench", raw, ROOT / "dataset", SilentProgress())
    seconds = time.perf_counter() - start
    print(
        (
            f"{len(posts)} raw images -> {counts['dataset']} dataset images "
            f"in {seconds:.1f}s: {len(posts) / seconds:.2f} raw images/s"
        )
    )
    for step in details["filters"]:
        print(f"  {step['step']:<18} {step['in']:>5} -> {step['out']:>5}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
