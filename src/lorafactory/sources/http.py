"""Polite asynchronous HTTP: one httpx client, a rate limit per site, bounded retries.

Each site gets its own requests-per-second and concurrency. A ``Retry-After`` (or
``X-RateLimit-Reset``) pauses the whole site: no request of any worker starts before the time the
server gave. 5xx and timeouts back off exponentially with jitter; permanent failures (a URL
scheme httpx cannot fetch, 401/403/404/410) are not retried. A Cloudflare challenge stops that
site at once instead of hammering it. Downloads land through a temporary file, checked for size,
image type and the site's md5, and renamed only when complete. Credentials never appear in messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import httpx

from lorafactory.errors import StageError
from lorafactory.redact import redact, register

log = logging.getLogger(__name__)
RETRY_STATUSES = {429, 500, 502, 503, 504}
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")


class CloudflareBlocked(StageError):
    """The site answered with a Cloudflare challenge page."""


class StorageFull(StageError):
    """A download could not be written: the whole crawl stops (finished files are kept)."""


def is_cloudflare_challenge(response: httpx.Response) -> bool:
    return response.status_code in (403, 503) and (
        response.headers.get("cf-mitigated") == "challenge"
        or (response.headers.get("server", "").lower() == "cloudflare" and "challenge" in response.text.lower())
    )


def _wait_hint(response: httpx.Response) -> str | None:
    """Seconds to wait from ``Retry-After``, or from ``X-RateLimit-Reset`` (an epoch time, as Sankaku sends)."""
    if "retry-after" in response.headers:
        return response.headers["retry-after"]
    reset = response.headers.get("x-ratelimit-reset")
    if reset and reset.isdigit():
        return str(min(600.0, max(0.0, int(reset) - time.time())))
    return None


class SharedBudget(Protocol):
    """A site's request rate shared with other processes (a fleet's workers, on any machine)."""

    async def reserve(self, site: str, interval: float) -> float:
        """Book the site's next request start, ``interval`` seconds after the last one booked by
        anyone; returns the seconds to wait for it (below zero: the booked moment has passed)."""

    def pause(self, site: str, seconds: float) -> None:
        """Hold back every process's requests to the site for ``seconds`` (without waiting for an answer)."""


REBOOKS = 5  # shared-budget bookings tried for one request start before taking the last


class RateLimit:
    """At most ``per_second`` request starts per second, and ``concurrency`` requests at once;
    ``pause`` holds back every request start until a time the server gave. With a ``shared``
    budget the rate (and the pause) is the site's across every process using that budget."""

    def __init__(
        self, per_second: float, concurrency: int, site: str = "", shared: SharedBudget | None = None
    ) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.site, self.shared = site, shared
        self._slots = asyncio.Semaphore(concurrency)
        self._lock = asyncio.Lock()
        self._next = 0.0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        if self.shared is not None:
            try:
                self.shared.pause(self.site, seconds)
            except Exception:  # noqa: BLE001 - this crawl's own pause holds regardless
                log.warning("%s: could not pass the pause on to the shared request budget", self.site)

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        try:
            if self.shared is not None:
                try:
                    delay = await self._booked()
                except Exception as exc:  # noqa: BLE001 - whatever the budget's transport raises
                    log.warning(
                        "%s: the shared request budget is unreachable (%s); pacing this crawl alone", self.site, exc
                    )
                    self.shared = None
                else:
                    await asyncio.sleep(max(delay, self._paused_until - time.monotonic(), 0.0))
                    return
            while True:
                async with self._lock:
                    now = time.monotonic()
                    start = max(now, self._next, self._paused_until)
                    if start <= now:
                        self._next = now + self.interval
                        return
                await asyncio.sleep(start - now)  # then look again: a pause may have come meanwhile
        except BaseException:
            self._slots.release()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        self._slots.release()

    async def _booked(self) -> float:
        """The wait for a request start booked in the shared budget. A booking whose moment passed
        more than half an interval ago (the answer came late) is given up and another made: sent
        now, the request would crowd the one booked after it."""
        for _ in range(REBOOKS):
            delay = await self.shared.reserve(self.site, self.interval)
            if delay >= -self.interval / 2:
                return delay
        return max(delay, 0.0)


class SiteClient:
    """Requests to one site through the shared client, under that site's rate limit."""

    def __init__(
        self,
        site: str,
        http: httpx.AsyncClient,
        limit: RateLimit,
        max_retries: int,
        secrets: tuple[str, ...] = (),
        headers: dict | None = None,
    ) -> None:
        self.site, self.http, self.limit, self.max_retries = site, http, limit, max_retries
        self.headers = headers or {}  # sent with every request to this site (e.g. its own User-Agent rule)
        self.secrets: tuple[str, ...] = ()
        self.add_secrets(*secrets)

    def add_secrets(self, *secrets: str) -> None:
        """Credentials of this site: masked in every message (in any encoding), here and process-wide."""
        self.secrets += tuple(s for s in secrets if s)
        register(*secrets)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    async def get(self, url: str, params: dict | None = None, headers: dict | None = None) -> httpx.Response:
        """GET with retries; the last response is returned when retries run out."""
        attempt = 0
        while True:
            try:
                async with self.limit:
                    response = await self.http.get(url, params=params, headers={**self.headers, **(headers or {})})
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise StageError(f"{self.site}: cannot fetch this URL ({exc.__class__.__name__})") from None
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise StageError(
                        f"{self.site}: request failed after {attempt + 1} tries ({exc.__class__.__name__})"
                    ) from None
                await self._backoff(attempt, None)
                attempt += 1
                continue
            if is_cloudflare_challenge(response):
                raise CloudflareBlocked(
                    (
                        f"{self.site} answered with a Cloudflare challenge; "
                        "stopping this site (try later, or from another network)"
                    )
                )
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                await self._backoff(attempt, _wait_hint(response))
                attempt += 1
                continue
            return response

    async def _backoff(self, attempt: int, wait_hint: str | None) -> None:
        """Wait before a retry: the server's own wait pauses the whole site; else exponential with jitter."""
        try:
            delay = float(wait_hint) if wait_hint is not None else None
        except ValueError:
            delay = None
        if delay is not None:
            log.info("%s: the server asked for a %.1fs pause; pausing the site", self.site, delay)
            self.limit.pause(delay)
            return
        delay = min(60.0, 0.5 * 2.0**attempt) * random.uniform(0.5, 1.5)
        log.info("%s: retrying in %.1fs", self.site, delay)
        await asyncio.sleep(delay)

    async def get_json(self, url: str, params: dict, refusals: dict[int, str] | None = None) -> Any:
        """A JSON API page; a refusal or a body that is not JSON is a one-line StageError
        (``refusals`` gives the message for statuses that need one, such as 401)."""
        response = await self.get(url, params=params)
        if response.status_code != 200:
            hint = (refusals or {}).get(response.status_code, self.redact(response.text[:200]))
            raise StageError(f"{self.site} search failed with HTTP {response.status_code}: {hint}")
        try:
            return response.json()
        except ValueError as exc:
            raise StageError(f"{self.site} returned a page that is not JSON") from exc

    async def login(self, url: str, failure: str, **body: Any) -> None:
        """POST credentials (``data=`` form or ``json=``) for an access token, then send it as a
        Bearer token with every request; the token joins the secrets kept out of messages."""
        async with self.limit:
            response = await self.http.post(url, **body)
        if response.status_code != 200:
            raise StageError(f"{self.site} login failed with HTTP {response.status_code}; {failure}")
        token = response.json()["access_token"]
        self.add_secrets(token)
        self.headers["Authorization"] = f"Bearer {token}"

    def _image_body(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise StageError(f"{self.site}: download failed with HTTP {response.status_code}")
        if response.url.path.endswith("/expired.png"):
            raise StageError(f"{self.site}: the signed file link expired before the download")
        body = response.content
        expected = response.headers.get("content-length")
        if expected is not None and int(expected) != len(body):
            raise StageError(f"{self.site}: download truncated ({len(body)} of {expected} bytes)")
        if not body.startswith(IMAGE_MAGIC):
            raise StageError(
                f"{self.site}: download is not an image ({response.headers.get('content-type', 'unknown type')})"
            )
        return body

    async def download(self, url: str, dest: Path, md5: str = "") -> int:
        """Fetch an image into ``dest``; a truncated or non-image body never lands, nor one whose md5
        differs from the site's (``md5``, when given: such a download is retried, then dropped)."""
        attempt = 0
        while True:
            body = self._image_body(await self.get(url))
            if not md5 or hashlib.md5(body).hexdigest() == md5.lower():
                break
            if attempt >= self.max_retries:
                raise StageError(f"{self.site}: the download does not match the site's md5 after {attempt + 1} tries")
            await self._backoff(attempt, None)
            attempt += 1
        try:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        except OSError as exc:
            raise StorageFull(
                (
                    f"cannot write into {dest.parent}: {exc.strerror}; free "
                    "disk space and rerun (finished downloads are kept)"
                )
            ) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(body)
            os.replace(tmp, dest)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageFull(
                f"cannot write {dest.name}: {exc.strerror}; free disk space and rerun (finished downloads are kept)"
            ) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(body)


async def keyset(fetch: Callable[[int | None], Awaitable[list[dict]]]) -> AsyncIterator[dict]:
    """Posts page by page, each page asked for ids below the lowest seen (no page number, so no page cap)."""
    below: int | None = None
    while True:
        items = await fetch(below)
        if not items:
            return
        for item in items:
            yield item
        below = min(int(item["id"]) for item in items)
