"""Danbooru and sites on its software (safebooru.donmai.us): ``/posts.json`` search with keyset
paging (``page=b<id>``), which goes past the 1000-page cap, and the smallest big-enough variant."""

from __future__ import annotations

from typing import Any, AsyncIterator

from lorafactory.errors import StageError
from lorafactory.sources.base import Candidate, Post
from lorafactory.sources.http import SiteClient

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


class Danbooru:
    def __init__(self, client: SiteClient, base_url: str, page_size: int, name: str = "danbooru", auth: tuple[str, str] | None = None) -> None:
        self.client, self.base_url, self.page_size, self.name = client, base_url.rstrip("/"), page_size, name
        self.auth = auth

    async def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        """Raw posts, newest first; after the first page, keyset paging below the lowest id seen."""
        page = "1"
        while True:
            params = {"tags": " ".join(tags), "limit": self.page_size, "page": page}
            if self.auth:
                params.update({"login": self.auth[0], "api_key": self.auth[1]})
            response = await self.client.get(f"{self.base_url}/posts.json", params=params)
            if response.status_code == 410:
                return  # past a page cap (keyset paging should never get here)
            if response.status_code != 200:
                raise StageError(f"{self.name} search failed with HTTP {response.status_code}: {self.client.redact(response.text[:200])}")
            try:
                items = response.json()
            except ValueError as exc:
                raise StageError(f"{self.name} returned a page that is not JSON") from exc
            if not items:
                return
            for item in items:
                yield item
            page = f"b{min(int(item['id']) for item in items)}"

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        if raw.get("is_deleted") or raw.get("is_banned"):
            return None
        variant = choose_variant(raw, min_size)
        if variant is None:
            return None
        url, width, height = variant
        post = Post(
            site=self.name,
            post_id=str(raw["id"]),
            md5=raw.get("md5") or "",
            filename="",
            url=url,
            width=width,
            height=height,
            rating=raw.get("rating") or "",
            score=int(raw.get("score") or 0),
            tags={c: (raw.get(f"tag_string_{c}") or "").split() for c in _CATEGORIES},
        )
        return Candidate(post, url)
