"""``lorafactory publish``: a character's finished release to the Hugging Face Hub and/or Civitai."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lorafactory.config import Settings
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.release.civitai import BASE_MODELS, NSFW_LEVELS, CivitaiPlan, CivitaiReport, publish_to_civitai
from lorafactory.release.hub import PublishReport, publish_to_hub
from lorafactory.state import Store
from lorafactory.vision.tagging import rating
from lorafactory.workspace import CharacterDir

CIVITAI_STATE = "civitai.json"  # in the character folder: ids of what was created there


def parse_parameters(text: str) -> dict:
    """A1111's PNG ``parameters`` text as Civitai's image metadata fields."""
    lines = text.strip().splitlines()
    meta: dict = {"prompt": lines[0] if lines else ""}
    for line in lines[1:]:
        if line.startswith("Negative prompt: "):
            meta["negativePrompt"] = line.removeprefix("Negative prompt: ")
        else:
            fields = dict(part.split(": ", 1) for part in line.split(", ") if ": " in part)
            names = {
                "Steps": "steps",
                "Sampler": "sampler",
                "CFG scale": "cfgScale",
                "Seed": "seed",
                "Size": "Size",
                "Model": "Model",
                "Clip skip": "clipSkip",
            }
            for key, name in names.items():
                if key in fields:
                    value = fields[key]
                    meta[name] = int(value) if value.isdigit() else float(value) if key == "CFG scale" else value
    return meta


def civitai_plan(char: CharacterDir, settings: Settings, trigger: str) -> CivitaiPlan:
    release = char.manifest("release")
    step = int(release.details["step"])
    train = char.manifest("train")
    evaluation = char.manifest("evaluate")
    family = train.details.get("family", "sd1")
    folder = char.artifact("release")
    previews = []
    for path in sorted((folder / "previews").glob("*.png")):
        with Image.open(path) as image:
            level = NSFW_LEVELS[rating(image.convert("RGB"), settings.vision.tagger_model)]
            meta = parse_parameters(image.info.get("parameters", ""))
        previews.append((path, level, meta))
    core = (
        ", ".join(tag.replace("_", " ") for tag in char.manifest("prepare").details.get("pruned_core_tags", []))
        or "none"
    )
    description = (
        f"<p>{settings.character.name}, a character LoRA with a "
        "pivotal-tuning trigger embedding (bundled in the file).</p>"
        "<p>AUTOMATIC1111 reads the bundled embedding. Forge and ComfyUI do not: they also need the embedding "
        f"file <code>embeddings/{trigger}.safetensors</code> of the full release (Forge: its <code>embeddings/</code> "
        f"folder; ComfyUI: <code>models/embeddings</code> and <code>embedding:{trigger}</code> in the prompt).</p>"
        f"<p>Trigger word: <strong>{trigger}</strong>. Core tags the trigger learned: {core}.</p>"
        f"<p>Recommended weights: LoRA 0.6–0.85, trigger 0.8–1.1.</p>"
        f"<p>Step {step} was chosen automatically: {evaluation.details['reason']}.</p>"
        "<p>Made with lorafactory; the model card on Hugging Face has every step's metrics.</p>"
    )
    return CivitaiPlan(
        name=settings.character.name,
        description=description,
        tags=["anime", "character", *settings.release.tags],
        version=f"step {step}",
        base_model=BASE_MODELS[family],
        trained_words=[trigger],
        clip_skip=settings.train.clip_skip,
        steps=step,
        lora_file=folder / f"{trigger}.safetensors",
        previews=previews,
    )


def finished_release(char: CharacterDir, name: str) -> Path:
    folder = char.artifact("release")
    if char.manifest("release") is None:
        raise InputError(f'{name} has no finished release in {folder}; run `lorafactory run "{name}"` first')
    return folder


def publish(
    char: CharacterDir,
    settings: Settings,
    trigger: str,
    targets: list[str],
    *,
    repo: str,
    private: bool,
    endpoint: str,
    progress: Progress,
    dry_run: bool = False,
    store: Store | None = None,
) -> list[PublishReport | CivitaiReport]:
    """Publish to each of ``targets`` (``huggingface``, ``civitai``), in that order; each finished
    publication is recorded in ``store`` (when given)."""
    folder = finished_release(char, settings.character.name)
    release = char.manifest("release")
    step = int(release.details["step"])
    reports: list[PublishReport | CivitaiReport] = []
    if store is not None and not dry_run:
        store.ensure_character(char.slug, settings.character.name, trigger)
    if "huggingface" in targets:
        hub = publish_to_hub(folder, repo, private=private, endpoint=endpoint, progress=progress, dry_run=dry_run)
        if store is not None and not dry_run:
            store.record_publication(
                char.slug, "huggingface", hub.target, step, release.fingerprint, len(hub.uploaded), len(hub.unchanged)
            )
        reports.append(hub)
    if "civitai" in targets:
        plan = civitai_plan(char, settings, trigger)
        civitai = publish_to_civitai(
            plan,
            char.path / CIVITAI_STATE,
            release.fingerprint,
            base_url=settings.release.civitai_url,
            progress=progress,
            dry_run=dry_run,
        )
        if store is not None and not dry_run:
            store.record_publication(
                char.slug,
                "civitai",
                civitai.model_url,
                step,
                release.fingerprint,
                len(civitai.done),
                len(civitai.skipped),
            )
        reports.append(civitai)
    return reports
