"""Frame sampling speed on one synthetic episode: the per-shot sampler (decode every frame, detect
cuts on thumbnails, keep a few frames a shot) against decoding every frame and doing nothing
else, and against decoding keyframes only (what the reference sampled; it misses shots).

Contenders alternate, 3 runs each (or REPEATS); median and spread of wall time, process CPU time,
and frames per second of video decoded.

    PYTHONPATH=src python benchmarks/frame_sampling.py [SECONDS] [WIDTH] [HEIGHT] [REPEATS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path


def decode_all(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def keyframes(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        return sum(1 for _ in container.decode(stream))


def sampler(path: Path) -> int:
    from lorafactory.sources.episodes import sample_frames

    return len(list(sample_frames(path)))


def main(seconds: float, width: int, height: int, repeats: int) -> None:
    from lorafactory.testing.episodes import Shot, write_episode

    path = Path(tempfile.mkdtemp(prefix="lorafactory-frames-")) / "episode.mp4"
    shots = [Shot(3.0, ((i * 53) % 255, (i * 97) % 255, (i * 31) % 255), (i % 4,)) for i in range(int(seconds // 3))]
    write_episode(path, shots, size=(width, height))
    frames = decode_all(path)
    print(f"{seconds:.0f} s at {width}x{height}, 24 fps: {frames} frames, {len(shots)} shots")
    contenders = {"decode every frame": decode_all, "per-shot sampler": sampler, "keyframes only": keyframes}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        order = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            out = contenders[name](path)
            results[name].append((time.perf_counter() - wall, time.process_time() - cpu, out))
    print("contender             wall s (median, min-max)   CPU s    video frames/s   frames out")
    for name, runs in results.items():
        walls = [w for w, _, _ in runs]
        median = statistics.median(walls)
        print(
            f"{name:20s}  {median:6.2f} ({min(walls):.2f}-{max(walls):.2f})"
            f"       {statistics.median(c for _, c, _ in runs):6.2f}   {frames / median:10.0f}   {runs[0][2]:8d}"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        float(args[0]) if args else 120.0,
        int(args[1]) if len(args) > 1 else 640,
        int(args[2]) if len(args) > 2 else 360,
        int(args[3]) if len(args) > 3 else 3,
    )
