"""Zerochan: ``/<Tag+Name>?json&p=N&l=…`` lists, ``/<id>?json`` items.

Zerochan's rules: a User-Agent naming the project and a Zerochan username, and at most 60
requests a minute (the default rate of one per second). Tag URLs may redirect to the canonical
tag; its JSON sometimes holds raw control characters, which are stripped before parsing. The
list has no file URLs, so each kept post costs one item request.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator
from urllib.parse import quote

from lorafactory.errors import StageError
from lorafactory.sources.base import Candidate, Post, SiteAdapter, smallest_fit

_CONTROL = re.compile(rb"[\x00-\x1f]")


def tag_path(tag: str) -> str:
    """``'Surtr (Arknights)'`` -> ``'Surtr+%28Arknights%29'``."""
    return quote(tag.strip(), safe="").replace("%20", "+")


class Zerochan(SiteAdapter):
    max_page_size = 250

    @staticmethod
    def tag_for(name: str) -> str:
        return name.strip()

    async def _json(self, path: str, params: dict) -> Any:
        response = await self.client.get(f"{self.base_url}/{path}", params=params)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise StageError(f"{self.name} request failed with HTTP {response.status_code}")
        try:
            return json.loads(_CONTROL.sub(b"", response.content))
        except ValueError as exc:
            raise StageError(f"{self.name} returned a page that is not JSON") from exc

    async def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        """List items, each completed by its item request (which holds the file URLs)."""
        path = ",".join(tag_path(tag) for tag in tags)
        page = 1
        while True:
            listing = await self._json(path, {"json": "", "p": page, "l": self.page_size, "s": "id"})
            if not listing or not listing.get("items"):
                if page == 1 and listing is None:
                    raise StageError(
                        f"{self.name} has no tag {tags[0]!r}; set crawl.zerochan.tags to its exact Zerochan tag"
                    )
                return
            for item in listing["items"]:
                detail = await self._json(str(item["id"]), {"json": ""})
                if detail:
                    yield {**item, **detail}
            if not listing.get("next"):
                return
            page += 1

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        width, height = int(raw.get("width") or 0), int(raw.get("height") or 0)
        long_side = max(width, height) or 1

        def scaled(side: int) -> tuple[int, int]:
            factor = min(1.0, side / long_side)
            return int(width * factor), int(height * factor)

        variants = [(raw.get("large") or "", *scaled(1200)), (raw.get("full") or "", width, height)]
        chosen = smallest_fit(variants, min_size)
        if chosen is None:
            return None
        url, w, h = chosen
        post = Post(
            site=self.name,
            post_id=str(raw["id"]),
            md5=raw.get("md5") or raw.get("hash") or "",
            filename="",
            url=url,
            width=w,
            height=h,
            tags={"general": list(raw.get("tags") or [])},
        )
        return Candidate(post, url)
