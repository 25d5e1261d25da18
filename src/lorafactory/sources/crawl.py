"""The crawl stage: fetch raw images and their metadata into ``<artifact>/images`` + ``posts.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from lorafactory.config import Settings
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.sources.base import Post
from lorafactory.sources.danbooru import DanbooruSource, character_tag
from lorafactory.sources.http import PoliteClient
from lorafactory.sources.local import crawl_local


def crawl(settings: Settings, out_dir: Path, progress: Progress) -> tuple[list[Post], dict[str, int]]:
    c = settings.crawl
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    with progress.task(f"crawling {c.source}", total=c.limit) as task:
        if c.source == "local":
            if not c.from_dir:
                raise InputError("crawl.source is 'local' but no folder was given; pass --from-dir DIR")
            posts, counts = crawl_local(Path(c.from_dir), images_dir, c.limit, on_item=task.advance)
        else:
            tags = c.tags or [character_tag(settings.character.name)]
            with PoliteClient(c.user_agent, c.timeout_s, c.max_retries, c.request_interval_s) as client:
                source = DanbooruSource(client, c.danbooru_url, c.page_size)
                posts, counts = source.crawl(tags, images_dir, c.limit, c.min_size, on_item=task.advance)
    if not posts:
        where = c.from_dir if c.source == "local" else f"{c.source} tags {c.tags or [character_tag(settings.character.name)]}"
        raise InputError(f"no usable images found in {where}; check the name, --site/--from-dir, or crawl.tags")
    with (out_dir / "posts.jsonl").open("w", encoding="utf-8") as handle:
        for post in posts:
            handle.write(post.model_dump_json() + "\n")
    return posts, counts


def read_posts(raw_dir: Path) -> list[Post]:
    with (raw_dir / "posts.jsonl").open(encoding="utf-8") as handle:
        return [Post.model_validate(json.loads(line)) for line in handle if line.strip()]
