"""Clustering a season's crops by character: ours (chunked HDBSCAN + centroid merges) against the
reference's OPTICS over the full difference matrix, on synthetic CCIP-like features (8 characters,
3 outfits each, 2% strays), with the stand-in CCIP metric ``(1 - cos) / 2`` in NumPy.

Each measurement runs in a fresh process (peak RSS of that process, which includes the features
and Python's own ~100 MB); contenders alternate; the table gives median and spread of wall time,
process CPU time, peak memory, and the adjusted Rand index against the true characters.

    PYTHONPATH=src python benchmarks/character_clustering.py [REPEATS] [SIZES...] [--optics SIZES...]
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time

THRESHOLD = 0.17847511429108218  # the default CCIP model's


def measure(method: str, crops: int, out) -> None:
    from sklearn.metrics import adjusted_rand_score

    from lorafactory.testing.features import character_features, cosine_difference

    features, truth = character_features(8, crops, strays=crops // 50, seed=crops)
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "ours":
        from lorafactory.dataset.characters import cluster_characters

        labels = cluster_characters(features, cosine_difference, THRESHOLD).labels
    else:
        from sklearn.cluster import OPTICS

        matrix = cosine_difference(features, features).astype("float64")
        labels = OPTICS(min_samples=5, metric="precomputed").fit(matrix).labels_
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    known = truth >= 0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put((wall, cpu, peak_mib, adjusted_rand_score(truth[known], labels[known])))


def run(method: str, crops: int) -> tuple[float, float, float, float]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=measure, args=(method, crops, out))
    process.start()
    result = out.get()
    process.join()
    return result


def main(repeats: int, sizes: list[int], optics_sizes: list[int]) -> None:
    plan = [("ours", n) for n in sizes] + [("optics", n) for n in optics_sizes]
    results: dict[tuple[str, int], list] = {key: [] for key in plan}
    for round_ in range(repeats):
        for method, crops in plan if round_ % 2 == 0 else plan[::-1]:
            results[(method, crops)].append(run(method, crops))
            wall, cpu, peak, ari = results[(method, crops)][-1]
            line = f"{wall:7.2f} s  cpu {cpu:7.2f} s  {peak:6.0f} MiB  ARI {ari:.3f}"
            print(f"round {round_ + 1} {method:6s} {crops:6d}: {line}", flush=True)
    print(f"\n{repeats} runs each: median (min-max)")
    print("method   crops   wall s                 CPU s      peak MiB   ARI")
    for (method, crops), runs in results.items():
        walls = [r[0] for r in runs]
        print(
            f"{method:6s} {crops:7d}   {statistics.median(walls):7.2f} ({min(walls):.2f}-{max(walls):.2f})"
            f"   {statistics.median(r[1] for r in runs):8.2f}   {statistics.median(r[2] for r in runs):8.0f}"
            f"   {statistics.median(r[3] for r in runs):.3f}"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    optics = args[args.index("--optics") + 1 :] if "--optics" in args else ["2000", "5000"]
    plain = args[: args.index("--optics")] if "--optics" in args else args
    main(
        int(plain[0]) if plain else 3,
        [int(n) for n in plain[1:]] or [5000, 20000, 50000],
        [int(n) for n in optics],
    )
