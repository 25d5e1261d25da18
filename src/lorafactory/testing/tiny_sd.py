"""Tiny, seeded, random-initialised SD1.5- and SDXL-architecture pipelines in diffusers format.

Same component classes and tensor layout as Stable Diffusion 1.5 (CLIP text encoder,
UNet2DConditionModel with cross-attention, an 8x AutoencoderKL), a few MB in all. The CLIP
tokenizer is built locally from a byte-level vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUILD_VERSION = "2"
_WORDS = (
    "best quality masterpiece solo portrait full body standing smile looking at viewer upper maid headdress apron "
    "yukata festival night starry sky beach bikini light dress skirt coat shirt hair long red blue green girl "
    "lowres bad anatomy hands worst low jpeg artifacts watermark 1girl"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (a documented part of its BPE format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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


def build_tiny_sd(path: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Build (once) the tiny pipeline at ``path`` and return it; a finished build is reused.

    ``full_size`` builds SD1.5's real shapes instead (860M-parameter UNet), still random and with
    the local tokenizer: for GPU throughput checks, not for tests.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    stamp = path / ".lorafactory-tiny-sd"
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return path
    if path.exists():
        shutil.rmtree(path)
    work = path.with_name(path.name + ".building")
    if work.exists():
        shutil.rmtree(work)
    (work / "tok").mkdir(parents=True)

    vocab, merges = _vocab_and_merges()
    (work / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (work / "tok" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(work / "tok" / "vocab.json"), str(work / "tok" / "merges.txt"), model_max_length=77)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768 if full_size else 32,
            intermediate_size=3072 if full_size else 64,
            num_hidden_layers=12 if full_size else 3,
            num_attention_heads=12 if full_size else 4,
            max_position_embeddings=77,
            projection_dim=768 if full_size else 32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    if full_size:  # diffusers' defaults are SD1.5's UNet, apart from the text width
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU init is minutes faster
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                sample_size=512,
            )
    else:
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=128,
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    (pipe.to(torch.float16) if full_size else pipe).save_pretrained(work / "pipe", safe_serialization=True)
    (work / "pipe" / stamp.name).write_text(BUILD_VERSION)
    work.joinpath("pipe").rename(path)
    shutil.rmtree(work)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Build (once) a tiny SDXL-architecture pipeline: two CLIP text encoders (the second with a
    projection for the pooled embedding), a ``text_time`` UNet with linear projections, an 8x VAE.

    ``full_size`` builds SDXL's real shapes (2.6B-parameter UNet, CLIP-L + CLIP-G), random, saved
    in fp16, for GPU throughput checks.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    stamp = path / ".lorafactory-tiny-sd"
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return path
    if path.exists():
        shutil.rmtree(path)
    work = path.with_name(path.name + ".building")
    if work.exists():
        shutil.rmtree(work)
    (work / "tok").mkdir(parents=True)
    vocab, merges = _vocab_and_merges()
    (work / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (work / "tok" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizers = [
        CLIPTokenizer(str(work / "tok" / "vocab.json"), str(work / "tok" / "merges.txt"), model_max_length=77, pad_token=pad)
        for pad in ("<|endoftext|>", "!")
    ]
    torch.manual_seed(seed)

    def clip(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )  # fmt: skip

    if full_size:
        return _full_sdxl(work, path, stamp, tokenizers, clip)
    text_encoder = CLIPTextModel(clip(32, 32))
    text_encoder_2 = CLIPTextModelWithProjection(clip(48, 40))
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=40 + 6 * 8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(work / "pipe", safe_serialization=True)
    (work / "pipe" / stamp.name).write_text(BUILD_VERSION)
    work.joinpath("pipe").rename(path)
    shutil.rmtree(work)
    return path


def _full_sdxl(work: Path, path: Path, stamp: Path, tokenizers: list, clip) -> Path:
    """SDXL's real shapes, initialised on the GPU when there is one (minutes faster), saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def big_clip(hidden: int, layers: int, heads: int, projection: int):
        config = clip(hidden, projection)
        config.num_hidden_layers, config.num_attention_heads, config.intermediate_size = layers, heads, 4 * hidden
        return config

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        text_encoder = CLIPTextModel(big_clip(768, 12, 12, 768))
        text_encoder_2 = CLIPTextModelWithProjection(big_clip(1280, 32, 20, 1280))
        unet = UNet2DConditionModel(
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
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=1024,
        )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.to(torch.float16).save_pretrained(work / "pipe", safe_serialization=True)
    (work / "pipe" / stamp.name).write_text(BUILD_VERSION)
    work.joinpath("pipe").rename(path)
    shutil.rmtree(work)
    return path
