"""The crawl stage: fetch raw images and their metadata into ``<artifact>/images`` + ``posts.jsonl``.

Sites are crawled concurrently through one async client, each under its own rate limit. Every
download is recorded in the download archive (the state store) once its file has landed, so a
rerun, after a kill or with a higher limit, fetches only posts it does not have yet. Images are
deduplicated by md5 across sites; a site that fails or blocks does not stop the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urljoin

import httpx

from lorafactory.config import FOLDER_SOURCES, Settings
from lorafactory.errors import InputError, StageError
from lorafactory.progress import Progress
from lorafactory.sources.anime_pictures import AnimePictures
from lorafactory.sources.base import Candidate, Post, Site, SiteAdapter, file_md5
from lorafactory.sources.danbooru import Danbooru, character_tag
from lorafactory.sources.gelbooru import Gelbooru
from lorafactory.sources.http import RateLimit, SharedBudget, SiteClient, StorageFull
from lorafactory.sources.local import LocalFolder, crawl_local
from lorafactory.sources.moebooru import Moebooru
from lorafactory.sources.pixiv import Pixiv
from lorafactory.sources.sankaku import Sankaku
from lorafactory.sources.zerochan import Zerochan

log = logging.getLogger(__name__)


class Archive(Protocol):
    """What a crawl remembers across runs: the posts downloaded and the tag chosen on each site."""

    def archived(self) -> dict[tuple[str, str], dict]: ...

    def record(self, post: Post) -> None: ...

    def site_tag(self, site: str, name: str) -> tuple[str, int] | None: ...

    def remember_site_tag(self, site: str, name: str, tag: str, post_count: int) -> None: ...


@dataclass
class StoreArchive:
    """The download archive of one collection (a character, or a shared set) in the state store."""

    store: object  # lorafactory.state.Store
    collection: str

    def archived(self) -> dict[tuple[str, str], dict]:
        return self.store.archived(self.collection)

    def record(self, post: Post) -> None:
        self.store.archive(
            self.collection, post.site, post.post_id, post.md5, post.filename, post.model_dump(mode="json")
        )

    def site_tag(self, site: str, name: str) -> tuple[str, int] | None:
        return self.store.site_tag(site, name)

    def remember_site_tag(self, site: str, name: str, tag: str, post_count: int) -> None:
        self.store.remember_site_tag(site, name, tag, post_count)


@dataclass
class MemoryArchive:
    """An archive that lives only as long as the run (library use without a state store)."""

    posts: dict[tuple[str, str], dict] = field(default_factory=dict)
    tags: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def archived(self) -> dict[tuple[str, str], dict]:
        return dict(self.posts)

    def record(self, post: Post) -> None:
        self.posts[(post.site, post.post_id)] = post.model_dump(mode="json")

    def site_tag(self, site: str, name: str) -> tuple[str, int] | None:
        return self.tags.get((site, name))

    def remember_site_tag(self, site: str, name: str, tag: str, post_count: int) -> None:
        self.tags[(site, name)] = (tag, post_count)


# site -> (API class, the two credential variables after LORAFACTORY_<SITE>_)
SITES: dict[str, tuple[type[SiteAdapter], tuple[str, str]]] = {
    "danbooru": (Danbooru, ("LOGIN", "API_KEY")),
    "safebooru": (Danbooru, ("LOGIN", "API_KEY")),
    "gelbooru": (Gelbooru, ("USER_ID", "API_KEY")),
    "rule34": (Gelbooru, ("USER_ID", "API_KEY")),  # the same "dapi" software
    "yandere": (Moebooru, ("LOGIN", "PASSWORD_HASH")),
    "konachan": (Moebooru, ("LOGIN", "PASSWORD_HASH")),
    "zerochan": (Zerochan, ("LOGIN", "PASSWORD")),  # unused for now: anonymous listing only
    "anime_pictures": (AnimePictures, ("LOGIN", "PASSWORD")),  # likewise
    "sankaku": (Sankaku, ("LOGIN", "PASSWORD")),
    "pixiv": (Pixiv, ("LOGIN", "PASSWORD")),  # unused: pixiv reads its OAuth variables itself
}


def site_credentials(site: str, configured) -> tuple[str, str] | None:
    """The site's two credentials: the environment's variables, else the config's ``user``/``key``."""
    names = [f"LORAFACTORY_{site.upper()}_{part}" for part in SITES[site][1]]
    values = [os.environ.get(name) for name in names]
    if not any(values):
        values = [secret.get_secret_value() if secret else None for secret in (configured.user, configured.key)]
    if any(values) and not all(values):
        raise InputError(f"set both {names[0]} and {names[1]} (or crawl.{site}.user and .key), or neither")
    return (values[0], values[1]) if all(values) else None


class _SiteCrawl:
    """Shared state of one crawl over several sites."""

    def __init__(
        self,
        settings: Settings,
        images_dir: Path,
        archive: Archive,
        previous: Path | None,
        on_item: Callable[[], None],
        budget: SharedBudget | None = None,
    ) -> None:
        self.settings, self.images_dir, self.archive, self.previous, self.on_item = (
            settings,
            images_dir,
            archive,
            previous,
            on_item,
        )
        self.budget = budget
        self.done = archive.archived()
        self.done_by_md5 = {post["md5"]: post for post in self.done.values() if post.get("md5")}
        self.kept: list[tuple[int, int, Post]] = []  # (site order, search order, post) as fetched
        self.reserved = 0
        self.pending: set[asyncio.Task] = set()  # downloads in flight, all sites together
        self.seen_md5: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.chosen: dict[str, str] = {}  # site -> the tag the lookup chose

    @property
    def full(self) -> bool:
        return self.reserved >= self.settings.crawl.limit

    async def run_site(self, order: int, name: str, http: httpx.AsyncClient) -> None:
        c = self.settings.crawl
        site_settings = getattr(c, name)
        auth = site_credentials(name, site_settings)
        headers = {}
        if name == "zerochan":  # Zerochan's rule: the User-Agent names the project and a Zerochan user
            if not site_settings.username:
                raise InputError(
                    "zerochan requires your Zerochan username in the User-Agent; set crawl.zerochan.username"
                )
            headers["User-Agent"] = f"{c.user_agent} - {site_settings.username}"
        limit = RateLimit(site_settings.requests_per_second, site_settings.concurrency, name, self.budget)
        client = SiteClient(
            name, http, limit, c.max_retries, auth[1:] if auth else (), headers
        )  # the key, not the login
        site = SITES[name][0](client, site_settings.base_url, c.page_size, name=name, auth=auth)
        tags = site_settings.tags or c.tags or [await self.character_tag(site, name)]
        index = 0
        async for raw in site.posts(tags):
            await self._wait_for_room()
            if self.full:
                break
            self.counts["found"] += 1
            candidate = site.candidate(raw, c.min_size)
            if candidate is None:
                self.counts["no_file"] += 1
                continue
            md5 = candidate.post.md5
            if md5 and md5 in self.seen_md5:
                self.counts["duplicate"] += 1
                continue
            self.seen_md5.add(md5)
            self.reserved += 1
            # some sites send relative or protocol-relative file URLs
            candidate = replace(candidate, url=urljoin(site_settings.base_url.rstrip("/") + "/", candidate.url))
            self.pending.add(asyncio.create_task(self.fetch(client, candidate, (order, index))))
            index += 1
        await self._wait_for_room(until_idle=True)

    async def _wait_for_room(self, until_idle: bool = False) -> None:
        """While the limit is reserved, wait for downloads to finish: a failed one frees its place, so
        listing goes on until the limit is met or the site is exhausted (``until_idle``: wait for all)."""
        while self.pending and (self.full or until_idle):
            done, _ = await asyncio.wait(set(self.pending), return_when=asyncio.FIRST_COMPLETED)
            self.pending -= done  # the set is shared by the sites' loops: remove, never reassign
            for task in done:
                task.result()  # a download error that stops the crawl (a full disk) surfaces here

    async def character_tag(self, site: Site, name: str) -> str:
        """The site's tag for the character: remembered, else the most-posted character tag its own
        lookup finds, else the name in the site's tag style."""
        character = self.settings.character.name
        known = self.archive.site_tag(name, character)
        if known is None and hasattr(site, "character_tags"):
            found = await site.character_tags(character)
            if found:
                known = max(found, key=lambda item: item[1])
                self.archive.remember_site_tag(name, character, *known)
        if known is None:
            fallback = getattr(site, "tag_for", character_tag)(character)
            if hasattr(site, "character_tags"):
                log.warning(
                    "%s: no character tag found for %r; searching %r (set crawl.%s.tags to choose)",
                    name,
                    character,
                    fallback,
                    name,
                )
            return fallback
        log.info("%s: using tag %r (%d posts)", name, known[0], known[1])
        self.chosen[name] = known[0]
        return known[0]

    async def fetch(self, client: SiteClient, candidate: Candidate, order: tuple[int, int]) -> None:
        post = candidate.post
        suffix = Path(candidate.url.split("?")[0]).suffix.lower() or ".jpg"
        post = post.model_copy(update={"filename": f"{post.site}_{post.post_id}{suffix}"})
        archived = self.done.get((post.site, post.post_id)) or self.done_by_md5.get(post.md5)
        if archived is not None and self._reuse(self.images_dir / archived["filename"]):
            post = Post.model_validate(archived)  # the copy already fetched, from whichever site
            self.counts["from_archive"] += 1
        elif self._landed(self.images_dir / post.filename, candidate.md5):  # killed before it was recorded
            self.archive.record(post)
            self.counts["from_archive"] += 1
        else:
            target = self.images_dir / post.filename
            try:
                await client.download(candidate.url, target, candidate.md5)
            except StorageFull:
                raise
            except StageError as exc:
                log.warning("skipping %s post %s: %s", post.site, post.post_id, exc)
                self.counts["failed"] += 1
                self.reserved -= 1
                return
            if not post.md5:  # the site gives none (pixiv): hash the file, and drop it if another site had it
                post = post.model_copy(update={"md5": file_md5(target)})
                if post.md5 in self.seen_md5:
                    target.unlink()
                    self.counts["duplicate"] += 1
                    self.reserved -= 1
                    return
                self.seen_md5.add(post.md5)
            self.archive.record(post)
            self.counts["downloaded"] += 1
        self.kept.append((*order, post))
        self.on_item()

    @staticmethod
    def _landed(target: Path, md5: str) -> bool:
        """A file a killed run had finished (downloads land whole, by rename), checked against the site's md5."""
        return bool(md5) and target.is_file() and file_md5(target) == md5

    def _reuse(self, target: Path) -> bool:
        """An archived post's file, from this (resumed) folder or the previous finished crawl."""
        if target.is_file():
            return True
        if self.previous is not None and (self.previous / target.name).is_file():
            shutil.copyfile(self.previous / target.name, target)
            return True
        return False


async def _crawl_sites(crawl_state: _SiteCrawl) -> None:
    c = crawl_state.settings.crawl
    async with httpx.AsyncClient(
        headers={"User-Agent": c.user_agent}, timeout=c.timeout_s, follow_redirects=True
    ) as http:
        results = await asyncio.gather(
            *(crawl_state.run_site(i, name, http) for i, name in enumerate(c.sites)), return_exceptions=True
        )
    errors = []
    for name, result in zip(c.sites, results):
        if isinstance(result, BaseException):
            if not isinstance(result, StageError) or isinstance(result, StorageFull):
                raise result
            log.warning("%s stopped: %s", name, result)
            crawl_state.counts[f"{name}_failed"] = 1
            errors.append(result)
    if errors and len(errors) == len(c.sites) and not crawl_state.kept:
        raise errors[0]


def _order(sites: list[str], post: Post) -> tuple:
    """A stable order for any run that keeps the same posts: by site, then newest first."""
    key = (-int(post.post_id), "") if post.post_id.isdigit() else (0, post.post_id)
    return (sites.index(post.site) if post.site in sites else len(sites), *key)


def crawl(
    settings: Settings,
    out_dir: Path,
    progress: Progress,
    archive: Archive | None = None,
    previous: Path | None = None,
    budget: SharedBudget | None = None,
) -> tuple[list[Post], dict[str, int]]:
    """Fetch into ``out_dir``; ``previous`` is the last finished crawl's images folder, reused for archived
    posts. With a shared ``budget`` each site's request rate is shared with other crawls (a fleet's)."""
    c = settings.crawl
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    where = c.from_dir if c.source in FOLDER_SOURCES else ", ".join(c.sites)
    folder = None
    if c.source == "anime" and not Path(c.from_dir or "").is_dir():
        raise InputError(
            f"the anime dataset of {settings.character.name!r} is gone ({c.from_dir or 'none set'}); "
            "run `lorafactory anime SHOW` again to rebuild it"
        )
    if c.source in FOLDER_SOURCES:
        if not c.from_dir:
            raise InputError("crawl.source is 'local' but no folder was given; pass --from-dir DIR")
        folder = LocalFolder(Path(c.from_dir))
    total = min(c.limit, len(folder.images)) if folder else c.limit  # images kept, as far as the source can give
    with progress.task(f"crawling {where}", total=total) as task:
        if folder is not None:
            posts, counts = crawl_local(folder, images_dir, c.limit, task.advance, c.source)
        else:
            state = _SiteCrawl(settings, images_dir, archive or MemoryArchive(), previous, task.advance, budget)
            asyncio.run(_crawl_sites(state))
            posts = sorted((post for *_, post in state.kept), key=lambda post: _order(c.sites, post))
            counts = {**state.counts, "kept": len(posts), **({"tags": state.chosen} if state.chosen else {})}
        task.complete()  # sites with fewer posts than the limit: the bar ends full at what they had
    if not posts:
        where = (
            c.from_dir
            if c.source in FOLDER_SOURCES
            else f"{', '.join(c.sites)} with tags {c.tags or [character_tag(settings.character.name)]}"
        )
        raise InputError(f"no usable images found in {where}; check the name, --site/--from-dir, or crawl.tags")
    with (out_dir / "posts.jsonl").open("w", encoding="utf-8") as handle:
        for post in posts:
            handle.write(post.model_dump_json() + "\n")
    return posts, counts


def read_posts(raw_dir: Path) -> list[Post]:
    with (raw_dir / "posts.jsonl").open(encoding="utf-8") as handle:
        return [Post.model_validate(json.loads(line)) for line in handle if line.strip()]
