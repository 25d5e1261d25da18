"""Danbooru and sites on its software (safebooru.donmai.us): ``/posts.json`` search with keyset
paging (``page=b<id>``), which goes past the 1000-page cap, and the smallest big-enough variant."""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

from lorafactory.sources.base import Candidate, SiteAdapter, booru_candidate, smallest_fit
from lorafactory.sources.http import keyset

_CATEGORIES = ("general", "character", "copyright", "artist", "meta")


def character_tag(name: str) -> str:
    """Danbooru style: ``'Surtr (Arknights)'`` -> ``'surtr_(arknights)'``."""
    return "_".join(name.strip().lower().split())


def copyright_of(tag: str) -> str | None:
    """The copyright a character tag names in its last qualifier: ``'surtr_(arknights)'`` -> ``'arknights'``,
    ``'hatsune_miku'`` -> None. Danbooru-style sites qualify most character tags this way."""
    found = re.search(r"_\(([^()]+)\)$", tag.strip())
    return found[1] if found else None


def choose_variant(raw: dict[str, Any], min_size: int) -> tuple[str, int, int] | None:
    """The smallest variant whose sides are both at least ``min_size``, else the largest one."""
    variants = [
        (v["url"], int(v.get("width", 0)), int(v.get("height", 0)))
        for v in (raw.get("media_asset") or {}).get("variants") or []
        if v.get("url") and v.get("type") not in ("180x180", "360x360", "720x720")
    ]
    if raw.get("file_url"):
        variants.append((raw["file_url"], int(raw.get("image_width", 0)), int(raw.get("image_height", 0))))
    return smallest_fit(variants, min_size)


class Danbooru(SiteAdapter):
    def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        """Raw posts, newest first; keyset paging (``page=b<id>``) goes past the 1000-page cap."""

        async def page(below: int | None) -> list[dict]:
            params = {
                "tags": " ".join(tags),
                "limit": self.page_size,
                "page": f"b{below}" if below is not None else "1",
            }
            if self.auth:
                params.update({"login": self.auth[0], "api_key": self.auth[1]})
            return await self.client.get_json(f"{self.base_url}/posts.json", params)

        return keyset(page)

    async def character_tags(self, name: str) -> list[tuple[str, int]]:
        """Character tags (category 4) for the name: the site's autocomplete (which follows tag
        aliases), else wiki pages listing the name among their other names (e.g. a Japanese name)."""
        params = {"search[query]": character_tag(name), "search[type]": "tag_query", "limit": 10}
        found = await self.client.get_json(f"{self.base_url}/autocomplete.json", params)
        tags = [
            (item["value"], int(item.get("post_count") or 0)) for item in found if int(item.get("category", -1)) == 4
        ]
        if tags:
            return tags
        pages = await self.client.get_json(
            f"{self.base_url}/wiki_pages.json", {"search[other_names_match]": name.strip(), "limit": 10}
        )
        titles = [page["title"] for page in pages if page.get("title")]
        if not titles:
            return []
        params = {"search[name_comma]": ",".join(titles), "search[category]": 4, "limit": len(titles)}
        return [
            (tag["name"], int(tag.get("post_count") or 0))
            for tag in await self.client.get_json(f"{self.base_url}/tags.json", params)
        ]

    async def characters_of(self, copyright_tag: str, top: int) -> list[tuple[str, int]]:
        """The copyright's character tags with their post counts, most posts first (at most ``top``,
        1000 at most). Danbooru qualifies a character's tag with its copyright (``surtr_(arknights)``),
        so these are the character tags (category 4) named ``*_(<copyright>)``."""
        params: dict[str, Any] = {
            "search[name_matches]": f"*_({copyright_tag})",
            "search[category]": 4,
            "search[order]": "count",
            "limit": min(top, 1000),
        }
        if self.auth:
            params.update({"login": self.auth[0], "api_key": self.auth[1]})
        found = await self.client.get_json(f"{self.base_url}/tags.json", params)
        counted = [(tag["name"], int(tag.get("post_count") or 0)) for tag in found]
        return sorted((item for item in counted if item[1] > 0), key=lambda item: -item[1])[:top]

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        if raw.get("is_deleted") or raw.get("is_banned"):
            return None
        variant = choose_variant(raw, min_size)
        if variant is None:
            return None
        return booru_candidate(
            self.name, raw, variant, {c: (raw.get(f"tag_string_{c}") or "").split() for c in _CATEGORIES}
        )
