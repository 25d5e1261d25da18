"""The normalised record of one fetched image, and what every site adapter is made from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar, Protocol

from pydantic import BaseModel, Field

from lorafactory.sources.http import SiteClient

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")


class Post(BaseModel):
    """One image and its metadata, whatever the site."""

    site: str
    post_id: str
    md5: str
    filename: str = Field(description="File name inside the raw artifact's images/ folder.")
    url: str = ""
    width: int = 0
    height: int = 0
    rating: str = ""
    score: int = 0
    tags: dict[str, list[str]] = Field(default_factory=dict, description="Tags by category, e.g. general, character.")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A post worth downloading, the URL of its chosen variant, and the md5 that file must have
    (empty when unknown: sites give the md5 of the original file only)."""

    post: Post
    url: str
    md5: str = ""


def original_md5(raw: dict[str, Any], url: str) -> str:
    """The site's md5 when ``url`` is the original file (``file_url``), whose md5 it is; else empty."""
    return str(raw.get("md5") or "") if url and url == raw.get("file_url") else ""


class SiteAdapter:
    """An image site's API, as built for one crawl: the HTTP client, the API's root URL, the page size
    (at most the site's ``max_page_size``), the site's name in the settings, and the credentials
    (or None)."""

    max_page_size: ClassVar[int | None] = None  # None: the size is passed on as it is, or the site ignores it
    headers: ClassVar[dict[str, str]] = {}  # sent with every request to the site

    def __init__(
        self, client: SiteClient, base_url: str, page_size: int, name: str, auth: tuple[str, str] | None = None
    ) -> None:
        self.client, self.base_url, self.name, self.auth = client, base_url.rstrip("/"), name, auth
        self.page_size = page_size if self.max_page_size is None else min(page_size, self.max_page_size)
        client.headers.update(self.headers)


class Site(Protocol):
    """An image site: paged search results and the normalised post of each."""

    name: str

    def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]: ...

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None: ...


def booru_candidate(
    site: str,
    raw: dict[str, Any],
    variant: tuple[str, int, int],
    tags: dict[str, list[str]],
    rating: str | None = None,
    score_key: str = "score",
) -> Candidate:
    """A booru post (``id``, ``md5``, ``rating`` and score fields) at its chosen (url, width, height)
    ``variant``; ``rating`` replaces the post's own when the site spells ratings differently."""
    url, width, height = variant
    post = Post(
        site=site,
        post_id=str(raw["id"]),
        md5=raw.get("md5") or "",
        filename="",
        url=url,
        width=width,
        height=height,
        rating=(raw.get("rating") or "") if rating is None else rating,
        score=int(raw.get(score_key) or 0),
        tags=tags,
    )
    return Candidate(post, url, original_md5(raw, url))


def smallest_fit(variants: list[tuple[str, int, int]], min_size: int) -> tuple[str, int, int] | None:
    """The smallest (url, width, height) whose sides are both at least ``min_size``, else the largest."""
    variants = [v for v in variants if v[0]]
    if not variants:
        return None
    big_enough = [v for v in variants if min(v[1], v[2]) >= min_size]
    if big_enough:
        return min(big_enough, key=lambda v: v[1] * v[2])
    return max(variants, key=lambda v: v[1] * v[2])
