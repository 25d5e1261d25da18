"""An SD1 diffusers pipeline written as one original-format (LDM) ``.safetensors`` checkpoint.

Users often have base models only as such single files (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``). Tests write the tiny model this
way to exercise the single-file loading path offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(name: str, layers: int, up_has_attention: list[bool]) -> str:
    for old, new in _UNET_TOP.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    if match := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        side, block, kind, index, rest = match.groups()
        number = int(block) * (layers + 1) + int(index) + (1 if side == "down" else 0)
        head = f"{'input' if side == 'down' else 'output'}_blocks.{number}.{0 if kind == 'resnets' else 1}"
        return f"{head}.{_resnet_rest(rest) if kind == 'resnets' else rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(match[1]) + 1) * (layers + 1)}.0.op.{match[2]}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
        block = int(match[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if up_has_attention[block] else 1}.{match[2]}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name):
        kind, index, rest = match.groups()
        position = 1 if kind == "attentions" else 2 * int(index)
        return f"middle_block.{position}.{_resnet_rest(rest) if kind == 'resnets' else rest}"
    raise ValueError(f"no original name for UNet weight {name!r}")


def _resnet_rest(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET[layer]}.{param}"


def _vae_key(name: str, blocks: int) -> str:
    name = name.replace("conv_norm_out", "norm_out")
    name = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", name)
    name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", name)
    name = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{blocks - 1 - int(m[1])}.block.{m[2]}", name)
    name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{blocks - 1 - int(m[1])}.upsample", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    name = name.replace("conv_shortcut", "nin_shortcut")
    if "mid_block.attentions.0." in name:
        head, rest = name.split("mid_block.attentions.0.")
        layer, _, param = rest.rpartition(".")
        name = f"{head}mid.attn_1.{_VAE_ATTENTION[layer]}.{param}"
    return name


def write_ldm_checkpoint(pipeline_dir: Path, out: Path) -> Path:
    """Write the SD1 pipeline at ``pipeline_dir`` as a single original-format ``.safetensors`` file."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    layers = int(pipe.unet.config.layers_per_block)
    up_has_attention = [hasattr(block, "attentions") and block.attentions is not None for block in pipe.unet.up_blocks]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in pipe.unet.state_dict().items():
        tensors["model.diffusion_model." + _unet_key(name, layers, up_has_attention)] = tensor
    blocks = len(pipe.vae.config.block_out_channels)
    for name, tensor in pipe.vae.state_dict().items():
        if "mid_block.attentions.0.to_" in name and name.endswith(".weight"):
            tensor = tensor[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        tensors["first_stage_model." + _vae_key(name, blocks)] = tensor
    for name, tensor in pipe.text_encoder.state_dict().items():  # transformers 5.6 dropped the text_model level
        tensors[
            "cond_stage_model.transformer." + (name if name.startswith("text_model.") else "text_model." + name)
        ] = tensor
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out
