"""Which characters a game or show has, from an image site's own tag data, most popular first.

The reference filled its queue this way (every character of a game, by post count). Danbooru's
software (danbooru, safebooru) has the tag listing it takes.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import httpx

from lorafactory.config import Settings
from lorafactory.errors import ConfigError, InputError
from lorafactory.sources.crawl import site_credentials
from lorafactory.sources.danbooru import Danbooru, character_tag
from lorafactory.sources.http import RateLimit, SiteClient

CATALOG_SITES = ("danbooru", "safebooru")


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # the character's name as lorafactory uses it, e.g. "Surtr (Arknights)"
    tag: str  # the site's tag, e.g. "surtr_(arknights)"
    post_count: int


def name_for(tag: str) -> str:
    """``'texas_the_omertosa_(arknights)'`` -> ``'Texas the Omertosa (Arknights)'``: words capitalised
    as a name is, small joining words kept lower (``character_tag`` gives the tag back)."""
    words = tag.replace("_", " ").split()
    small = {"the", "of", "and", "no", "de", "von", "van"}
    shown = [
        w if (i and w in small) else re.sub(r"^([^a-z]*)([a-z])", lambda m: m[1] + m[2].upper(), w)
        for i, w in enumerate(words)
    ]
    return " ".join(shown)


def copyright_characters(settings: Settings, copyright: str, top: int, site: str = "danbooru") -> list[CatalogEntry]:
    """The ``top`` most-posted characters of ``copyright`` (a game or show) on ``site``."""
    if site not in CATALOG_SITES:
        raise ConfigError(
            f"--copyright reads the character list from {' or '.join(CATALOG_SITES)}'s tag data, not {site}; "
            "pass --site danbooru"
        )
    c = settings.crawl
    site_settings = getattr(c, site)
    auth = site_credentials(site, site_settings)

    async def fetch() -> list[tuple[str, int]]:
        headers = {"User-Agent": c.user_agent}
        async with httpx.AsyncClient(headers=headers, timeout=c.timeout_s, follow_redirects=True) as http:
            limit = RateLimit(site_settings.requests_per_second, site_settings.concurrency)
            client = SiteClient(site, http, limit, c.max_retries, auth[1:] if auth else ())
            listing = Danbooru(client, site_settings.base_url, c.page_size, name=site, auth=auth)
            return await listing.characters_of(character_tag(copyright), top)

    found = asyncio.run(fetch())
    if not found:
        raise InputError(
            f"{site} lists no character tagged *_({character_tag(copyright)}); "
            "check the copyright's tag on the site (e.g. blue_archive, genshin_impact)"
        )
    return [CatalogEntry(name_for(tag), tag, count) for tag, count in found]
