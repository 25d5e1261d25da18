"""Moebooru sites (yande.re, konachan): ``/post.json`` with keyset paging via ``id:<N``.

Each post offers ``file``, ``jpeg`` and ``sample`` variants; the smallest one big enough is fetched.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from lorafactory.sources.base import Candidate, SiteAdapter, booru_candidate, smallest_fit
from lorafactory.sources.danbooru import character_tag
from lorafactory.sources.http import keyset


class Moebooru(SiteAdapter):
    max_page_size = 100

    def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        async def page(below: int | None) -> list[dict]:
            query = tags + ([f"id:<{below}"] if below is not None else [])
            params = {"tags": " ".join(query), "limit": self.page_size, "page": 1}
            if self.auth:
                params.update({"login": self.auth[0], "password_hash": self.auth[1]})
            return await self.client.get_json(f"{self.base_url}/post.json", params)

        return keyset(page)

    async def character_tags(self, name: str) -> list[tuple[str, int]]:
        """Character tags (type 4) containing the name, most posted first, through ``/tag.json``."""
        found = await self.client.get_json(
            f"{self.base_url}/tag.json", {"name": character_tag(name), "order": "count", "limit": 20}
        )
        return [(item["name"], int(item.get("count") or 0)) for item in found if int(item.get("type", -1)) == 4]

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        if raw.get("status") == "deleted":
            return None
        variants = [
            (
                raw.get(f"{kind}_url") or "",
                int(raw.get(f"{kind}_width" if kind != "file" else "width") or 0),
                int(raw.get(f"{kind}_height" if kind != "file" else "height") or 0),
            )
            for kind in ("sample", "jpeg", "file")
        ]
        chosen = smallest_fit(variants, min_size)
        if chosen is None:
            return None
        return booru_candidate(self.name, raw, chosen, {"general": (raw.get("tags") or "").split()})
