"""Our exported files, loaded by diffusers' own loaders, reproduce the model as it was in training."""

import json

import pytest
import torch
from safetensors import safe_open

from lorafactory.config import TrainSettings
from lorafactory.export.embedding import write_a1111_pt, write_embedding_safetensors
from lorafactory.export.kohya import bundle_tensors, lora_metadata, tensors_hash, unet_lora_tensors, write_safetensors
from lorafactory.train.embedding import encode_text, expand_trigger, install_trigger
from lorafactory.train.model import load_base, load_pipeline

TRIGGER, VECTORS, RANK, ALPHA = "akane_hoshino", 3, 4, 2.0
PROMPT = "akane_hoshino, smile, red hair"


def _ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def trained(kit, tmp_path_factory):
    """A LoRA + embedding as training leaves them (non-zero up weights, moved vectors), exported."""
    from peft import LoraConfig

    torch.manual_seed(0)
    base = load_base(str(kit.tiny_sd))
    vectors = install_trigger(base.tokenizer, base.text_encoder, TRIGGER, VECTORS, "1girl", seed=0)
    with torch.no_grad():
        vectors.add_(torch.randn_like(vectors) * 0.5)
    base.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TrainSettings().lora_targets))
    for name, param in base.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("export")
    tensors = unet_lora_tensors(base.unet, ALPHA)
    meta = lora_metadata(
        output_name=TRIGGER, trigger=TRIGGER, rank=RANK, alpha=ALPHA, steps=10, resolution=128, clip_skip=2,
        num_train_images=5, tag_frequency={"dataset": {TRIGGER: 5}}, base_model_name="tiny", seed=0, tensors=tensors,
    )  # fmt: skip
    write_safetensors(folder / "lora.safetensors", tensors, meta)
    write_safetensors(folder / "bundled.safetensors", {**tensors, **bundle_tensors(TRIGGER, vectors)}, meta)
    write_embedding_safetensors(folder / "emb.safetensors", vectors)
    write_a1111_pt(folder / "emb.pt", TRIGGER, vectors, 10, "tiny")

    ids = _ids(base.tokenizer, expand_trigger(PROMPT, TRIGGER, VECTORS))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        text = encode_text(base.text_encoder, ids, clip_skip=2)
        unet_out = base.unet(latents, timesteps, text.expand(2, -1, -1)).sample
    return {"folder": folder, "ids": ids, "text": text, "latents": latents, "timesteps": timesteps, "unet": unet_out, "vectors": vectors.detach().clone()}


@pytest.mark.parametrize("embedding_file", ["emb.safetensors", "emb.pt"])
def test_diffusers_loaders_reproduce_training_outputs(kit, trained, embedding_file):
    pipe = load_pipeline(str(kit.tiny_sd))
    pipe.load_lora_weights(str(trained["folder"] / "lora.safetensors"))
    pipe.load_textual_inversion(str(trained["folder"] / embedding_file), token=TRIGGER)
    ids = _ids(pipe.tokenizer, pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer))
    assert torch.equal(ids, trained["ids"])  # the trigger expands to the same tokens
    with torch.no_grad():
        text = encode_text(pipe.text_encoder, ids, clip_skip=2)
        torch.testing.assert_close(text, trained["text"], atol=1e-5, rtol=1e-4)
        unet_out = pipe.unet(trained["latents"], trained["timesteps"], text.expand(2, -1, -1)).sample
        torch.testing.assert_close(unet_out, trained["unet"], atol=1e-5, rtol=1e-4)
        pipe.unload_lora_weights()
        without = pipe.unet(trained["latents"], trained["timesteps"], text.expand(2, -1, -1)).sample
    assert (without - trained["unet"]).abs().max() > 1e-3  # the LoRA really changes the output


def test_kohya_file_layout_and_metadata(trained):
    with safe_open(str(trained["folder"] / "lora.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in keys}
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= keys
    assert any("_ff_net_0_proj." in k for k in keys) and any("_proj_in." in k for k in keys)
    assert all(k.startswith("lora_unet_") for k in keys)
    assert tensors[f"{prefix}.lora_down.weight"].shape[0] == RANK and float(tensors[f"{prefix}.alpha"]) == ALPHA
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.trigger_phrase"] == TRIGGER
    assert json.loads(meta["ss_tag_frequency"])["dataset"][TRIGGER] == 5
    assert meta["sshs_model_hash"] == tensors_hash(tensors)
    with safe_open(str(trained["folder"] / "bundled.safetensors"), "pt") as handle:
        bundled = handle.get_tensor(f"bundle_emb.{TRIGGER}.string_to_param.*")
    torch.testing.assert_close(bundled, trained["vectors"])


def test_a1111_pt_layout(trained):
    data = torch.load(trained["folder"] / "emb.pt", weights_only=True)
    assert list(data["string_to_param"]) == ["*"] and data["name"] == TRIGGER
    assert data["string_to_param"]["*"].shape == (VECTORS, 32)
