"""How full the training batches are: buckets, batches per epoch and the mean batch fill of a dataset.

A batch holds images of one bucket. Without ``train.full_batches`` each bucket's last batch of an
epoch is partial; on a GPU whose step time is set by the host (as on the H100 so far), a partial
batch costs a full batch's time. This counts, for a prepared dataset folder (``metadata.jsonl`` +
images) or by default the synthetic 200-image dataset of ``factory_throughput.py``, the buckets at a
resolution and the batches of one epoch with partial batches and with full ones. Deterministic
counts, not timings:

    PYTHONPATH=src:benchmarks python benchmarks/batch_fill.py [--dataset DIR] [--resolution 512]
        [--batch 4 --batch 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image


def bucket_counts(dataset: Path, resolution: int, step: int) -> Counter:
    """Images per no-upscale bucket (images too small for one bucket step are left out, as in training)."""
    from lorafactory.train import buckets

    found: Counter = Counter()
    for line in (dataset / "metadata.jsonl").read_text().splitlines():
        with Image.open(dataset / json.loads(line)["file"]) as image:
            placement = buckets.fit(image.width, image.height, resolution, step)
        if placement is not None:
            found[placement.bucket] += 1
    return found


def epoch_batches(counts: Counter, batch: int) -> dict:
    """One epoch's batches: partial ones end each bucket, or (full batches) leftovers wait."""
    partial = [min(batch, n - i) for n in counts.values() for i in range(0, n, batch)]
    samples = sum(counts.values())
    return {
        "batch": batch,
        "samples": samples,
        "batches_partial": len(partial),
        "partial_batches": sum(size < batch for size in partial),
        "fill_partial": round(samples / (len(partial) * batch), 3),
        "batches_full": round(samples / batch, 1),  # the long-run mean: leftovers lead the next epoch
        "fill_full": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="a prepared dataset folder; default: the factory benchmark's")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--step", type=int, default=64, help="train.bucket_step")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 4 and 8)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    dataset = args.dataset
    if dataset is None:
        from factory_throughput import FULL_SIZE_SIDES, write_dataset

        dataset = write_dataset(Path(tempfile.mkdtemp(prefix="lorafactory-fill-")) / "data", 200, FULL_SIZE_SIDES)
    counts = bucket_counts(dataset, args.resolution, args.step)
    rows = [
        {
            "dataset": str(args.dataset or "factory_throughput synthetic, 200 images"),
            "resolution": args.resolution,
            "buckets": len(counts),
            **epoch_batches(counts, batch),
        }
        for batch in args.batch or [4, 8]
    ]
    print(f"{rows[0]['dataset']}: {rows[0]['samples']} images in {len(counts)} buckets at {args.resolution} px")
    for row in rows:
        print(
            f"  batch {row['batch']}: partial batches {row['batches_partial']} per epoch "
            f"({row['partial_batches']} partial, mean fill {row['fill_partial']:.2f}); "
            f"full batches {row['batches_full']} per epoch"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"batch_fill_{time.strftime('%Y-%m-%d')}.log").open("a", encoding="utf-8") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
