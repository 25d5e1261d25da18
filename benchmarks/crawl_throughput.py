"""Crawl throughput against a loopback danbooru replay with simulated latency, at the configured
politeness, compared with the ideal the rate limit allows (every request starting on schedule).

    PYTHONPATH=src python benchmarks/crawl_throughput.py [IMAGES] [REQUESTS_PER_SECOND] [LATENCY_S]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main(count: int, rate: float, latency: float) -> None:
    from lorafactory.config import load_settings
    from lorafactory.progress import SilentProgress
    from lorafactory.sources.crawl import crawl
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage
    from lorafactory.testing.synthetic import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="lorafactory-crawl-bench-"))
    made = generate_dataset(
        root / "images", count=count, monochrome=0, near_duplicates=0, others=0, short_side=(200, 300)
    )
    page = 20
    with DanbooruReplay(
        [ReplayImage(root / "images" / m.filename, [], ["bench"]) for m in made], latency_s=latency
    ) as replay:
        settings = load_settings(
            overrides=[
                'character.name="Bench"',
                'crawl.tags=["bench"]',
                "crawl.min_size=0",
                f"crawl.limit={count}",
                f"crawl.page_size={page}",
                f'crawl.danbooru.base_url="{replay.url}"',
                f"crawl.danbooru.requests_per_second={rate}",
                "crawl.danbooru.concurrency=4",
            ]
        )
        start = time.perf_counter()
        posts, _ = crawl(settings, root / "out", SilentProgress())
        seconds = time.perf_counter() - start
    pages = sum(1 for _, path in replay.requests if path.startswith("/posts.json"))
    requests = len(replay.requests)
    ideal = (requests - 1) / rate + latency  # request starts spaced exactly by the limit, plus the last reply
    print(f"{len(posts)} images, {pages} pages, {requests} requests at {rate}/s with {latency * 1000:.0f} ms latency")
    print(f"  measured: {seconds:.2f}s  ->  {pages / seconds:.2f} pages/s, {len(posts) / seconds:.2f} images/s")
    print(f"  ideal at this rate limit: {ideal:.2f}s  ->  efficiency {ideal / seconds:.0%}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 60,
        float(args[1]) if len(args) > 1 else 10.0,
        float(args[2]) if len(args) > 2 else 0.05,
    )
