"""A polite HTTP client: honest user agent, spacing between requests, bounded retries.

Retries honour ``Retry-After`` on 429 and back off exponentially (with jitter) on 5xx and
timeouts. A Cloudflare challenge stops the site at once instead of hammering it.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from lorafactory.errors import StageError

log = logging.getLogger(__name__)
RETRY_STATUSES = {429, 500, 502, 503, 504}


class CloudflareBlocked(StageError):
    """The site answered with a Cloudflare challenge page."""


def _is_cloudflare_challenge(response: httpx.Response) -> bool:
    return response.status_code in (403, 503) and (
        response.headers.get("server", "").lower() == "cloudflare" and "challenge" in response.text.lower()
        or response.headers.get("cf-mitigated") == "challenge"
    )


class PoliteClient:
    def __init__(self, user_agent: str, timeout_s: float, max_retries: int, interval_s: float) -> None:
        self._client = httpx.Client(headers={"User-Agent": user_agent}, timeout=timeout_s, follow_redirects=True)
        self.max_retries = max_retries
        self.interval_s = interval_s
        self._last = 0.0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PoliteClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _wait_turn(self) -> None:
        delay = self._last + self.interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._last = time.monotonic()

    def get(self, url: str, params: dict | None = None) -> httpx.Response:
        """GET with retries; raises StageError with the status when retries run out."""
        attempt = 0
        while True:
            self._wait_turn()
            try:
                response = self._client.get(url, params=params)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise StageError(f"request to {url} failed after {attempt + 1} tries: {exc.__class__.__name__}") from exc
                self._sleep_backoff(attempt, None)
                attempt += 1
                continue
            if _is_cloudflare_challenge(response):
                raise CloudflareBlocked(f"{httpx.URL(url).host} answered with a Cloudflare challenge; stopping this site")
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                self._sleep_backoff(attempt, response.headers.get("retry-after"))
                attempt += 1
                continue
            return response

    def _sleep_backoff(self, attempt: int, retry_after: str | None) -> None:
        if retry_after is not None:
            try:
                delay = float(retry_after)
            except ValueError:
                delay = 2.0**attempt
        else:
            delay = min(60.0, 0.5 * 2.0**attempt) * random.uniform(0.5, 1.5)
        log.info("retrying in %.1fs", delay)
        time.sleep(delay)

    def download(self, url: str, dest: Path) -> int:
        """Fetch ``url`` into ``dest`` through a temporary file; a partial body never lands."""
        response = self.get(url)
        if response.status_code != 200:
            raise StageError(f"download of {url} failed with HTTP {response.status_code}")
        expected = response.headers.get("content-length")
        body = response.content
        if expected is not None and int(expected) != len(body):
            raise StageError(f"download of {url} was truncated ({len(body)} of {expected} bytes)")
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(body)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(body)
