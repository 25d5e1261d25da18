"""Our exported files, loaded by diffusers' own loaders, reproduce the model as it was in training (SD1 and SDXL)."""

import json
import pickle
import re
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import KIT_ROOT
from lorafactory.config import TrainSettings
from lorafactory.export.embedding import write_a1111_pt, write_embedding_safetensors
from lorafactory.export.kohya import (
    bundle_tensors,
    lora_metadata,
    tensors_hash,
    text_encoder_lora_tensors,
    unet_lora_tensors,
    write_safetensors,
)
from lorafactory.testing.tiny_sd import FULL_SDXL_UNET, build_tiny_sdxl
from lorafactory.train.embedding import expand_trigger
from lorafactory.train.model import load_base, load_pipeline
from lorafactory.train.text import ENCODER_KEYS, TextEncoders, encode_prompts

TRIGGER, VECTORS, RANK, ALPHA, TE_ALPHA = "akane_hoshino", 3, 4, 2.0, 1.0
PROMPT = "akane_hoshino, smile, red hair"


def _model(kit, family):
    return str(kit.tiny_sd) if family == "sd1" else str(build_tiny_sdxl(KIT_ROOT / "tiny-sdxl"))


def _unet(unet, latents, timesteps, cond):
    added = None
    if cond.pooled is not None:
        time_ids = torch.tensor([[128, 128, 0, 0, 128, 128]] * len(latents), dtype=torch.float32)
        added = {"text_embeds": cond.pooled.expand(len(latents), -1), "time_ids": time_ids}
    return unet(latents, timesteps, cond.hidden.expand(len(latents), -1, -1), added_cond_kwargs=added).sample


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(kit, tmp_path_factory, request):
    """A LoRA + embedding as training leaves them (non-zero up weights, moved vectors), exported."""
    from peft import LoraConfig, inject_adapter_in_model

    family = request.param
    torch.manual_seed(0)
    base = load_base(_model(kit, family))
    assert base.family == family
    text = TextEncoders(
        base.family, base.tokenizers, base.text_encoders, TRIGGER, VECTORS, "1girl", clip_skip=2, seed=0
    )
    with torch.no_grad():
        for vectors in text.vectors.values():
            vectors.add_(torch.randn_like(vectors) * 0.5)
    base.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TrainSettings().lora_targets))
    te_config = LoraConfig(r=2, lora_alpha=TE_ALPHA, target_modules=TrainSettings().text_encoder_lora_targets)
    for encoder in base.text_encoders:  # the optional text-encoder LoRA, as the trainer adds it
        inject_adapter_in_model(te_config, encoder)
    for module in (base.unet, *base.text_encoders):
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp(f"export-{family}")
    tensors = {
        **unet_lora_tensors(base.unet, ALPHA, family),
        **text_encoder_lora_tensors(base.text_encoders, TE_ALPHA),
    }
    meta = lora_metadata(
        output_name=TRIGGER,
        trigger=TRIGGER,
        rank=RANK,
        alpha=ALPHA,
        steps=10,
        resolution=128,
        clip_skip=2,
        num_train_images=5,
        tag_frequency={"dataset": {TRIGGER: 5}},
        base_model_name="tiny",
        seed=0,
        tensors=tensors,
        family=family,
    )
    write_safetensors(folder / "lora.safetensors", tensors, meta)
    write_safetensors(folder / "bundled.safetensors", {**tensors, **bundle_tensors(TRIGGER, text.vectors)}, meta)
    write_embedding_safetensors(folder / "emb.safetensors", text.vectors)
    write_a1111_pt(folder / "emb.pt", TRIGGER, text.vectors, 10, "tiny")

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        cond = text([PROMPT], torch.device("cpu"))
        unet_out = _unet(base.unet, latents, timesteps, cond)
    return {
        "family": family,
        "model": _model(kit, family),
        "folder": folder,
        "cond": cond,
        "latents": latents,
        "timesteps": timesteps,
        "unet": unet_out,
        "vectors": {k: v.detach().clone() for k, v in text.vectors.items()},
    }


def _load_embedding(pipe, path, family):
    if family == "sd1":
        pipe.load_textual_inversion(str(path), token=TRIGGER)
        return [(pipe.tokenizer, pipe.text_encoder)]
    tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    for key, (tokenizer, encoder) in zip(ENCODER_KEYS, pairs):
        pipe.load_textual_inversion(tensors[key], token=TRIGGER, tokenizer=tokenizer, text_encoder=encoder)
    return pairs


@pytest.mark.parametrize("embedding_file", ["emb.safetensors", "emb.pt"])
def test_diffusers_loaders_reproduce_training_outputs(trained, embedding_file):
    family = trained["family"]
    pipe = load_pipeline(trained["model"])
    pipe.load_lora_weights(str(trained["folder"] / "lora.safetensors"))
    pairs = _load_embedding(pipe, trained["folder"] / embedding_file, family)
    text = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    assert text == expand_trigger(PROMPT, TRIGGER, VECTORS)  # the trigger expands to the same tokens
    tokenizers, encoders = zip(*pairs)
    with torch.no_grad():
        cond = encode_prompts(family, list(tokenizers), list(encoders), [text], 2, torch.device("cpu"))
        torch.testing.assert_close(cond.hidden, trained["cond"].hidden, atol=1e-5, rtol=1e-4)
        if family == "sdxl":
            torch.testing.assert_close(cond.pooled, trained["cond"].pooled, atol=1e-5, rtol=1e-4)
        unet_out = _unet(pipe.unet, trained["latents"], trained["timesteps"], cond)
        torch.testing.assert_close(unet_out, trained["unet"], atol=1e-5, rtol=1e-4)
        pipe.unload_lora_weights()
        without = _unet(pipe.unet, trained["latents"], trained["timesteps"], cond)
        plain = encode_prompts(family, list(tokenizers), list(encoders), [text], 2, torch.device("cpu"))
    assert (plain.hidden - trained["cond"].hidden).abs().max() > 1e-3  # the text-encoder LoRA mattered
    assert (without - trained["unet"]).abs().max() > 1e-3  # the LoRA really changes the output


def test_kohya_file_layout_and_metadata(trained):
    family = trained["family"]
    with safe_open(str(trained["folder"] / "lora.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in keys}
    if family == "sd1":
        prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert any("_proj_in." in k for k in keys) and meta["ss_base_model_version"] == "sd_v1"
    else:  # original SDXL names: down block 1 (the first with attention), layer 0 -> input_blocks 4
        prefix = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        assert any(k.startswith("lora_unet_output_blocks_") for k in keys) and any("middle_block_1" in k for k in keys)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= keys
    assert any("_ff_net_0_proj." in k for k in keys)
    te_prefixes = ("lora_te_",) if family == "sd1" else ("lora_te1_", "lora_te2_")
    for te_prefix in te_prefixes:
        assert f"{te_prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert all(k.startswith(("lora_unet_", *te_prefixes)) for k in keys)
    assert tensors[f"{prefix}.lora_down.weight"].shape[0] == RANK and float(tensors[f"{prefix}.alpha"]) == ALPHA
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["modelspec.trigger_phrase"] == TRIGGER
    assert json.loads(meta["ss_tag_frequency"])["dataset"][TRIGGER] == 5
    assert meta["sshs_model_hash"] == tensors_hash(tensors)


def test_bundled_and_a1111_embedding_layouts(trained):
    vectors = trained["vectors"]
    with safe_open(str(trained["folder"] / "bundled.safetensors"), "pt") as handle:
        bundle = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("bundle_emb.")}
    data = torch.load(trained["folder"] / "emb.pt", weights_only=True)
    if trained["family"] == "sd1":
        torch.testing.assert_close(bundle[f"bundle_emb.{TRIGGER}.string_to_param.*"], vectors["clip_l"])
        assert list(data["string_to_param"]) == ["*"] and data["name"] == TRIGGER
        assert data["string_to_param"]["*"].shape == (VECTORS, 32)
    else:
        assert set(bundle) == {f"bundle_emb.{TRIGGER}.clip_l", f"bundle_emb.{TRIGGER}.clip_g"}
        assert data["clip_l"].shape == (VECTORS, 32) and data["clip_g"].shape == (VECTORS, 48)
        torch.testing.assert_close(bundle[f"bundle_emb.{TRIGGER}.clip_g"], vectors["clip_g"])


def test_sgm_names_round_trip_through_diffusers_on_the_real_sdxl_layout():
    """Our original-name keys for every attention layer of a full-size SDXL UNet (built on the meta
    device: shapes only) map back to the right modules through diffusers' own SGM converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from lorafactory.export.kohya import sgm_module_name

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_SDXL_UNET)
    targets = TrainSettings().lora_targets
    names = [n for n, _ in unet.named_modules() if any(n.endswith("." + t) for t in targets)]
    assert len(names) > 700  # every attention/ff/proj layer of the real SDXL UNet
    ours = {f"lora_unet_{sgm_module_name(n, 2).replace('.', '_')}.alpha": n for n in names}
    assert any(k.startswith("lora_unet_input_blocks_8_1_transformer_blocks_9_") for k in ours)
    mapped = _maybe_map_sgm_blocks_to_diffusers({k: torch.zeros(1) for k in ours}, unet.config)
    # the converter restores diffusers' block and layer indices under the original block words,
    # which its next step renames (input_blocks -> down_blocks, ...)
    words = {"down_blocks": "input_blocks", "up_blocks": "output_blocks", "mid_block": "middle_block"}
    expected = {f"lora_unet_{words[n.split('.')[0]]}_{'_'.join(n.split('.')[1:])}.alpha" for n in names}
    assert set(mapped) == expected


# AUTOMATIC1111's restricted loader (modules/safe.py): the zip records it allows, the globals it
# resolves, and the five pickles it reads from a legacy (non-zip) file.
A1111_ZIP_RECORD = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(
        ("torch", n)
        for n in ("DoubleStorage", "FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "ByteStorage")
    ),
    ("torch", "float32"),
    ("torch", "BFloat16Storage"),
}


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def a1111_check_pt(path):
    """Raise as A1111 does for a file its restricted loader refuses."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = [name for name in archive.namelist() if not A1111_ZIP_RECORD.match(name)]
            if bad:
                raise ValueError(f"bad file inside {path}: {bad[0]}")
            with archive.open(next(n for n in archive.namelist() if n.endswith("/data.pkl"))) as handle:
                A1111Unpickler(handle).load()
        return
    with open(path, "rb") as handle:
        unpickler = A1111Unpickler(handle)
        for _ in range(5):
            unpickler.load()


def test_a1111_pt_passes_a1111s_restricted_loader(trained, tmp_path):
    a1111_check_pt(trained["folder"] / "emb.pt")
    zipped = tmp_path / "zip.pt"  # torch's default format is refused: the check really checks
    torch.save({"clip_l": torch.zeros(2, 4)}, zipped)
    with pytest.raises(ValueError, match="bad file inside"):
        a1111_check_pt(zipped)


def test_the_tiny_models_have_every_module_name_of_sd15_and_sdxl(kit):
    """Shrunk only in width: each exported key of the test kit's models is a key of the real model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lorafactory.testing import tiny_sd

    def names(model):
        return {name for name, _ in model.named_modules()}

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.5's
        sdxl = UNet2DConditionModel(**FULL_SDXL_UNET)
        clip_l = CLIPTextModel(tiny_sd._clip_config(768, 12, 12, 768))
        clip_g = CLIPTextModelWithProjection(tiny_sd._clip_config(1280, 32, 20, 1280))
    sd1_tiny = load_base(str(kit.tiny_sd))
    sdxl_tiny = load_base(str(build_tiny_sdxl(KIT_ROOT / "tiny-sdxl")))
    assert names(sd1_tiny.unet) == names(sd15) and names(sd1_tiny.text_encoders[0]) == names(clip_l)
    assert names(sdxl_tiny.unet) == names(sdxl)
    assert [names(e) for e in sdxl_tiny.text_encoders] == [names(clip_l), names(clip_g)]
    assert "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k" in names(sd1_tiny.unet)  # layer 2 of 2
    assert "mid_block.attentions.0.transformer_blocks.9.ff.net.2" in names(sdxl_tiny.unet)


def _a1111_compvis_name(key: str) -> str:
    """AUTOMATIC1111's conversion of a kohya SD1 UNet LoRA key to its module in the original model
    (extensions-builtin/Lora: convert_diffusers_name_to_compvis), for the layers LoRAs target."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + block * 3 + layer}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else layer * 2}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{block * 3 + layer}_{1 if kind == 'attentions' else 0}_{rest}"
    return key


@pytest.mark.parametrize("trained", ["sd1"], indirect=True)  # SDXL keys: the SGM round trip below
def test_every_sd1_key_finds_its_module_through_a1111s_conversion(trained, tmp_path, kit):
    from lorafactory.testing.single_file import write_ldm_checkpoint

    checkpoint = write_ldm_checkpoint(kit.tiny_sd, tmp_path / "original.safetensors")
    with safe_open(str(checkpoint), "pt") as handle:
        modules = {
            k[len("model.") : -len(".weight")].replace(".", "_") for k in handle.keys() if k.endswith(".weight")
        }
    with safe_open(str(trained["folder"] / "lora.safetensors"), "pt") as handle:
        lora = {k.split(".")[0] for k in handle.keys() if k.startswith("lora_unet_")}
    assert {_a1111_compvis_name(k) for k in lora} <= modules
    assert "diffusion_model_input_blocks_5_1_transformer_blocks_0_attn1_to_q" in {_a1111_compvis_name(k) for k in lora}
