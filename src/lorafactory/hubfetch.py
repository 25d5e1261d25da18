"""Why a model could not be fetched from the Hugging Face Hub, in one line that names the model and the fix.

The libraries that fetch models (huggingface_hub itself, and diffusers, transformers and imgutils through it) say
"check your connection" without naming the file, or wrap the Hub's error in their own; the Hub's error is
somewhere in the exception's chain, and the URL it was fetching names the repository and file.

And what is being fetched: the libraries show no progress while they download, so a model the cache lacks is
announced, and a stage's downloads are reported from the cache's folders as they grow."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from rich.filesize import decimal

from lorafactory.errors import ConfigError, StageError, exception_chain, first_line

_HUB_URL = re.compile(  # an API call names a repository; a file's URL its repository and path
    r"https?://[^/\s'\"]+/(?:api/(?:models|datasets|spaces)/([\w.-]+/[\w.-]+)"
    r"|(?:(?:datasets|spaces)/)?([\w.-]+/[\w.-]+)/resolve/[^/\s'\"]+/([^\s'\"]+))"
)
LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


class HubRefused(ConfigError):
    """The Hub's own answer (gated, private, no such file or revision, refused): a setting or the account must
    change before a retry can help."""


class HubUnavailable(StageError):
    """Not in the cache while offline, no connection, or a failing Hub: a later try, or another machine, may
    have the model."""


log = logging.getLogger(__name__)


def _fetched(chain: list[BaseException]) -> str:
    """The repository (and file) that the chain's URLs name: from a request or response, else the messages."""
    for exc in chain:
        for text in (_request_url(getattr(exc, "response", None)), _request_url(exc), str(exc)):
            found = _HUB_URL.search(text)
            if found:
                return "/".join(part for part in found.groups() if part).rstrip(".,:;")
    return ""


def _request_url(holder: Any) -> str:
    """The URL of the request an exception or response holds; empty when it holds none."""
    try:
        return str(holder.request.url)
    except (AttributeError, RuntimeError):  # none, or httpx's "the request instance has not been set"
        return ""


def hub_failure(exc: BaseException, model: str = "") -> HubRefused | HubUnavailable | None:
    """A one-line error when ``exc`` (or what it was raised from) is the Hub's failure to give a model; else None.
    ``model``: the model id the caller asked for, named when the chain's URLs do not name a file."""
    from huggingface_hub import constants, errors

    chain = list(exception_chain(exc))
    hub = next((e for e in chain if type(e).__module__.startswith("huggingface_hub")), None)
    what = _fetched(chain) or model or "a model"
    if isinstance(hub, errors.GatedRepoError):
        repo = "/".join(what.split("/")[:2])
        return HubRefused(
            f"{what} is gated on the Hugging Face Hub: accept its terms at {constants.ENDPOINT}/{repo}, then {LOGIN}"
        )
    if isinstance(hub, errors.RepositoryNotFoundError):
        return HubRefused(f"{what} is not on the Hugging Face Hub, or is private: check the model id, or {LOGIN}")
    if isinstance(hub, errors.RevisionNotFoundError):
        return HubRefused(f"{what}: the Hugging Face Hub has no such revision; check the model id and revision")
    if isinstance(hub, errors.RemoteEntryNotFoundError):
        return HubRefused(f"{what} is not in its repository on the Hugging Face Hub; check the model id")
    if isinstance(hub, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return HubUnavailable(
                f"{what} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: run once without it "
                "to download the model, or copy a cache that holds it there (HF_HUB_CACHE)"
            )
        causes = chain[chain.index(hub) + 1 :]
        reason = f" ({first_line(causes[0])})" if causes else ""
        return HubUnavailable(
            f"{what} is not in the Hugging Face cache ({cache}) and the Hub could not be reached{reason}: check the "
            "connection (a proxy, HF_ENDPOINT), or copy a cache that holds it there (HF_HUB_CACHE)"
        )
    if isinstance(hub, errors.HfHubHTTPError):
        if hub.response.status_code in (401, 403):
            return HubRefused(f"the Hugging Face Hub refused {what} ({first_line(hub)}): {LOGIN}")
        return HubUnavailable(f"the Hugging Face Hub failed to give {what} ({first_line(hub)}); try again later")
    return None


def say_if_downloading(model_id: str, probe: str, what: str) -> None:
    """Say so before a hub model that is not in the cache is fetched (a base model is several GB; the stage's
    download lines follow). ``probe``: a file every version of the model has (its config)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if constants.HF_HUB_OFFLINE or Path(model_id).expanduser().exists():
        return
    try:
        cached = try_to_load_from_cache(model_id, probe)
    except HFValidationError:  # not a hub id: the loader says what is wrong with it
        return
    if not isinstance(cached, str):
        log.info(
            "%s %s is not in the Hugging Face cache (%s) yet: downloading it, once; this takes a while",
            what,
            model_id,
            constants.HF_HUB_CACHE,
        )


REPORT_EVERY_S = 20.0  # how often a download says how much has come


@contextmanager
def reporting_downloads(every: float = REPORT_EVERY_S) -> Iterator[None]:
    """While a stage runs, every ``every`` seconds: each repository of the Hugging Face cache that grew, how much
    has come and at what rate; at the end, what came. The libraries show no progress while they download (the CLI
    turns their bars off), so a first run would seem to hang for minutes. Measured from the cache's folders, so it
    sees every library's downloads (diffusers, transformers, imgutils) in every process of the stage, and those of
    other processes sharing the cache."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    before, stop = _repo_bytes(cache), threading.Event()
    watcher = threading.Thread(target=_report, args=(cache, before, every, stop), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    come = _grown(before, _repo_bytes(cache))
    if come:
        log.info(
            "downloaded into the Hugging Face cache: %s",
            ", ".join(f"{repo} ({decimal(n)})" for repo, n in sorted(come.items())),
        )


def _report(cache: Path, before: dict[str, int], every: float, stop: threading.Event) -> None:
    """Every ``every`` seconds until ``stop``: per repository that grew since the last line, the bytes come since
    the start and the rate since then."""
    said: dict[str, int] = {}
    last = time.monotonic()
    while not stop.wait(every):
        come, now = _grown(before, _repo_bytes(cache)), time.monotonic()
        for repo, size in come.items():
            if size > said.get(repo, 0):
                rate = decimal(int((size - said.get(repo, 0)) / (now - last)))
                log.info("downloading %s: %s so far, %s/s", repo, decimal(size), rate)
        said, last = {**said, **come}, now


def _grown(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """The bytes each repository gained since ``before``, for those that gained any."""
    return {repo: size - before.get(repo, 0) for repo, size in now.items() if size > before.get(repo, 0)}


def _repo_bytes(cache: Path) -> dict[str, int]:
    """Each repository's bytes in the cache's ``blobs`` folders, finished and in progress: its id as the Hub
    writes it (``org/name``, ``datasets/org/name``); the folder names are huggingface_hub's
    (``models--org--name``; a repository id cannot hold ``--``)."""
    sizes = {}
    for folder in _entries(cache):
        kind, _, repo = folder.name.partition("--")
        if kind in ("models", "datasets", "spaces") and repo:
            name = repo.replace("--", "/")
            sizes[name if kind == "models" else f"{kind}/{name}"] = sum(_sizes(Path(folder.path, "blobs")))
    return sizes


def _sizes(folder: Path) -> Iterator[int]:
    """The sizes of a folder's files (one renamed or removed meanwhile is skipped)."""
    for entry in _entries(folder):
        with suppress(FileNotFoundError):
            yield entry.stat().st_size


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
