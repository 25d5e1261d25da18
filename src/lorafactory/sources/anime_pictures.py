"""Anime-Pictures through its JSON API: ``/api/v3/posts?page=N&search_tag=…`` lists (pages from 0,
with ``max_pages``), ``/api/v3/posts/<id>`` details (tags and the file name), and the file from
``/pictures/download_image/<file name>``. Tags are lowercase with spaces: ``surtr (arknights)``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator
from urllib.parse import quote

from lorafactory.sources.base import Candidate, Post, SiteAdapter

RATINGS = {0: "g", 1: "s", 2: "q", 3: "e"}


class AnimePictures(SiteAdapter):
    @staticmethod
    def tag_for(name: str) -> str:
        return " ".join(name.strip().lower().split())

    async def character_tags(self, name: str) -> list[tuple[str, int]]:
        """Tags containing the name from ``/api/v3/tags`` (its tag type for characters is 1), by post count."""
        found = await self.client.get_json(
            f"{self.base_url}/api/v3/tags", {"tag:smart_like": self.tag_for(name), "lang": "en", "limit": 20}
        )
        return [
            (tag["tag"], int(tag.get("num") or 0)) for tag in found.get("tags") or [] if int(tag.get("type", -1)) == 1
        ]

    async def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        """List entries completed by their detail request (tags and the file name)."""
        page = 0
        while True:
            params = {"page": page, "search_tag": "&&".join(tags), "order_by": "date", "lang": "en"}
            listing = await self.client.get_json(f"{self.base_url}/api/v3/posts", params)
            items = listing.get("posts") or []
            for item in items:
                detail = await self.client.get_json(f"{self.base_url}/api/v3/posts/{item['id']}", {"lang": "en"})
                yield {
                    **item,
                    "tags": [t["tag"]["tag"] for t in detail.get("tags") or []],
                    "file_url": detail.get("file_url") or "",
                }
            page += 1
            if not items or page >= int(listing.get("max_pages") or 0):
                return

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        if not raw.get("file_url"):
            return None
        url = f"{self.base_url}/pictures/download_image/{quote(raw['file_url'])}"
        post = Post(
            site=self.name,
            post_id=str(raw["id"]),
            md5=raw.get("md5") or "",
            filename="",
            url=url,
            width=int(raw.get("width") or 0),
            height=int(raw.get("height") or 0),
            rating=RATINGS.get(raw.get("erotics"), ""),
            score=int(raw.get("score_number") or 0),
            tags={"general": list(raw["tags"])},
        )
        return Candidate(post, url)
