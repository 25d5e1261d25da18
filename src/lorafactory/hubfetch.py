"""Why a model could not be fetched from the Hugging Face Hub, in one line that names the model and the fix.

The libraries that fetch models (huggingface_hub itself, and diffusers, transformers and imgutils through it) say
"check your connection" without naming the file, or wrap the Hub's error in their own; the Hub's error is
somewhere in the exception's chain, and the URL it was fetching names the repository and file."""

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


REPORT_EVERY_S = 20.0  # how often a download says how much has come


@contextmanager
def reporting_download(model_id: str, probe: str, what: str, every: float = REPORT_EVERY_S) -> Iterator[None]:
    """Around a library's fetch of a hub model: when the model is not in the cache, say so first, then every
    ``every`` seconds how much has come, then the total and time; the libraries show no progress while they
    download (a base model is several GB), so the stage would seem to hang. Measured from the model's folder in
    the Hugging Face cache, whichever library fetches it. ``probe``: a file every version of the model has (its
    config)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if not _needs_download(model_id, probe):
        yield
        return
    log.info(
        "%s %s is not in the Hugging Face cache (%s) yet: downloading it, once; this takes a while",
        what,
        model_id,
        constants.HF_HUB_CACHE,
    )
    blobs = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=model_id, repo_type="model"), "blobs")
    before, started, stop = _folder_bytes(blobs), time.monotonic(), threading.Event()
    watcher = threading.Thread(target=_report, args=(blobs, before, f"{what} {model_id}", every, stop), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    come, elapsed = _folder_bytes(blobs) - before, time.monotonic() - started
    if come > 0:
        log.info("%s %s: downloaded %s in %.0f s", what, model_id, decimal(come), elapsed)


def _needs_download(model_id: str, probe: str) -> bool:
    """Whether loading ``model_id`` will fetch it from the Hub: online, a hub id, its ``probe`` not cached."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if constants.HF_HUB_OFFLINE or Path(model_id).expanduser().exists():
        return False
    try:
        return not isinstance(try_to_load_from_cache(model_id, probe), str)
    except HFValidationError:  # not a hub id: the loader says what is wrong with it
        return False


def _report(blobs: Path, before: int, name: str, every: float, stop: threading.Event) -> None:
    """Every ``every`` seconds until ``stop``: the bytes come since the start and the rate since the last line,
    when more have come."""
    said, last = 0, time.monotonic()
    while not stop.wait(every):
        come, now = _folder_bytes(blobs) - before, time.monotonic()
        if come > said:
            log.info("%s: %s downloaded, %s/s", name, decimal(come), decimal(int((come - said) / (now - last))))
            said, last = come, now


def _folder_bytes(folder: Path) -> int:
    """The bytes in a cache folder's files, finished and in progress (a file renamed meanwhile is skipped)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        with suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total
