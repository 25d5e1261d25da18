"""Sankaku through its v2 API: ``/v2/posts/keyset?lang=en&limit=…&tags=…&next=<cursor>``.

Paging follows the ``meta.next`` cursor. Post ids are strings; tags come with types (4 =
character). File URLs are signed and expire (an expired one redirects to ``expired.png``, which
the download refuses). Anonymous clients get no file URL for contentious posts; with
``LORAFACTORY_SANKAKU_LOGIN`` and ``..._PASSWORD`` the crawler logs in for a Bearer token.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from lorafactory.sources.base import Candidate, SiteAdapter, booru_candidate, smallest_fit
from lorafactory.sources.danbooru import character_tag


class Sankaku(SiteAdapter):
    max_page_size = 100
    headers = {"Accept": "application/vnd.sankaku.api+json;v=2"}

    async def character_tags(self, name: str) -> list[tuple[str, int]]:
        """Character tags (type 4) starting with the name, from ``/tags``."""
        found = await self.client.get_json(
            f"{self.base_url}/tags", {"lang": "en", "name": f"{character_tag(name)}*", "limit": 20}
        )
        items = found if isinstance(found, list) else found.get("data") or []
        return [(tag["name"], int(tag.get("post_count") or 0)) for tag in items if int(tag.get("type", -1)) == 4]

    async def _login(self) -> None:
        """``POST /auth/token`` with login and password; the Bearer token then goes with every request."""
        failure = "check LORAFACTORY_SANKAKU_LOGIN and _PASSWORD"
        await self.client.login(
            f"{self.base_url}/auth/token", failure, json={"login": self.auth[0], "password": self.auth[1]}
        )

    async def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        if self.auth:
            await self._login()
        cursor: str | None = None
        while True:
            params = {
                "lang": "en",
                "limit": self.page_size,
                "tags": " ".join(tags),
                **({"next": cursor} if cursor else {}),
            }
            page = await self.client.get_json(f"{self.base_url}/v2/posts/keyset", params)
            for item in page.get("data") or []:
                yield item
            cursor = (page.get("meta") or {}).get("next")
            if not cursor or not page.get("data"):
                return

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        variants = [
            (raw.get("sample_url") or "", int(raw.get("sample_width") or 0), int(raw.get("sample_height") or 0)),
            (raw.get("file_url") or "", int(raw.get("width") or 0), int(raw.get("height") or 0)),
        ]
        chosen = smallest_fit(variants, min_size)
        if chosen is None:
            return None
        by_type: dict[str, list[str]] = {"general": [], "character": []}
        for tag in raw.get("tags") or []:
            by_type["character" if int(tag.get("type", 0)) == 4 else "general"].append(tag["name"])
        return booru_candidate(self.name, raw, chosen, by_type, score_key="total_score")
