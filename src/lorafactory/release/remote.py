"""Calls to the services a release is published to: transient failures (connection errors, 5xx,
429) are retried with backoff; a rejected credential becomes a one-line error that names it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from lorafactory.errors import ConfigError, StageError

T = TypeVar("T")
RETRIES = 3
RETRY_DELAY_S = 1.0  # doubled after each failed attempt


@dataclass(frozen=True)
class Service:
    name: str  # as a sentence names it: "the Hub", "Civitai"
    credential: str  # "token", "API key"
    env: str  # the environment variable holding it
    rerun: str  # the command that resumes an interrupted publish


def call_with_retries(
    service: Service, what: str, action: Callable[[], T], errors: tuple[type[BaseException], ...]
) -> T:
    """``action()``, retried on ``errors`` that are transient; ``what`` completes "trying to …"."""
    for attempt in range(RETRIES):
        try:
            return action()
        except errors as exc:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            if status in (401, 403):
                raise ConfigError(
                    f"{service.name} rejected the {service.credential} ({status}) while trying to {what}; "
                    f"set {service.env} to a valid {service.credential} with write access"
                ) from exc
            if (status is not None and status < 500 and status != 429) or attempt == RETRIES - 1:
                detail = f"{status}: {response.text[:200]}" if status is not None else str(exc)
                raise StageError(
                    (
                        f"could not {what} on {service.name} ({detail}); rerun "
                        f"`{service.rerun}` to resume: what already landed is skipped"
                    )
                ) from exc
        time.sleep(RETRY_DELAY_S * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises
