"""The evaluate stage: render the prompt suite for every checkpoint, score it, choose the steps.

The base pipeline is loaded once; checkpoints are swapped in and out as adapters. Outputs, in the
stage folder: ``steps/step-N/`` (images with A1111 parameters, ``grid.png``, ``metrics.json`` with
every per-image value), ``metrics.csv`` and ``metrics.json`` (one row per step, with 95%
bootstrap intervals), ``metrics_plot.png`` and ``selection.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lorafactory.config import Settings
from lorafactory.errors import first_line
from lorafactory.evaluate.generate import LOAD_ERRORS, BackgroundPngs, Generator, a1111_parameters
from lorafactory.evaluate.layout import step_dir
from lorafactory.evaluate.plots import metrics_plot, preview_grid
from lorafactory.evaluate.prompts import Job, chosen_set, dataset_prompt_specs, jobs
from lorafactory.evaluate.resident import base_pipeline
from lorafactory.evaluate.schedule import StopsEarly, look_parts, score_checkpoints, small_parts_warning
from lorafactory.evaluate.scoring import METRICS, Measured, Scorer, StepScores
from lorafactory.evaluate.select import Selection, select_steps
from lorafactory.progress import Progress
from lorafactory.train.data import read_metadata
from lorafactory.train.model import resolve_device, resolve_dtype
from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE
from lorafactory.vision.ccip import default_threshold, extract_features
from lorafactory.vision.runtime import onnx_provider, vision_on_cpu_warning
from lorafactory.workspace import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    counts: dict
    details: dict
    table: dict[int, dict[str, float | None]]
    selection: Selection


def dataset_features(
    dataset_dir: Path, records: list[dict], model: str, cache_dir: Path | None, progress: Progress
) -> np.ndarray:
    """CCIP features of the dataset images, computed once per dataset and model (cached on disk)."""
    key = hashlib.sha256((dataset_dir / "metadata.jsonl").read_bytes() + model.encode()).hexdigest()[:16]
    cached = cache_dir / f"ccip-{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    images = []
    for record in records:
        with Image.open(dataset_dir / record["file"]) as image:
            images.append(image.convert("RGB"))
    with progress.task("CCIP features of the dataset", total=len(images)) as task:
        features = extract_features(images, model, on_batch=task.advance)
    if cached is not None:
        buffer = io.BytesIO()
        np.save(buffer, features)
        write_bytes_atomic(cached, buffer.getvalue())
    return features


def evaluate(
    settings: Settings,
    trigger: str,
    dataset_dir: Path,
    train_dir: Path,
    checkpoints: dict[int, str],
    validation_loss: dict[int, float],
    out_dir: Path,
    progress: Progress,
    cache_dir: Path | None = None,
) -> Evaluation:
    e, v, t = settings.evaluate, settings.vision, settings.train
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metadata(dataset_dir)
    features = dataset_features(dataset_dir, records, v.ccip_model, cache_dir, progress)
    threshold = e.ccip_threshold if e.ccip_threshold is not None else default_threshold(v.ccip_model)
    image_tags = [list(record.get("tags", [])) for record in records]
    specs = dataset_prompt_specs(e, image_tags)
    work = jobs(e, specs, trigger)
    device = resolve_device(t.device)
    for warning in (vision_on_cpu_warning(device), small_parts_warning(e, len(work))):
        if warning:
            log.warning(warning)
    dtype, compiled = resolve_dtype(t.mixed_precision, device), e.compile_backend if e.compile else ""
    with base_pipeline(t.base_model, dtype, t.base_config, device, compiled) as pipe:
        generator = Generator(pipe, e, t.clip_skip, device)
        scorer = Scorer(settings, trigger, features, threshold, device)

        steps = sorted(checkpoints)
        table: dict[int, dict[str, float | None]] = {
            s: {m: None for m in METRICS} | {"validation_loss": validation_loss.get(s)} for s in steps
        }
        times: Counter[str] = Counter()  # where the evaluation's wall time went, in seconds
        with progress.task("evaluating checkpoints", total=len(steps) * len(work)) as task:

            def score(step: int, stops_early: StopsEarly | None) -> StepScores | str:
                folder, target = train_dir / checkpoints[step], step_dir(out_dir, step)
                scores = _evaluate_step(
                    generator, scorer, work, settings, trigger, folder, target, task, times, stops_early
                )
                if not isinstance(scores, str):
                    record = _step_record(step, {**table[step], **scores.values}, scores)
                    write_json_atomic(target / "metrics.json", record)
                return scores

            scored = score_checkpoints(table, e, score, len(work))
            generator.unload(trigger, t.embedding_vectors)  # the kept base pipeline goes back clean
            task.advance((len(steps) - len(scored.done)) * len(work))
    failed, ruled, done = scored.failed, scored.ruled, scored.done
    skipped = [s for s in steps if s not in done]

    selection = select_steps(table, e, frozenset(ruled))  # their partly scored rows count in the normalisation
    selection.excluded.update(ruled)
    for step in skipped:
        selection.excluded[step] = "not evaluated (coarse-to-fine)"
    for step, why in failed.items():
        selection.excluded[step] = f"failed to load: {why}"
    _write_tables(out_dir, table, scored.intervals, selection)
    metrics_plot(table, scored.intervals, METRICS, selection.kept, out_dir / "metrics_plot.png")
    details = {
        "device": str(device),
        "vision_provider": onnx_provider(),
        "seconds": {key: round(value, 2) for key, value in times.items()},
        "selected_step": selection.best,
        "kept_steps": selection.kept,
        "reason": selection.reason,
        "gate": {"passed": selection.gate_passed, "reason": selection.gate_reason},
        "excluded": {str(s): why for s, why in sorted(selection.excluded.items())},
        "missing_metrics": scorer.missing,
        "ccip_threshold": threshold,
        "prompt_set": chosen_set(e, image_tags),
        "prompts": [spec.name for spec in specs],
        "failed": {str(k): v for k, v in failed.items()},
        "skipped": skipped,
        "ruled_out": sorted(ruled),
        "metrics": {str(s): row for s, row in table.items()},
    }
    counts = {
        "checkpoints": len(steps),
        "evaluated": len(done) - len(failed),
        "ruled_out_early": len(ruled),  # on part of their images (sequential evaluation)
        "images_per_checkpoint": len(work),
        "images_rendered": scored.images,
        "failed_checkpoints": len(failed),
    }
    return Evaluation(counts, details, table, selection)


def _evaluate_step(
    generator: Generator,
    scorer: Scorer,
    work: list[Job],
    settings: Settings,
    trigger: str,
    folder: Path,
    target: Path,
    task,
    times: Counter[str],
    stops_early: Callable[[StepScores], bool] | None = None,
) -> StepScores | str:
    """Render and score one checkpoint; a checkpoint that fails to load gives the reason instead.

    With ``stops_early``, the images are rendered and scored a part at a time (``look_parts``), and the next
    part only when ``stops_early`` says those so far do not settle it (the scores then cover fewer images).
    ``times`` gathers the seconds spent loading, rendering, and waiting for the worker threads' scores and files."""
    e, t = settings.evaluate, settings.train
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        generator.load(folder / LORA_FILE, folder / EMBEDDING_FILE, trigger)
    except LOAD_ERRORS as exc:
        reason = first_line(exc)
        log.warning("checkpoint %s failed to load and is skipped: %s", folder.name, reason)
        generator.unload(trigger, t.embedding_vectors)
        task.advance(len(work))
        return reason
    finally:
        times["loading"] += time.perf_counter() - started
    rendered: dict[str, Image.Image] = {}
    # files are written and images measured on worker threads while the GPU renders the next batch
    with BackgroundPngs(times) as pngs, BackgroundMeasurements(scorer, times) as measuring:

        def render(chosen: list[Job]) -> list[Job]:
            """Render ``chosen``; every job rendered so far, in suite order."""
            batch: list[Job] = []
            started = time.perf_counter()
            for job, image in generator.render(chosen, on_image=task.advance):
                pngs.save(image, target / job.filename, a1111_parameters(job, e, t.clip_skip, Path(t.base_model).name))
                rendered[job.filename] = image
                batch.append(job)
                if len(batch) == e.batch_size or job is chosen[-1]:  # the generator's batch is complete
                    measuring.submit(batch, [rendered[j.filename] for j in batch])
                    batch = []
            times["rendering"] += time.perf_counter() - started
            return [job for job in work if job.filename in rendered]

        def finish(done: list[Job], scores: StepScores | None = None) -> StepScores:
            generator.unload(trigger, t.embedding_vectors, keep_adapter=True)  # the next one is hotswapped in
            preview_grid([(job.filename[:-4], rendered[job.filename]) for job in done], target / "grid.png")
            return scores or measuring.scores(done)

        if stops_early is None:
            return finish(render(work))
        *looked, last = look_parts(len(work), e.sequential_every)
        for part in looked:
            done = render([work[i] for i in part])
            partial = measuring.scores(done)
            if stops_early(partial):
                task.advance(len(work) - len(done))
                return finish(done, partial)
        return finish(render([work[i] for i in last]))


class BackgroundMeasurements:
    """Runs ``scorer.measure`` on one worker thread, batch by batch as images are rendered; ``scores(work)``
    waits for what was submitted and summarises ``work``'s images."""

    def __init__(self, scorer: Scorer, times: Counter[str]) -> None:
        self.scorer, self.times = scorer, times
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._parts: list[Future[Measured]] = []

    def submit(self, work: list[Job], images: list[Image.Image]) -> None:
        self._parts.append(self._pool.submit(self.scorer.measure, work, images))

    def scores(self, work: list[Job]) -> StepScores:
        started = time.perf_counter()
        parts = [part.result() for part in self._parts]
        self.times["waiting for scores"] += time.perf_counter() - started
        return self.scorer.summarise(work, parts)

    def __enter__(self) -> BackgroundMeasurements:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_info[0] is not None)


def _step_record(step: int, row: dict[str, float | None], scores: StepScores) -> dict:
    return {
        "step": step,
        "metrics": row,
        "intervals": {k: list(v) if v else None for k, v in scores.intervals.items()},
        "per_image": scores.per_image,
    }


def _write_tables(out_dir: Path, table, intervals, selection: Selection) -> None:
    header = ["step"]
    for metric in METRICS:
        header += [metric, f"{metric}_low", f"{metric}_high"]
    header += ["score", "kept_rank"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for step in sorted(table):
        row: list[object] = [step]
        for metric in METRICS:
            value, interval = table[step].get(metric), intervals.get(step, {}).get(metric)
            row += [
                "" if value is None else f"{value:.6f}",
                *(["", ""] if not interval else [f"{interval[0]:.6f}", f"{interval[1]:.6f}"]),
            ]
        score = selection.scores.get(step)
        row += [
            "" if score is None else f"{score:.6f}",
            selection.kept.index(step) + 1 if step in selection.kept else "",
        ]
        writer.writerow(row)
    write_bytes_atomic(out_dir / "metrics.csv", buffer.getvalue().encode())
    write_json_atomic(
        out_dir / "metrics.json",
        {str(s): {"metrics": table[s], "intervals": intervals.get(s, {})} for s in sorted(table)},
    )
    write_json_atomic(
        out_dir / "selection.json",
        {
            "kept": selection.kept,
            "best": selection.best,
            "reason": selection.reason,
            "scores": {str(k): v for k, v in selection.scores.items()},
            "excluded": {str(k): v for k, v in selection.excluded.items()},
            "gate": {"passed": selection.gate_passed, "reason": selection.gate_reason},
        },
    )
