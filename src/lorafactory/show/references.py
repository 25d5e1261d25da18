"""Candidate names for a show's clusters, and each candidate's reference crops.

Candidates are the user's cast list, or the copyright's most posted characters on an image site
(read once, kept in the show's folder). A candidate's reference set is a small crawl of her images
(through the character's own download archive, so a later full crawl of her reuses it), cut to
solo one-head crops the way episodes are, and turned into CCIP features; it is kept, so naming
again (after editing names.toml) needs no site.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from lorafactory.config import Settings
from lorafactory.errors import InputError, StageError
from lorafactory.progress import Progress
from lorafactory.show.layout import ShowDir
from lorafactory.sources.anime import character_crops
from lorafactory.vision.ccip import FEATURE_DIM, extract_features
from lorafactory.workspace import Workspace, slugify, write_json_atomic

log = logging.getLogger(__name__)
DONE = "references.json"


@dataclass(frozen=True)
class Candidate:
    name: str
    tag: str | None = None  # the site's tag, when the name came from the site's character list
    posts: int = 0


def candidates(
    settings: Settings, show: ShowDir, copyright: str | None, cast: list[str], site: str
) -> list[Candidate]:
    """The names to try: the user's cast, else the copyright's most posted characters on ``site``;
    with neither, the names the show was last given (so naming again needs no site)."""
    saved = show.root / "candidates.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if cast:
        request: dict = {"cast": list(dict.fromkeys(cast))}
    elif copyright:
        request = {"copyright": copyright, "site": site, "top": settings.anime.candidates}
    else:
        return [Candidate(**entry) for entry in previous["candidates"]] if previous else []
    if previous is not None and previous["request"] == request:
        return [Candidate(**entry) for entry in previous["candidates"]]
    if cast:
        found = [Candidate(name) for name in request["cast"]]
    else:
        from lorafactory.sources.catalog import copyright_characters

        listed = copyright_characters(settings, copyright, request["top"], site)
        found = [Candidate(entry.name, entry.tag, entry.post_count) for entry in listed]
    write_json_atomic(saved, {"request": request, "candidates": [asdict(c) for c in found]})
    return found


def reference_features(
    workspace: Workspace, store, settings: Settings, candidate: Candidate, site: str, show: ShowDir, progress: Progress
) -> np.ndarray:
    """[n, 768] CCIP features of the candidate's reference crops (n may be 0); crawled on first use."""
    from lorafactory.sources.crawl import StoreArchive, crawl, read_posts

    folder = show.references / slugify(candidate.name)
    if (folder / DONE).is_file():
        return np.load(folder / "features.npy")
    wanted = settings.anime.references
    query = settings.model_copy(deep=True)
    query.character.name = candidate.name
    query.crawl.source, query.crawl.sites, query.crawl.tags = "sites", [site], []
    query.crawl.limit = wanted * 2  # some are not solo
    slug = slugify(candidate.name)
    if candidate.tag and store is not None:  # crawl exactly the site's tag for her
        store.remember_site_tag(site, candidate.name, candidate.tag, candidate.posts)
    previous = workspace.character(slug).artifact("crawl") / "images"
    crawled = folder / "crawl"
    shutil.rmtree(crawled, ignore_errors=True)
    archive = StoreArchive(store, slug) if store is not None else None
    try:
        crawl(query, crawled, progress, archive, previous if previous.is_dir() else None)
        posts = read_posts(crawled)
    except InputError as exc:  # the site has no images of her: a candidate with no references
        log.warning("%s: no reference images (%s)", candidate.name, exc)
        posts = []
    except StageError as exc:  # the site failed: try again next run
        log.warning("%s: reference images could not be crawled (%s); she is not a name this run", candidate.name, exc)
        return np.zeros((0, FEATURE_DIM), np.float32)
    crops, counts = [], Counter()
    for post in posts:
        try:
            with Image.open(crawled / "images" / post.filename) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError):
            counts["unreadable"] += 1
            continue
        found = character_crops(image, settings, counts, low_detail=False)
        if len(found) == 1:  # solo: a crop of someone else would blur her reference
            crops.append(found[0][1])
        if len(crops) == wanted:
            break
    features = extract_features(crops, settings.vision.ccip_model)
    np.save(folder / "features.npy", features)
    write_json_atomic(folder / DONE, {**asdict(candidate), "images": len(posts), "crops": len(crops), **counts})
    return features
