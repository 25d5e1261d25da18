"""A local folder of images, with optional tag sidecar files (``image.png`` + ``image.txt``)."""

from __future__ import annotations

import codecs
import logging
import shutil
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from lorafactory.errors import InputError
from lorafactory.sources.base import IMAGE_SUFFIXES, Post, file_md5

log = logging.getLogger(__name__)


def read_sidecar(sidecar: Path) -> str:
    """A tag file's text: UTF-8 (with or without a BOM) or UTF-16 with its BOM; anything else is refused."""
    data = sidecar.read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"tag file {sidecar} is not UTF-8 or UTF-16 text; save it as UTF-8") from None


def sidecar_tags(image: Path) -> list[str]:
    """Tags from ``image.txt`` (comma- or line-separated), in the tagger's form (underscores)."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return []
    text = read_sidecar(sidecar)
    return ["_".join(tag.split()) for tag in text.replace("\n", ",").split(",") if tag.strip()]


class LocalFolder:
    """A folder's images (its subfolders' too, in name order), and its other files (tag files aside): files of a
    type lorafactory does not read, reported so that none goes missing silently. Hidden files and folders (a
    viewer's thumbnails, macOS's ``._`` files) are not the user's images and are left out."""

    def __init__(self, folder: Path) -> None:
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist; pass an existing folder to --from-dir")
        files = sorted(
            p
            for p in self.root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )
        self.images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.images:
            raise InputError(
                f"image folder {self.root} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or point --from-dir elsewhere"
            )
        self.others = [p for p in files if p.suffix.lower() not in (*IMAGE_SUFFIXES, ".txt")]


def crawl_local(
    folder: LocalFolder, images_dir: Path, limit: int, on_item: Callable[[], None] | None = None, site: str = "local"
) -> tuple[list[Post], dict[str, int]]:
    """Copy readable images (deduplicated by md5) into ``images_dir``, up to ``limit``; returns posts and counts.
    ``on_item`` moves a bar whose total is ``min(limit, images)``: it is called for each image kept, and for each
    file skipped (unreadable, a duplicate) once the folder can no longer reach the limit, so the bar ends full.
    ``site`` labels the posts (``anime`` for a dataset built from episodes)."""
    if folder.others:
        kinds = sorted({p.suffix.lower() or p.name for p in folder.others})
        log.warning(
            "%s: %d files that are not images were left out (%s); images are %s",
            folder.root,
            len(folder.others),
            ", ".join(kinds[:8]) + (", ..." if len(kinds) > 8 else ""),
            " ".join(IMAGE_SUFFIXES),
        )
    posts: list[Post] = []
    seen: set[str] = set()
    counts = {"found": len(folder.images), "unreadable": 0, "duplicate": 0, "not_images": len(folder.others)}

    def skipped(index: int) -> None:
        if on_item and len(posts) + len(folder.images) - index - 1 < limit:  # the files left cannot reach the limit
            on_item()

    for index, path in enumerate(folder.images):
        if len(posts) >= limit:
            break
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s: %s", path.name, exc)
            counts["unreadable"] += 1
            skipped(index)
            continue
        md5 = file_md5(path)
        if md5 in seen:
            counts["duplicate"] += 1
            skipped(index)
            continue
        seen.add(md5)
        name = f"{site}_{len(posts):05d}{path.suffix.lower()}"
        shutil.copyfile(path, images_dir / name)
        posts.append(
            Post(
                site=site,
                post_id=str(path.relative_to(folder.root)),
                md5=md5,
                filename=name,
                width=width,
                height=height,
                tags={"general": sidecar_tags(path)},
            )
        )
        if on_item:
            on_item()
    counts["kept"] = len(posts)
    return posts, counts
