"""Training on several processes, one per GPU: ``torchrun`` starts the workers (see
``lorafactory.train.collective`` for how they split the work).

The pipeline's process stays single: ``launch`` starts the workers, relays their progress bars
and returns their result; ``train`` picks one process or several from the settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Iterable, Iterator

import torch

from lorafactory.config import Settings
from lorafactory.errors import ConfigError, StageError
from lorafactory.progress import Progress, SilentProgress, Task
from lorafactory.train import trainer
from lorafactory.train.collective import WORKER_ENV, in_worker
from lorafactory.train.trainer import TrainResult

_EVENT = "@lorafactory-train "
JOB_FILE = "distributed_job.json"

# --- the workers' side ---------------------------------------------------------------------


class _RelayProgress:
    """Progress events as lines on stdout, drawn by the launching process."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.count = stream, 0

    def _emit(self, **event) -> None:
        self.stream.write(_EVENT + json.dumps(event) + "\n")
        self.stream.flush()

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        self.count += 1
        task_id = self.count
        self._emit(begin=task_id, description=description, total=total)
        relay = self

        class _Task:
            def advance(self, amount: int = 1) -> None:
                relay._emit(advance=task_id, amount=amount)

            def complete(self) -> None:
                relay._emit(complete=task_id)

        try:
            yield _Task()
        finally:
            self._emit(end=task_id)

    def note(self, message: str) -> None:
        self._emit(note=message)


def worker_main(job_file: str) -> int:
    """One training process: run the job; the main process reports the result or the error."""
    job = json.loads(Path(job_file).read_text())
    main = int(os.environ.get("RANK", "0")) == 0
    relay = _RelayProgress(sys.stdout) if main else None
    try:
        result = trainer.train(
            Settings.model_validate(job["settings"]),
            job["trigger"],
            Path(job["dataset_dir"]),
            Path(job["out_dir"]),
            relay or SilentProgress(),
            job["stop_after"],
        )
    except (StageError, ConfigError) as exc:
        if relay:
            relay._emit(error=str(exc), kind=type(exc).__name__)
        return 3
    if relay:
        relay._emit(result=asdict(result))
    return 0


# --- the launching side --------------------------------------------------------------------


def _check_devices(settings: Settings) -> None:
    n, device = settings.train.num_processes, settings.train.device
    if device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise ConfigError(
            (
                f"train.num_processes = {n} but only {torch.cuda.device_count()} "
                "GPU(s) are visible; lower train.num_processes"
            )
        )
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(
            (
                f"train.num_processes = {n} needs {n} GPUs and none is visible; "
                "set train.num_processes = 1 (or train.device = 'cpu')"
            )
        )


def launch(
    settings: Settings, trigger: str, dataset_dir: Path, out_dir: Path, progress: Progress, stop_after: int | None
) -> TrainResult:
    """Train on ``train.num_processes`` processes and return the main one's result."""
    _check_devices(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_file = out_dir / JOB_FILE
    job = {
        "settings": settings.model_dump(mode="json"),
        "trigger": trigger,
        "dataset_dir": str(dataset_dir),
        "out_dir": str(out_dir),
        "stop_after": stop_after,
    }
    job_file.write_text(json.dumps(job))  # secrets are masked by model_dump; the file is removed below
    n = settings.train.num_processes
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "lorafactory.launch.torchrun",
        str(job_file),
    ]
    env = {
        **os.environ,
        WORKER_ENV: "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or n) // n))),
    }
    progress.note(f"training on {n} processes")
    outcome: dict = {}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        _relay(process.stdout, progress, outcome)
        code = process.wait()
    except KeyboardInterrupt:
        process.wait(timeout=60)  # the workers got the same interrupt; their saved state stays valid
        raise
    finally:
        job_file.unlink(missing_ok=True)
    if "error" in outcome:
        raise (ConfigError if outcome["kind"] == "ConfigError" else StageError)(outcome["error"])
    if code != 0 or "result" not in outcome:
        raise StageError(
            f"distributed training stopped (exit code {code}); see the worker messages above, then rerun to resume"
        )
    result = outcome["result"]
    result["checkpoints"] = {int(step): path for step, path in result["checkpoints"].items()}
    return TrainResult(**result)


def _relay(lines: Iterable[str], progress: Progress, outcome: dict) -> None:
    """Draw the workers' progress events; keep their result or error in ``outcome``."""
    open_tasks: dict[int, tuple[ExitStack, Task]] = {}
    try:
        for line in lines:
            if not line.startswith(_EVENT):
                sys.stdout.write(line)
                continue
            event = json.loads(line[len(_EVENT) :])
            if "begin" in event:
                stack = ExitStack()
                open_tasks[event["begin"]] = (
                    stack,
                    stack.enter_context(progress.task(event["description"], event["total"])),
                )
            elif "advance" in event:
                open_tasks[event["advance"]][1].advance(event["amount"])
            elif "complete" in event:
                open_tasks[event["complete"]][1].complete()
            elif "end" in event:
                open_tasks.pop(event["end"])[0].close()
            elif "note" in event:
                progress.note(event["note"])
            else:
                outcome.update(event)
    finally:
        for stack, _ in open_tasks.values():
            stack.close()


def train(
    settings: Settings,
    trigger: str,
    dataset_dir: Path,
    out_dir: Path,
    progress: Progress,
    stop_after: int | None = None,
) -> TrainResult:
    """The train stage on as many processes as ``train.num_processes`` asks (see ``trainer.train``)."""
    if settings.train.num_processes > 1 and not in_worker():
        return launch(settings, trigger, dataset_dir, out_dir, progress, stop_after)
    return trainer.train(settings, trigger, dataset_dir, out_dir, progress, stop_after)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
