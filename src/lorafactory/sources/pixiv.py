"""Pixiv through the App API: OAuth refresh token -> access token, then ``/v1/search/illust``.

Pages hold 30 works; ``offset`` may not pass 5000, so deeper searches restart at offset 0 with
``end_date`` set to the oldest date seen. Images need a pixiv ``Referer``. Pixiv gives no md5:
it is computed after the download and duplicates across sites are dropped then. Needs
``LORAFACTORY_PIXIV_REFRESH_TOKEN`` (and the app's ``..._CLIENT_ID`` / ``..._CLIENT_SECRET``).
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator

from lorafactory.errors import InputError, StageError
from lorafactory.sources.base import Candidate, Post, SiteAdapter

MAX_OFFSET = 5000


def _env(name: str) -> str:
    value = os.environ.get(f"LORAFACTORY_PIXIV_{name}", "")
    if not value:
        raise InputError(
            (
                f"pixiv needs LORAFACTORY_PIXIV_{name} (from a one-time "
                "interactive pixiv login); set it or drop --site pixiv"
            )
        )
    return value


class Pixiv(SiteAdapter):
    headers = {"Referer": "https://app-api.pixiv.net/"}

    @property
    def oauth_url(self) -> str:
        return os.environ.get("LORAFACTORY_PIXIV_OAUTH_URL", "https://oauth.secure.pixiv.net")

    @staticmethod
    def tag_for(name: str) -> str:
        return name.strip()

    async def _login(self) -> None:
        refresh, client_id, secret = _env("REFRESH_TOKEN"), _env("CLIENT_ID"), _env("CLIENT_SECRET")
        self.client.add_secrets(refresh, secret)
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": client_id,
            "client_secret": secret,
            "get_secure_url": "1",
        }
        await self.client.login(f"{self.oauth_url}/auth/token", "renew LORAFACTORY_PIXIV_REFRESH_TOKEN", data=form)

    async def posts(self, tags: list[str]) -> AsyncIterator[dict[str, Any]]:
        await self._login()
        offset, end_date, oldest = 0, None, None
        seen: set[int] = set()
        while True:
            params = {
                "word": " ".join(tags),
                "search_target": "partial_match_for_tags",
                "sort": "date_desc",
                "filter": "for_ios",
                "offset": offset,
            }
            if end_date:
                params["end_date"] = end_date
            response = await self.client.get(f"{self.base_url}/v1/search/illust", params=params)
            if response.status_code == 400 and offset > 0 and "offset" in response.text and oldest != end_date:
                offset, end_date = 0, oldest  # the API refuses deeper offsets: move the date window instead
                continue
            if response.status_code != 200:
                raise StageError(
                    f"pixiv search failed with HTTP {response.status_code}: {self.client.redact(response.text[:200])}"
                )
            page = response.json()
            works = page.get("illusts") or []
            for work in works:
                if work["id"] not in seen:  # a new date window starts with the last day again
                    seen.add(work["id"])
                    yield work
            if not works or not page.get("next_url"):
                return
            offset += len(works)
            oldest = works[-1]["create_date"][:10]
            if offset >= MAX_OFFSET and oldest != end_date:
                offset, end_date = 0, oldest

    def candidate(self, raw: dict[str, Any], min_size: int) -> Candidate | None:
        url = (raw.get("meta_single_page") or {}).get("original_image_url") or (raw.get("image_urls") or {}).get(
            "large"
        )
        if not url or raw.get("type", "illust") != "illust":
            return None
        post = Post(
            site=self.name,
            post_id=str(raw["id"]),
            md5="",
            filename="",
            url=url,
            width=int(raw.get("width") or 0),
            height=int(raw.get("height") or 0),
            rating="e" if raw.get("x_restrict") else "g",
            score=int(raw.get("total_bookmarks") or 0),
            tags={"general": [t["name"] for t in raw.get("tags") or []]},
        )
        return Candidate(post, url)
