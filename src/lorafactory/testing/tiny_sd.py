"""Tiny, seeded, random-initialised SD1.5- and SDXL-architecture pipelines in diffusers format.

The exact block and layer structure of Stable Diffusion 1.5 and SDXL (every UNet block, resnet,
transformer layer and text-encoder layer, so every module, and every LoRA key, has a real name),
shrunk only in width: a few MB in all. The CLIP tokenizer is built locally from a byte-level
vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUILD_VERSION = "4"  # 4: the real SD1.5 / SDXL block and layer structure
_WORDS = (
    "best quality masterpiece solo portrait full body standing smile looking at viewer upper maid headdress apron "
    "yukata festival night starry sky beach bikini light dress skirt coat shirt hair long red blue green girl "
    "lowres bad anatomy hands worst low jpeg artifacts watermark 1girl"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (a documented part of its BPE format)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            rule = f"{parts[0]} {parts[1]}"
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


CLIP_L_LAYERS, CLIP_G_LAYERS = 12, 32  # text-encoder depths of SD1.5 / SDXL (CLIP ViT-L, OpenCLIP ViT-bigG)

# SD1.5's UNet is diffusers' default UNet2DConditionModel (4 blocks, 2 layers each, attention in
# the first three, one transformer layer each); only the widths below differ.
TINY_SD15_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32, 64, 64),  # SD1.5: 320, 640, 1280, 1280 (the same steps, so the same shortcuts)
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

# SDXL 1.0's UNet configuration (2.6B parameters).
FULL_SDXL_UNET = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


# SDXL's structure (transformer depths 1, 2, 10, mid block 10), narrow.
TINY_SDXL_UNET = {
    **FULL_SDXL_UNET,
    "sample_size": 16,
    "block_out_channels": (16, 32, 64),  # SDXL: 320, 640, 1280
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 32 + 48,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 40 + 6 * 8,
    "norm_num_groups": 8,
}


def _tokenizer(folder: Path, pad: str = "<|endoftext|>"):
    """A CLIP tokenizer over the local byte-level vocabulary (written to ``folder`` once)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad)


def _clip_config(hidden: int, layers: int, heads: int, projection: int):
    from transformers import CLIPTextConfig

    vocab, _ = _vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=(4 if hidden >= 768 else 2) * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def _vae(full_size: bool):
    from diffusers import AutoencoderKL

    channels, layers, groups, size = ((128, 256, 512, 512), 2, 32, 1024) if full_size else ((8, 16, 16, 16), 1, 8, 128)
    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers,
        norm_num_groups=groups,
        sample_size=size,
    )


def _cached_build(path: Path, write, stamp_name: str = ".lorafactory-tiny-sd") -> Path:
    """Build (once) with ``write(work_folder, out_folder)`` and move the result to ``path``; a
    finished build (its stamp file carries BUILD_VERSION) is reused."""
    path = Path(path)
    stamp = path / stamp_name
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return path
    work = path.with_name(path.name + ".building")
    for folder in (path, work):
        if folder.exists():
            shutil.rmtree(folder)
    write(work, work / "out")
    (work / "out" / stamp_name).write_text(BUILD_VERSION)
    (work / "out").rename(path)
    shutil.rmtree(work)
    return path


def _save_pipeline(make, half: bool):
    """A ``write`` for _cached_build: ``make(work_folder) -> pipeline``, saved (in fp16 when ``half``).
    Full-size models are initialised on the GPU when there is one (minutes faster)."""

    def write(work: Path, out: Path) -> None:
        import torch

        with torch.device("cuda" if half and torch.cuda.is_available() else "cpu"):
            pipe = make(work)
        (pipe.to(torch.float16) if half else pipe).save_pretrained(out, safe_serialization=True)

    return write


def build_tiny_sd(path: Path, seed: int = 0, full_size: bool = False) -> Path:
    """The tiny SD1.5-architecture pipeline at ``path`` (built once).

    ``full_size`` builds SD1.5's real shapes instead (860M-parameter UNet), random, saved in fp16,
    with the local tokenizer: for GPU throughput checks, not for tests.
    """

    def make(work: Path):
        import torch
        from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        if full_size:  # diffusers' defaults are SD1.5's UNet, apart from the text width
            text_encoder = CLIPTextModel(_clip_config(768, 12, 12, 768))
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        else:
            text_encoder = CLIPTextModel(_clip_config(32, CLIP_L_LAYERS, 4, 32))
            unet = UNet2DConditionModel(**TINY_SD15_UNET)
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            skip_prk_steps=True,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=_vae(full_size),
            text_encoder=text_encoder,
            tokenizer=_tokenizer(work / "tok"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    return _cached_build(path, _save_pipeline(make, half=full_size))


def build_tiny_sdxl(path: Path, seed: int = 0, full_size: bool = False) -> Path:
    """The tiny SDXL-architecture pipeline at ``path`` (built once): two CLIP text encoders (the
    second with a projection for the pooled embedding), a ``text_time`` UNet with linear
    projections, an 8x VAE.

    ``full_size`` builds SDXL's real shapes (2.6B-parameter UNet, CLIP-L + CLIP-G), random, saved
    in fp16, for GPU throughput checks.
    """

    def make(work: Path):
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        if full_size:
            encoders = (
                CLIPTextModel(_clip_config(768, 12, 12, 768)),
                CLIPTextModelWithProjection(_clip_config(1280, 32, 20, 1280)),
            )
            unet = UNet2DConditionModel(**FULL_SDXL_UNET)
        else:
            encoders = (
                CLIPTextModel(_clip_config(32, CLIP_L_LAYERS, 4, 32)),
                CLIPTextModelWithProjection(_clip_config(48, CLIP_G_LAYERS, 4, 40)),
            )
            unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            vae=_vae(full_size),
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=_tokenizer(work / "tok"),
            tokenizer_2=_tokenizer(work / "tok2", pad="!"),
            unet=unet,
            scheduler=scheduler,
        )

    return _cached_build(path, _save_pipeline(make, half=full_size))


def build_tiny_clip(path: Path, seed: int = 0, full_size: bool = False) -> Path:
    """A tiny random CLIP (text + vision towers, tokenizer, image processor) at ``path``, built once:
    the stand-in for evaluate.clip_model. ``full_size``: random weights in the shapes of
    openai/clip-vit-large-patch14 (ViT-L/14 at 224 px), for timing on a GPU."""
    hidden, layers, heads, side, patch, projection = (
        (1024, 24, 16, 224, 14, 768) if full_size else (32, 2, 4, 32, 8, 32)
    )

    def write(work: Path, out: Path) -> None:
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

        torch.manual_seed(seed)
        text = _clip_config(768, 12, 12, projection) if full_size else _clip_config(32, 2, 4, projection)
        vision = CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=(4 if full_size else 2) * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=side,
            patch_size=patch,
            projection_dim=projection,
        )
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection)
        model = CLIPModel(config)
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            ),
            tokenizer=_tokenizer(work / "tok"),
        )
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)

    return _cached_build(path, write, ".lorafactory-tiny-clip")
