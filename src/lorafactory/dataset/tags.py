"""Tag statistics, core tags and captions."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence


def core_tags(tag_lists: Sequence[Sequence[str]], ratio: float, is_trait: Callable[[str], bool]) -> list[str]:
    """Character-trait tags present in at least ``ratio`` of the images, most frequent first."""
    if not tag_lists:
        return []
    counts = Counter(tag for tags in tag_lists for tag in set(tags))
    needed = ratio * len(tag_lists)
    return [tag for tag, n in counts.most_common() if n >= needed and is_trait(tag)]


def prompt_tag(tag: str) -> str:
    """Danbooru tag to prompt text: spaces for underscores, escaped parentheses."""
    return tag.replace("_", " ").replace("(", "\\(").replace(")", "\\)")


def caption(trigger: str | None, tags: Sequence[str]) -> str:
    """Trigger first; generic (regularization) images have none."""
    return ", ".join([*([trigger] if trigger else []), *tags])
