"""Gelbooru and the "dapi" family (rule34-like sites): ``index.php?page=dapi&s=post&q=index&json=1``.

Paging is keyset from the start (``id:<lowest id seen>`` with ``pid=0``), which never meets the
deep-paging cap of about 20,000 results. Gelbooru itself requires ``api_key`` and the numeric
``user_id`` since June 2025 (``LORAFACTORY_GELBOORU_USER_ID`` / ``..._API_KEY``).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from lorafactory.sources.base import Candidate, SiteAdapter, booru_candidate, smallest_fit
from lorafactory.sources.danbooru import character_tag
from lorafactory.sources.http import keyset

RATINGS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}


class Gelbooru(SiteAdapter):
    max_page_size = 100

    def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        refusal = (
            f"set LORAFACTORY_{self.name.upper()}_USER_ID and LORAFACTORY_{self.name.upper()}_API_KEY "
            "(the numeric user id and API key from your account settings)"
        )

        async def page(below: int | None) -> list[dict]:
            query = tags + ([f"id:<{below}"] if below is not None else [])
            params = {
                "page": "dapi",
                "s": "post",
                "q": "index",
                "json": "1",
                "tags": " ".join(query),
                "limit": self.page_size,
                "pid": 0,
            }
            if self.auth:
                params.update({"user_id": self.auth[0], "api_key": self.auth[1]})
            body = await self.client.get_json(f"{self.base_url}/index.php", params, {401: refusal, 403: refusal})
            return body.get("post") or []  # no "post" key at all on an empty page

        return keyset(page)

    async def character_tags(self, name: str) -> list[tuple[str, int]]:
        """Character tags (type 4) containing the name, through the dapi tag index."""
        params = {
            "page": "dapi",
            "s": "tag",
            "q": "index",
            "json": "1",
            "name_pattern": f"%{character_tag(name)}%",
            "limit": 100,
        }
        if self.auth:
            params.update({"user_id": self.auth[0], "api_key": self.auth[1]})
        found = (await self.client.get_json(f"{self.base_url}/index.php", params)).get("tag") or []
        return [(item["name"], int(item.get("count") or 0)) for item in found if int(item.get("type", -1)) == 4]

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        variants = [
            (raw.get("file_url") or "", int(raw.get("width") or 0), int(raw.get("height") or 0)),
            (raw.get("sample_url") or "", int(raw.get("sample_width") or 0), int(raw.get("sample_height") or 0)),
        ]
        chosen = smallest_fit(variants, min_size)
        if chosen is None or raw.get("status") == "deleted":
            return None
        rating = RATINGS.get(raw.get("rating", ""), raw.get("rating") or "")
        return booru_candidate(self.name, raw, chosen, {"general": (raw.get("tags") or "").split()}, rating)
