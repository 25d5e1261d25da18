"""Danbooru (and sites on its software): ``/posts.json`` search, variant choice, downloads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, UnidentifiedImageError

from lorafactory.errors import StageError
from lorafactory.sources.base import Post
from lorafactory.sources.http import PoliteClient

log = logging.getLogger(__name__)
_CATEGORIES = ("general", "character", "copyright", "artist", "meta")


def character_tag(name: str) -> str:
    """Danbooru style: ``'Surtr (Arknights)'`` -> ``'surtr_(arknights)'``."""
    return "_".join(name.strip().lower().split())


def choose_variant(raw: dict[str, Any], min_size: int) -> tuple[str, int, int] | None:
    """The smallest variant whose sides are both at least ``min_size``, else the largest one."""
    variants = [
        (v["url"], int(v.get("width", 0)), int(v.get("height", 0)))
        for v in (raw.get("media_asset") or {}).get("variants") or []
        if v.get("url") and v.get("type") not in ("180x180", "360x360", "720x720")
    ]
    if raw.get("file_url"):
        variants.append((raw["file_url"], int(raw.get("image_width", 0)), int(raw.get("image_height", 0))))
    if not variants:
        return None
    big_enough = [v for v in variants if min(v[1], v[2]) >= min_size]
    if big_enough:
        return min(big_enough, key=lambda v: v[1] * v[2])
    return max(variants, key=lambda v: v[1] * v[2])


def to_post(raw: dict[str, Any], url: str, width: int, height: int, filename: str) -> Post:
    return Post(
        site="danbooru",
        post_id=str(raw["id"]),
        md5=raw.get("md5") or "",
        filename=filename,
        url=url,
        width=width,
        height=height,
        rating=raw.get("rating") or "",
        score=int(raw.get("score") or 0),
        tags={c: (raw.get(f"tag_string_{c}") or "").split() for c in _CATEGORIES},
    )


class DanbooruSource:
    def __init__(self, client: PoliteClient, base_url: str, page_size: int) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size

    def search(self, tags: list[str]) -> Iterator[dict[str, Any]]:
        """Raw posts, newest first, paging until an empty or short page."""
        page = 1
        while True:
            response = self.client.get(
                f"{self.base_url}/posts.json", params={"tags": " ".join(tags), "limit": self.page_size, "page": page}
            )
            if response.status_code == 410:
                return  # past the page cap
            if response.status_code != 200:
                raise StageError(f"danbooru search failed with HTTP {response.status_code}: {response.text[:200]}")
            try:
                items = response.json()
            except ValueError as exc:
                raise StageError(f"danbooru returned a page that is not JSON (page {page})") from exc
            yield from items
            if len(items) < self.page_size:
                return
            page += 1

    def crawl(
        self, tags: list[str], images_dir: Path, limit: int, min_size: int, on_item: Callable[[], None] | None = None
    ) -> tuple[list[Post], dict[str, int]]:
        posts: list[Post] = []
        seen: set[str] = set()
        counts = {"found": 0, "no_file": 0, "duplicate": 0, "failed": 0, "unreadable": 0}
        for raw in self.search(tags):
            if len(posts) >= limit:
                break
            counts["found"] += 1
            if raw.get("is_deleted") or raw.get("is_banned"):
                counts["no_file"] += 1
                continue
            variant = choose_variant(raw, min_size)
            if variant is None:
                counts["no_file"] += 1
                continue
            md5 = raw.get("md5") or ""
            if md5 and md5 in seen:
                counts["duplicate"] += 1
                continue
            url, width, height = variant
            suffix = Path(url.split("?")[0]).suffix.lower() or ".jpg"
            filename = f"danbooru_{raw['id']}{suffix}"
            try:
                self.client.download(url, images_dir / filename)
            except StageError as exc:
                log.warning("skipping danbooru post %s: %s", raw["id"], exc)
                counts["failed"] += 1
                continue
            if not _readable(images_dir / filename):
                (images_dir / filename).unlink()
                counts["unreadable"] += 1
                continue
            seen.add(md5)
            posts.append(to_post(raw, url, width, height, filename))
            if on_item:
                on_item()
        counts["kept"] = len(posts)
        return posts, counts


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        log.warning("skipping unreadable download %s: %s", path.name, exc)
        return False
