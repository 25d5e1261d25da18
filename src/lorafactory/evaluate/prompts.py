"""The evaluation prompt suite: a built-in set modelled on the reference pipeline's, outfit-cluster
prompts from the dataset, and the user's own prompts; every checkpoint renders the same images.

Built-in groups (images per checkpoint in brackets): framing, outfits (with the bikini prompt on a
starry beach), poses and expressions; an nsfw group that is off by default; a male variant used
when most of the dataset is tagged ``1boy``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from lorafactory.config import EvaluateSettings, PromptSpec
from lorafactory.dataset.clusters import outfit_clusters
from lorafactory.errors import ConfigError
from lorafactory.vision.tagging import is_character_trait

UNSPECIFIC_TAGS = frozenset({"1girl", "1boy", "solo"})  # on nearly every image: no outfit in them

BIKINI = (
    "night, starry sky, beach, beautiful detailed sky, extremely detailed "
    "background, standing, looking at viewer, bikini, light smile"
)

FEMALE: list[tuple[str, str, int]] = [
    ("portrait", "portrait, looking at viewer", 3),
    ("full_body", "full body, standing, looking at viewer", 2),
    ("profile", "profile, from side, upper body", 2),
    ("free", "", 2),
    ("shorts", "shorts, t-shirt, outdoors", 1),
    ("maid", "maid, maid headdress, maid apron, long sleeves, indoors", 2),
    ("miko", "miko, japanese clothes, red hakama, shrine", 1),
    ("yukata", "yukata, japanese clothes, summer festival, night", 1),
    ("suit", "formal, black suit, white shirt, necktie", 1),
    ("china", "china dress, chinese clothes, side slit", 1),
    ("bikini", BIKINI, 3),
    ("sit", "sitting, chair, indoors", 1),
    ("squat", "squatting, outdoors", 1),
    ("kneel", "kneeling, indoors", 1),
    ("jump", "jumping, outdoors, blue sky", 1),
    ("crossed_arms", "crossed arms, upper body", 1),
    ("angry", "angry, upper body", 1),
    ("smile", "smile, upper body", 1),
    ("cry", "crying, tears, upper body", 1),
    ("grin", "grin, upper body", 1),
]
FEMALE_NSFW: list[tuple[str, str, int]] = [
    ("n_lie", "nsfw, nude, lying, on bed", 2),
    ("n_stand", "nsfw, nude, standing", 3),
    ("n_sex", "nsfw, sex, 1boy, hetero, on bed", 2),
]
MALE: list[tuple[str, str, int]] = [
    ("short", "1boy, male focus, shorts, t-shirt, outdoors", 1),
    ("shirt", "1boy, male focus, shirt, upper body", 2),
    ("uniform", "1boy, male focus, school uniform, gakuran", 3),
    ("suit", "1boy, male focus, black suit, necktie", 2),
    ("jacket", "1boy, male focus, jacket, outdoors", 2),
    ("swim", "1boy, male focus, male swimwear, swim trunks, topless male, beach", 3),
]
MALE_NSFW: list[tuple[str, str, int]] = [("n_stand", "nsfw, 1boy, male focus, nude, standing", 3)]


@dataclass(frozen=True)
class Job:
    """One image to render for every checkpoint."""

    prompt_name: str
    index: int
    prompt: str
    negative: str
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.prompt_name}_{self.index}.png"


def is_male(image_tags: list[list[str]]) -> bool:
    """True when more than half of the dataset images are tagged ``1boy``."""
    return bool(image_tags) and sum("1boy" in tags for tags in image_tags) > len(image_tags) / 2


def chosen_set(e: EvaluateSettings, image_tags: list[list[str]]) -> str:
    """``evaluate.prompt_set`` with ``auto`` resolved from the dataset's tags."""
    return e.prompt_set if e.prompt_set != "auto" else ("male" if is_male(image_tags) else "female")


def prompt_specs(
    e: EvaluateSettings, image_tags: list[list[str]], ignore_tags: set[str] = frozenset()
) -> list[PromptSpec]:
    """The prompts for this dataset: built-in set, outfit clusters, then the user's own."""
    chosen = chosen_set(e, image_tags)
    builtin: list[tuple[str, str, int]] = []
    if chosen == "female":
        builtin = FEMALE + (FEMALE_NSFW if e.nsfw else [])
    elif chosen == "male":
        builtin = MALE + (MALE_NSFW if e.nsfw else [])
    specs = [PromptSpec(name=name, prompt=text, count=count) for name, text, count in builtin]
    if e.cluster_prompts:
        for i, cluster in enumerate(outfit_clusters(image_tags, ignore_tags)):
            specs.append(
                PromptSpec(
                    name=f"pattern_{i}",
                    prompt=", ".join(tag.replace("_", " ") for tag in cluster.tags),
                    count=cluster.images,
                )
            )
    specs += e.prompts
    if not specs:
        raise ValueError(
            "evaluate.prompt_set 'custom' with no evaluate.prompts relies on the dataset's outfit clusters, and it "
            "has none: add [[evaluate.prompts]] entries or choose another prompt_set"
        )
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"evaluate prompts share the names {duplicates}; give each [[evaluate.prompts]] entry its own name"
        )
    return specs


def dataset_prompt_specs(e: EvaluateSettings, image_tags: list[list[str]]) -> list[PromptSpec]:
    """The prompts for a dataset with these tags, its character's traits left out of the outfit clusters.
    A suite that comes out empty is a ConfigError: known from the dataset alone, before anything trains."""
    traits = {tag for tags in image_tags for tag in tags if is_character_trait(tag)}
    try:
        return prompt_specs(e, image_tags, ignore_tags=traits | UNSPECIFIC_TAGS)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _full_prompt(e: EvaluateSettings, spec: PromptSpec, trigger: str) -> str:
    text = spec.prompt if "{trigger}" in spec.prompt else ", ".join(part for part in (e.prefix, spec.prompt) if part)
    return text.replace("{trigger}", trigger)


def jobs(e: EvaluateSettings, specs: list[PromptSpec], trigger: str) -> list[Job]:
    """Every image of one checkpoint; seeds depend only on the prompt name and ``evaluate.seed``,
    so adding a prompt never changes the others' images."""
    work = []
    for spec in specs:
        first = spec.seed if spec.seed is not None else (zlib.crc32(spec.name.encode()) ^ e.seed) % 2**31
        negative = spec.negative if spec.negative is not None else e.negative_prompt
        work += [Job(spec.name, i, _full_prompt(e, spec, trigger), negative, first + i) for i in range(spec.count)]
    return work
