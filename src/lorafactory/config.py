"""Run settings: pydantic models per stage, named presets, TOML files and CLI overrides.

Precedence, lowest first: the preset, the run's TOML file, then ``--set key=value`` overrides.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from lorafactory.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PRESET = "sd15-anime"


_USUAL_BACKENDS = {"inductor", "aot_eager", "eager", "cudagraphs"}  # torch's own: known without importing it


def _compile_backend(name: str) -> str:
    """A torch.compile backend torch knows (its registry, plugins included), checked when the settings load."""
    if name in _USUAL_BACKENDS:
        return name
    from torch._dynamo import list_backends

    if name not in list_backends(exclude_tags=()):  # its debug and experimental ones too
        usual = ", ".join(list_backends())
        raise ValueError(
            f"torch.compile has no backend {name!r}: use one of {usual} (or aot_eager, which captures the graphs "
            "without generating code)"
        )
    return name


CompileBackend = Annotated[str, AfterValidator(_compile_backend)]


def runtime_field(default: Any, description: str, **constraints: Any) -> Any:
    """A setting of how a stage runs, not of what it computes: artifacts and saved states do not record it, so
    changing it neither makes a stage's artifact out of date nor refuses a resume."""
    return Field(default, description=description, json_schema_extra={"runtime": True}, **constraints)


def compile_backend_field() -> Any:
    """``compile_backend`` of the sections that compile (training, rendering)."""
    return runtime_field(
        "inductor", "torch.compile backend; 'aot_eager' captures the graphs without generating code (a quick check)."
    )


class Section(BaseModel):
    """Base for every settings section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CharacterSettings(Section):
    name: str = ""
    trigger: str = Field(
        "",
        max_length=64,
        pattern=r"^[a-z0-9_]*$",
        description="Trigger word: lowercase ASCII letters, digits and _ (it names the files); empty = from the name.",
    )


SITE_URLS = {
    "danbooru": "https://danbooru.donmai.us",
    "safebooru": "https://safebooru.donmai.us",
    "gelbooru": "https://gelbooru.com",
    "rule34": "https://api.rule34.xxx",
    "yandere": "https://yande.re",
    "konachan": "https://konachan.com",
    "zerochan": "https://www.zerochan.net",
    "anime_pictures": "https://api.anime-pictures.net",
    "sankaku": "https://sankakuapi.com",
    "pixiv": "https://app-api.pixiv.net",
}
SITE_NAMES = tuple(SITE_URLS)
SiteName = Literal[
    "danbooru",
    "safebooru",
    "gelbooru",
    "rule34",
    "yandere",
    "konachan",
    "zerochan",
    "anime_pictures",
    "sankaku",
    "pixiv",
]


class SiteSettings(Section):
    base_url: str
    requests_per_second: float = runtime_field(1.0, "Request starts per second for this site.", gt=0)
    concurrency: int = runtime_field(2, "Requests in flight at once for this site.", ge=1)
    tags: list[str] = Field(
        default_factory=list, description="Search tags on this site; crawl.tags or the name otherwise."
    )
    username: str = Field(
        "", description="Zerochan only: your Zerochan username, which it requires in the User-Agent."
    )
    user: SecretStr | None = runtime_field(
        None, "Login or user id; the LORAFACTORY_<SITE>_* variables win. Never saved."
    )
    key: SecretStr | None = runtime_field(None, "API key or password hash; the environment wins. Never saved.")


def _site(name: str):
    return Field(default_factory=lambda: SiteSettings(base_url=SITE_URLS[name]))


FOLDER_SOURCES = ("local", "anime")  # crawl.source values whose images are a folder (crawl.from_dir)


class CrawlSettings(Section):
    source: Literal["local", "sites", "anime"] = Field(
        "sites", description="'anime': a character found in episodes by `lorafactory anime` (from_dir is its crops)."
    )
    sites: list[SiteName] = Field(default_factory=lambda: ["danbooru"])
    from_dir: str = Field("", description="Folder of images for source = 'local'.")
    tags: list[str] = Field(
        default_factory=list, description="Search tags for every site; derived from the name when empty."
    )
    limit: int = Field(300, ge=1, description="Maximum number of images, all sites together.")
    min_size: int = Field(800, ge=0, description="Choose the smallest variant whose sides are both at least this.")
    user_agent: str = "lorafactory/0.1 (character LoRA dataset builder)"
    page_size: int = Field(100, ge=1, le=200)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    danbooru: SiteSettings = _site("danbooru")
    safebooru: SiteSettings = _site("safebooru")
    gelbooru: SiteSettings = _site("gelbooru")
    rule34: SiteSettings = _site("rule34")
    yandere: SiteSettings = _site("yandere")
    konachan: SiteSettings = _site("konachan")
    zerochan: SiteSettings = _site("zerochan")
    anime_pictures: SiteSettings = _site("anime_pictures")
    sankaku: SiteSettings = _site("sankaku")
    pixiv: SiteSettings = _site("pixiv")

    @model_validator(mode="before")
    @classmethod
    def _site_defaults(cls, data: Any) -> Any:
        """A partial site table (in a preset, a file or --set) keeps the site's default URL."""
        if isinstance(data, dict):
            for name, url in SITE_URLS.items():
                if isinstance(data.get(name), dict):
                    data = {**data, name: {"base_url": url, **data[name]}}
        return data


class VisionSettings(Section):
    """Model names inside the imgutils repositories; the defaults are imgutils' own."""

    person_model: str = "person_detect_v1.1_m"
    halfbody_model: str = "halfbody_detect_v1.0_s"
    head_model: str = "head_detect_v2.0_s"
    ccip_model: str = "ccip-caformer-24-randaug-pruned"
    tagger_model: str = "SwinV2_v3"
    monochrome_model: str = "mobilenetv3_large_100_dist_safe2"
    classify_model: str = "mobilenetv3_v1.5_dist"
    ai_corrupt_model: str = "caformer_s36_v0_focal"
    aesthetic_model: str = "swinv2pv3_v0_448_ls0.2_x"
    bangumi_model: str = "mobilenetv3_v0_dist"


class PrepareSettings(Section):
    max_pixels: int = Field(80_000_000, ge=1, description="Decompression-bomb guard: larger images are dropped.")
    min_side: int = Field(256, ge=1, description="Drop raw images whose short side is smaller.")
    min_area_side: int = Field(320, ge=1, description="Drop raw images smaller than this side squared in area.")
    max_area_side: int = Field(1600, ge=64, description="Downscale raw images above this side squared in area.")
    monochrome_threshold: float = Field(0.5, ge=0, le=1)
    drop_classes: list[Literal["3d", "bangumi", "comic", "illustration", "not_painting"]] = Field(
        default_factory=lambda: ["comic", "3d", "not_painting"], description="Anime-classifier labels to drop."
    )
    near_duplicates: Literal["lpips", "phash", "off"] = Field(
        "lpips", description="A perceptual hash finds candidates; LPIPS decides."
    )
    hash_distance: int = Field(6, ge=0, le=64)
    lpips_threshold: float = Field(0.45, gt=0)
    crops: list[Literal["person", "halfbody", "head"]] = Field(default_factory=lambda: ["person", "halfbody", "head"])
    single_head: bool = Field(True, description="Keep only person crops with exactly one head.")
    purity: bool = Field(True, description="Keep only crops that CCIP judges to be the main character.")
    purity_bootstrap: int = Field(
        15, ge=5, description="Images the reference cluster is bootstrapped from (OPTICS needs at least 5)."
    )
    purity_cluster_share: float = Field(0.6, gt=0, le=1)
    purity_min_match: float = Field(0.5, gt=0, le=1, description="Share of the reference an image must match.")
    head_scale: float = Field(1.5, ge=1.0, description="Head boxes are enlarged by this factor.")
    min_crop_side: int = Field(180, ge=1)
    general_threshold: float = Field(0.35, gt=0, lt=1)
    drop_overlap: bool = True
    drop_blacklisted: bool = True
    sidecar_tags: bool = Field(
        True,
        description="A local folder's .txt tags join the WD14 tags of each image's full-person crops "
        "(half-body and head crops keep what the tagger sees in them).",
    )
    core_tag_ratio: float = Field(0.35, gt=0, le=1)
    prune_core_tags: bool = True
    min_images: int = Field(10, ge=1, description="Fail when fewer images survive cleaning.")


class TrainSettings(Section):
    base_model: str = Field("deepghs/animefull-latest", description="Diffusers folder, .safetensors file or hub id.")
    base_config: str = Field(
        "",
        description=(
            "For a single-file base model: a diffusers folder or hub id "
            "with its configs (default: inferred from the file's keys)."
        ),
    )
    clip_skip: int = Field(2, ge=1, le=4, description="A1111 convention: 1 = last layer, 2 = penultimate.")
    max_token_length: Literal[75, 150, 225] = Field(
        225, description="Caption tokens used, in chunks of 75 as in kohya and A1111; the rest is cut."
    )
    resolution: int = Field(512, ge=64, description="Target area is resolution squared.")
    bucket_step: int = Field(64, ge=8, multiple_of=8, description="Bucket sides are multiples of this (of 8).")
    bucket_mode: Literal["no_upscale", "fixed"] = Field(
        "no_upscale", description="'fixed' is the classic bucket list (upscales)."
    )
    regularization_dir: str = Field(
        "", description="A prepared dataset folder of generic images (no trigger in their captions)."
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of regularization images.")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="A fixed step count; unset = from the dataset's size (train.epochs...)."
    )
    epochs: float = Field(40, gt=0, description="With max_steps unset: passes over the images to train...")
    min_steps: int = Field(800, ge=1, description="...but at least this many steps...")
    cap_epochs: float = Field(10, gt=0, description="...and at most the larger of this many passes...")
    cap_steps: int = Field(10_000, ge=1, description="...and this many steps (the reference's v1.5 rule).")
    save_every: int = Field(100, ge=1)
    max_checkpoints: int = Field(
        40,
        ge=0,
        description="With max_steps unset: at most this many checkpoints, each exported and evaluated; a longer "
        "run saves every whole multiple of save_every that keeps within it (the reference's v1.5 saved 40). "
        "0 = every save_every steps, however many.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files (kohya's scalar names) in train/.")
    batch_size: int = Field(4, ge=1)
    full_batches: bool = Field(
        True,
        description="Every batch holds batch_size images: a bucket's leftovers wait for the next epoch "
        "(false = a partial batch ends each bucket, as kohya does).",
    )
    seed: int = 42
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(4.0, gt=0)
    lora_targets: list[str] = Field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
        ]
    )
    text_encoder_lora_rank: int = Field(
        0, ge=0, description="LoRA rank on the text encoder(s); 0 = no text-encoder LoRA."
    )
    text_encoder_lora_alpha: float = Field(2.0, gt=0)
    text_encoder_lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    )
    text_encoder_lr: float = Field(1e-5, gt=0)
    unet_lr: float = Field(1e-4, gt=0)
    embedding_lr: float = Field(3e-3, gt=0)
    embedding_vectors: int = Field(4, ge=1, le=75)
    embedding_init: str = Field("1girl", description="Init text for the trigger vectors; empty means random.")
    weight_decay: float = Field(1e-3, ge=0)
    embedding_weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    embedding_pivot: float = Field(
        1.0, gt=0, le=1, description="Freeze the embedding after this fraction of the steps."
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    fused_optimizer: bool = Field(
        True, description="AdamW updates every tensor in one fused kernel (CUDA, CPU); false = one update per tensor."
    )
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    gradient_accumulation: int = Field(1, ge=1)
    gradient_checkpointing: bool = runtime_field(
        False, "Recompute activations in the backward pass: less GPU memory, slower; the same training (tested)."
    )
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting; 5 is common. Off when unset.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="'auto' reads the base model's scheduler."
    )
    zero_terminal_snr: bool = False
    keep_tokens: int = Field(
        0, ge=0, description="Leading tags (after the trigger) that shuffle and dropout never move."
    )
    shuffle_tags: bool = True
    tag_dropout: float = Field(0.0, ge=0, lt=1)
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    flip: bool = Field(False, description="Random horizontal flips (off for asymmetric characters).")
    group_repeats: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="Repeats per crop group, e.g. {head = 1, person = 2}."
    )
    group_loss_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="Loss weight per crop group."
    )
    cache_latents: bool = Field(True, description="Encode each image once; off re-encodes every batch.")
    latent_cache_dir: str = runtime_field("", "Also keep cached latents on disk here, shared across runs.")
    validation_split: float = Field(0.05, ge=0, lt=1, description="Share of images held out for the validation loss.")
    validation_timesteps: list[Annotated[int, Field(ge=0, le=999)]] = Field(
        default_factory=lambda: [200, 400, 600, 800], description="Timesteps (0-999) of the validation loss."
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    autocast: bool = Field(
        True,
        description="Half precision through autocast (norms in float32, every weight cast at each use); false = "
        "everything computes in the half-precision dtype, the trainable weights as working copies of float32 "
        "masters: far fewer casts, the norms in half precision.",
    )
    channels_last: bool = runtime_field(
        False,
        "The UNet's convolutions in channels-last layout (NHWC), which GPU convolution kernels "
        "prefer: no layout conversions around each convolution.",
    )
    cudnn_attention: bool = runtime_field(
        False,
        "Allow cuDNN's attention kernels on CUDA. cuDNN builds an execution plan for every new tensor "
        "shape, and bucketed training meets dozens of shapes; false = flash or memory-efficient attention.",
    )
    compile: bool = runtime_field(
        False, "torch.compile each UNet transformer block (regional: one compile serves every block)."
    )
    compile_backend: CompileBackend = compile_backend_field()
    compile_dynamic: bool = runtime_field(
        True,
        "Compile with symbolic sizes from the first step: one graph per block width serves every "
        "bucket and caption length. false = the first sizes are compiled as constants and each size that "
        "changes later compiles the blocks again (about twice the compiles on a bucketed dataset).",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description=(
            "Training processes, one per GPU; N processes train what one would with N times the gradient accumulation."
        ),
    )


class PromptSpec(Section):
    name: str = Field(description="Also the image file name prefix; prompts named 'bikini' give the bikini score.")
    prompt: str = Field(description="Tags after the prefix; the prefix holds the trigger (or use {trigger} here).")
    negative: str | None = Field(None, description="Replaces evaluate.negative_prompt for this prompt.")
    count: int = Field(1, ge=1, description="Images per checkpoint.")
    seed: int | None = Field(None, description="First seed; by default derived from the name and evaluate.seed.")


class EvaluateSettings(Section):
    """Every checkpoint renders the same prompts with the same seeds; metrics pick the best steps."""

    prompt_set: Literal["auto", "female", "male", "custom"] = Field(
        "auto",
        description=(
            "Built-in set; 'auto' picks 'male' when most dataset images are tagged 1boy; 'custom' uses only `prompts`."
        ),
    )
    prompts: list[PromptSpec] = Field(
        default_factory=list, description="Added to the built-in set (or the whole set with 'custom')."
    )
    nsfw: bool = Field(False, description="Add the built-in set's nsfw prompts.")
    cluster_prompts: bool = Field(True, description="One prompt per outfit cluster of the dataset's tags.")
    prefix: str = Field(
        "best quality, masterpiece, highres, solo, ({trigger}:1.1)",
        description="Before every prompt; AUTOMATIC1111 emphasis such as (tag:1.2) applies here and in prompts.",
    )
    negative_prompt: str = (
        "(worst quality, low quality:1.4), (zombie, sketch, interlocked fingers, comic:1.1), (full body:1.1), "
        "lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, jpeg artifacts, signature, "
        "watermark, username, blurry, (censored, mosaic censoring, bar censor:1.2)"
    )
    seed: int = 42
    sampler: Literal["dpmpp_2m_karras", "euler_a", "euler", "ddim"] = "dpmpp_2m_karras"
    steps: int = Field(25, ge=1)
    cfg_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=64, le=4096, multiple_of=8, description="Image width: a multiple of 8.")
    height: int = Field(768, ge=64, le=4096, multiple_of=8, description="Image height: a multiple of 8.")
    lora_scale: float = Field(0.8, ge=0)
    batch_size: int = runtime_field(8, "Images rendered at once; each has its own seed, so the same images.", ge=1)
    merge_lora: bool = runtime_field(
        False,
        "Render with each checkpoint's LoRA merged into the UNet's weights (as AUTOMATIC1111 and "
        "ComfyUI apply one): no extra work per sampler step; the base weights are put back exactly.",
    )
    channels_last: bool = runtime_field(
        False,
        "Render with the UNet and VAE in channels-last layout (NHWC), which GPU convolutions prefer.",
    )
    compile: bool = runtime_field(
        False,
        "torch.compile the UNet's transformer blocks for rendering (regional, sizes symbolic): compiled once "
        "per process, each later checkpoint hotswapped into the compiled layers without compiling again.",
    )
    compile_backend: CompileBackend = compile_backend_field()
    checkpoints: Literal["all", "coarse_to_fine"] = Field(
        "all", description="'coarse_to_fine': every coarse_every-th first, then around the best."
    )
    coarse_every: int = Field(3, ge=2)
    sequential: bool = Field(
        True,
        description=(
            "Render a checkpoint's images a part at a time (sequential_every each) and stop after a part when, "
            "even at the top of their 95% intervals, its metrics could not make it a kept step."
        ),
    )
    sequential_every: int = Field(
        8,
        ge=2,
        description=(
            "The most images in each part of a sequential evaluation; a part takes every p-th image of the "
            "suite, so each look sees every prompt. Equal to batch_size, a part is one batch."
        ),
    )
    ccip_threshold: float | None = Field(None, description="CCIP difference threshold; the model's own when unset.")
    clip_model: str = Field(
        "openai/clip-vit-large-patch14", description="CLIP for text alignment and diversity; empty = off."
    )
    aesthetic: bool = Field(True, description="imgutils' anime aesthetic percentile per image.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the 95% confidence intervals; 0 = none.")
    selection: Literal["fbeta", "recscore", "validation_loss"] = Field(
        "fbeta",
        description="'fbeta': the reference rule (z-normalised fidelity and BikiniPlus, corruption ladder, F-beta).",
    )
    fidelity_beta: float = Field(3.0, gt=0, description="F-beta weight of fidelity over controllability.")
    keep: int = Field(0, ge=0, description="Steps kept in the release; 0 = max(min(n // 3, 5), 3).")
    corrupt_floor: float = Field(
        0.8, ge=0, le=1, description="Lowest AI-corruption threshold of the ladder (from 1.0 by 0.05)."
    )
    bikini_plus_std_floor: float = Field(0.015, ge=0)
    gate_recscore: float = Field(
        0.55, ge=0, le=1, description="Retrain when the best CCIP RecScore is below this; 0 = no gate."
    )
    gate_attempts: int = Field(2, ge=0, description="Retrains allowed by the gate.")
    gate_step_factor: float = Field(1.5, ge=1, description="Each retrain multiplies the step count by this...")
    gate_lr_factor: float = Field(1.2, gt=0, description="...and the learning rates by this.")

    @property
    def relies_on_clusters(self) -> bool:
        """True when only the dataset's outfit clusters can give the suite prompts (a custom set without any)."""
        return self.prompt_set == "custom" and not self.prompts

    @model_validator(mode="after")
    def _has_prompts(self) -> EvaluateSettings:
        if self.relies_on_clusters and not self.cluster_prompts:
            raise ValueError(
                "prompt_set 'custom' renders only evaluate.prompts, and there are none: "
                "add [[evaluate.prompts]] entries or choose another prompt_set"
            )
        return self


class RegularizationSettings(Section):
    """A generic image set trained alongside the character to fight overfitting (see train.prior_loss_weight)."""

    mode: Literal["off", "auto", "on"] = Field(
        "auto", description="'auto' uses it when the dataset is smaller than 'below'."
    )
    below: int = Field(300, ge=1)
    tags: list[str] = Field(
        default_factory=lambda: ["solo", "1girl"], description="Site query for the generic images."
    )
    limit: int = Field(300, ge=1)
    from_dir: str = Field("", description="Use a local image folder instead of crawling.")


class ReleaseSettings(Section):
    license: str = "creativeml-openrail-m"
    preview_count: int = Field(8, ge=0, description="Previews per kept step: the best image of each prompt.")
    nsfw_previews: bool = Field(False, description="Allow images of the nsfw prompts among the previews.")
    tags: list[str] = Field(default_factory=list, description="Extra tags for the model card and Civitai.")
    hf_repo: str = Field(
        "",
        description="Hub repository, 'name' (under the token's owner) or 'owner/name'; default: the character slug.",
    )
    hf_private: bool = Field(False, description="Create the Hub repository as private.")
    hf_endpoint: str = Field("https://huggingface.co", description="The Hub's URL (a mirror or a private Hub).")
    civitai_url: str = Field("https://civitai.com", description="Civitai's base URL.")
    publish_to: list[Literal["huggingface", "civitai"]] = Field(
        default_factory=lambda: ["huggingface"], description="Where `lorafactory publish` uploads."
    )
    prune: Literal["off", "models", "datasets"] = runtime_field(
        "off",
        "After a release (or the quality gate's final failure), free the disk as `lorafactory prune` does: 'models' "
        "removes the checkpoints, resume state and evaluation images of every step not kept; 'datasets' also the "
        "downloaded and dataset images.",
    )


class AnimeSettings(Section):
    """Characters found in anime episodes (`lorafactory anime`): sampling, filters, clusters, names."""

    frames_per_shot: int = Field(3, ge=1, description="Frames sampled from one shot at most.")
    frame_gap_s: float = Field(1.0, ge=0.5, description="Seconds between frames sampled from one shot.")
    duplicate_distance: float = Field(
        3.0, ge=0, description="A frame this close to an earlier one of its episode is a near-duplicate (RMS, 0-255)."
    )
    recurring_distance: float = Field(
        6.0, ge=0, description="Frames this close in different episodes are the same shot (openings, endings)."
    )
    recurring_episodes: int = Field(
        2, ge=1, description="A shot seen in this many other episodes is dropped as an opening, ending or recap."
    )
    drop_low_detail: bool = Field(True, description="Drop crops imgutils' bangumi_char classes as 'vision'.")
    keep_frames: int = Field(40, ge=0, description="Frames kept per episode for the regularization sets.")
    min_cluster: int = Field(5, ge=2, description="Fewest crops that make a cluster.")
    candidates: int = Field(30, ge=1, description="With --copyright: the most posted characters tried as names.")
    references: int = Field(20, ge=1, description="Reference images crawled per candidate name.")
    accept: float = Field(0.6, gt=0, le=1, description="Share of crop-reference pairs of one character to name it.")
    margin: float = Field(0.2, ge=0, le=1, description="Lead over the runner-up name needed to name a cluster.")
    min_crops: int = Field(10, ge=1, description="Crops a named character needs for a dataset.")


class Settings(Section):
    preset: str = DEFAULT_PRESET
    character: CharacterSettings = Field(default_factory=CharacterSettings)
    crawl: CrawlSettings = Field(default_factory=CrawlSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    prepare: PrepareSettings = Field(default_factory=PrepareSettings)
    regularization: RegularizationSettings = Field(default_factory=RegularizationSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    anime: AnimeSettings = Field(default_factory=AnimeSettings)


PRESETS: dict[str, dict[str, Any]] = {
    "sd15-anime": {},
    # SDXL at 1024 px on an anime SDXL base (diffusers layout on the hub). Gradient checkpointing keeps
    # a batch of 4 near 10 GiB; on a 48 GiB+ GPU, train.gradient_checkpointing = false is about twice as fast.
    "sdxl-anime": {
        "train": {
            "base_model": "cagliostrolab/animagine-xl-3.1",
            "resolution": 1024,
            "gradient_checkpointing": True,
        },
        "evaluate": {
            "width": 832,
            "height": 1216,
            "steps": 28,
            "cfg_scale": 6.0,
            "sampler": "euler_a",
            "batch_size": 4,
        },
    },
    # For the tiny stand-in models of lorafactory.testing: small images, few steps, fast on CPU.
    "tiny-demo": {
        "crawl": {"min_size": 0, "limit": 60, "danbooru": {"requests_per_second": 50.0, "concurrency": 4}},
        "prepare": {
            "min_side": 64,
            "min_area_side": 64,
            "min_crop_side": 40,
            "max_area_side": 512,
            "min_images": 4,
            "purity_bootstrap": 10,
        },
        "train": {
            "clip_skip": 1,
            "resolution": 128,
            "max_steps": 30,
            "save_every": 10,
            "batch_size": 2,
            "lora_rank": 4,
            "lora_alpha": 2.0,
            "warmup_steps": 2,
            "embedding_vectors": 2,
            "unet_lr": 1e-3,
            "embedding_lr": 1e-2,
            "device": "cpu",
        },
        "evaluate": {
            "steps": 2,  # sampler steps: each takes the same code path, so two show it at half the rendering of four
            "width": 64,  # the tiny UNet renders a 64 px image in half the time of a 128 px one
            "height": 64,
            "batch_size": 3,  # a part at once
            "sequential_every": 3,  # its five images in two parts: a look after the first three
            "prompt_set": "custom",
            "prefix": "{trigger}",
            "prompts": [
                {"name": "portrait", "prompt": "portrait, smile", "count": 2},
                {"name": "full_body", "prompt": "full body, dress", "count": 1},
                {"name": "bikini", "prompt": "beach, bikini", "count": 2},
            ],
            "bootstrap": 200,
            "gate_recscore": 0.0,
        },
        "release": {"preview_count": 4},
        "regularization": {"mode": "off", "limit": 20},
        "anime": {"references": 8, "min_crops": 4, "keep_frames": 12},
    },
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``'train.max_steps=800'`` into ``{'train': {'max_steps': 800}}``; values use TOML syntax."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write it like --set train.max_steps=800")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML settings file, with one-line errors for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing TOML file to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = [part for part in error["loc"]]
    key = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{key}'{hint}"
    if error["type"] == "value_error":  # a section's own check: its message names the settings
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def build_settings(data: dict[str, Any]) -> Settings:
    """Validate a settings dict; errors name every bad key and what is allowed."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def load_settings(
    config_file: Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> Settings:
    """Build the effective settings from a preset, an optional saved base, a TOML file and overrides."""
    layers: list[dict[str, Any]] = [base or {}]
    if config_file is not None:
        layers.append(read_toml(config_file))
    layers.extend(parse_override(item) for item in overrides)
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    name = preset or merged.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    merged = deep_merge(PRESETS[name], merged)
    merged["preset"] = name
    return build_settings(merged)


def to_toml(settings: Settings) -> str:
    """Render settings as TOML (None values are omitted, as TOML has no null; credentials never)."""
    secrets = {name: {"user", "key"} for name in SITE_URLS}
    return tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True, exclude={"crawl": secrets}))


def _is_runtime(field: FieldInfo) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("runtime"))


def _runtime_fields(model: BaseModel) -> set[str]:
    """Fields that change how a stage runs but not what it produces; fingerprints leave them out."""
    return {name for name, field in type(model).model_fields.items() if _is_runtime(field)}


def recorded_settings(model: BaseModel) -> dict[str, Any]:
    """A settings section as an artifact records it: its values as JSON, runtime settings (credentials among
    them) left out at every level."""
    return {
        name: _recorded_value(getattr(model, name))
        for name, field in type(model).model_fields.items()
        if not _is_runtime(field)
    }


def _recorded_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return recorded_settings(value)
    if isinstance(value, (list, tuple)):
        return [_recorded_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _recorded_value(item) for key, item in value.items()}
    return to_jsonable_python(value)


def changed_setting(recorded: dict[str, Any], model: BaseModel, prefix: str = "") -> str | None:
    """The first setting of ``model`` whose value is not the one ``recorded`` holds, as a phrase that names it
    and both values; None when every one is the same. A setting the record lacks was added to lorafactory since:
    it counts as unchanged at its default, which keeps what lorafactory did before it existed. Settings the
    record has and ``model`` lacks were removed, and are not compared."""
    for name, field in type(model).model_fields.items():
        if _is_runtime(field):
            continue
        path, value = f"{prefix}{name}", getattr(model, name)
        if name not in recorded:
            default = field.get_default(call_default_factory=True)
            now = _recorded_value(value)
            if default is PydanticUndefined or now != _recorded_value(default):
                shown = "none" if default is PydanticUndefined else _shown(_recorded_value(default))
                return f"{path} {shown} (its default; the setting is newer) → {_shown(now)}"
            continue
        before = recorded[name]
        if isinstance(value, BaseModel) and isinstance(before, dict):
            found = changed_setting(before, value, f"{path}.")
        elif _models(value) and isinstance(before, list) and len(before) == len(value):
            found = next(
                (
                    changed
                    for index, (item, saved) in enumerate(zip(value, before))
                    if (changed := changed_setting(saved, item, f"{path}[{index}].")) is not None
                ),
                None,
            )
        elif (now := _recorded_value(value)) != before:
            found = f"{path} {_shown(before)} → {_shown(now)}"
        else:
            found = None
        if found is not None:
            return found
    return None


def recorded_sections(settings: BaseModel, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The named sections of ``settings`` as an artifact records them (``recorded_settings`` of each)."""
    return {name: recorded_settings(getattr(settings, name)) for name in names}


def changed_section_setting(recorded: dict[str, Any], settings: BaseModel, names: Sequence[str]) -> str | None:
    """``changed_setting`` over the named sections of a record made by ``recorded_sections``, each setting named
    with its section; a section the record lacks counts as every setting added since."""
    for name in names:
        changed = changed_setting(recorded.get(name, {}), getattr(settings, name), f"{name}.")
        if changed is not None:
            return changed
    return None


def _models(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, BaseModel) for item in value)


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# The runtime settings of each section when stage fingerprints hashed whole sections (manifests that do not
# record their settings): those hashes left out these top-level fields, and only these.
_LEGACY_RUNTIME = {
    "train": {"latent_cache_dir", "channels_last", "cudnn_attention", "compile", "compile_backend"},
    "evaluate": {"merge_lora", "channels_last"},
}


# Top-level settings added since artifacts record their settings: the hashes of files that do not record them
# never saw these, so they leave each out while it is at its default (a runtime one always: it changes no
# result). Add every new setting here.
_ADDED_SINCE_LEGACY = {
    "train": {"compile_dynamic"},
    "evaluate": {"sequential_every", "compile", "compile_backend"},
    "release": {"prune"},
}


def _added_at_default(name: str, section: BaseModel) -> set[str]:
    fields = type(section).model_fields
    return {
        field
        for field in _ADDED_SINCE_LEGACY.get(name, ())
        if _is_runtime(fields[field])
        or getattr(section, field) == fields[field].get_default(call_default_factory=True)
    }


def legacy_dump(name: str, section: BaseModel) -> dict[str, Any]:
    """Settings section ``name`` as the hashes of manifests that do not record their settings saw it."""
    return section.model_dump(mode="json", exclude=_LEGACY_RUNTIME.get(name, set()) | _added_at_default(name, section))


def legacy_settings_hash(settings: Settings) -> str:
    """The hash of every setting as files that do not record their settings (the gate's, before it did) hold it."""
    added = {name: _added_at_default(name, getattr(settings, name)) for name in _ADDED_SINCE_LEGACY}
    return settings_hash(settings.model_dump(mode="json", exclude={k: v for k, v in added.items() if v}))


def settings_hash(*parts: BaseModel | dict[str, Any] | str) -> str:
    """A stable short hash of settings sections and other fingerprint inputs."""
    payload = [p.model_dump(mode="json", exclude=_runtime_fields(p)) if isinstance(p, BaseModel) else p for p in parts]
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]
