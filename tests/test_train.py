"""Trainer behaviour on the tiny model: exact resume, options that change the update, validation loss."""

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import check_tensorboard, demo_settings, fresh_compile_counters
from lorafactory.errors import ConfigError, StageError
from lorafactory.progress import SilentProgress
from lorafactory.train.model import load_pipeline
from lorafactory.train.trainer import EMBEDDING_FILE, LORA_FILE, checkpoint_dir, train


@pytest.fixture(scope="module")
def dataset(prepared):
    return prepared.artifact("prepare")


def _settings(kit, *extra):
    return demo_settings(kit, "http://127.0.0.1:1", "train.max_steps=8", "train.save_every=4", *extra)


class _CastCounter(TorchDispatchMode):
    """Counts the dtype casts (``aten::_to_copy``) that reach the kernels while it is on, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def _weights(out, step):
    folder = checkpoint_dir(out, step)
    return {**load_file(folder / LORA_FILE), **{"emb": load_file(folder / EMBEDDING_FILE)["emb_params"]}}


def test_stopped_and_resumed_equals_straight_through(kit, dataset, tmp_path):
    settings = _settings(
        kit,
        "train.noise_offset=0.05",
        "train.tag_dropout=0.2",
        "train.flip=true",
        "train.text_encoder_lora_rank=2",
        "train.batch_size=12",  # epochs of 2-4 steps: the resumed half starts an epoch from saved leftovers
    )
    straight = train(settings, "akane_hoshino", dataset, tmp_path / "straight", SilentProgress())
    first = train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress(), stop_after=4)
    assert not first.finished and list(first.checkpoints) == [4]
    saved = torch.load(tmp_path / "resumed" / "state" / "state.pt", weights_only=False)["position"]
    assert saved.waiting, "the stop should leave bucket leftovers waiting for the next epoch"
    second = train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress())
    assert second.finished and list(second.checkpoints) == [4, 8]
    assert second.details["resumed_at"] == [4] and straight.details["resumed_at"] == []
    a, b = _weights(tmp_path / "straight", 8), _weights(tmp_path / "resumed", 8)
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert straight.details["validation_loss"] == second.details["validation_loss"]
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 9))
    check_tensorboard(tmp_path / "resumed" / "tensorboard", steps=8, checkpoints=[4, 8])


def test_resuming_with_other_settings_is_refused_but_a_newer_setting_at_its_default_resumes(kit, dataset, tmp_path):
    """The saved state records the train settings. One it lacks was added to lorafactory since it was saved:
    at its default it changes nothing, so an upgrade does not strand an interrupted training."""
    train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress(), stop_after=4)
    with pytest.raises(StageError, match=r"made with other train settings \(train.unet_lr 0.001 → 0.5\); restore"):
        train(_settings(kit, "train.unet_lr=0.5"), "akane_hoshino", dataset, tmp_path, SilentProgress())
    state = tmp_path / "state" / "state.json"
    saved = json.loads(state.read_text())
    older = {**saved, "settings": {k: v for k, v in saved["settings"].items() if k != "resolution"}}
    state.write_text(json.dumps(older))  # the preset's 128 px is not resolution's default, 512
    with pytest.raises(StageError, match=r"train.resolution 512 \(its default; the setting is newer\) → 128"):
        train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress())
    older = {**saved, "settings": {k: v for k, v in saved["settings"].items() if k != "noise_offset"}}
    state.write_text(json.dumps(older))  # noise_offset is at its default, 0
    resumed = train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress())
    assert resumed.finished and resumed.details["resumed_at"] == [4]
    with pytest.raises(StageError, match="made with a different dataset, regularization set or trigger"):
        train(_settings(kit), "someone_else", dataset, tmp_path, SilentProgress())


def test_a_truncated_training_state_says_force_train(kit, dataset, tmp_path):
    train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress(), stop_after=4)
    state = tmp_path / "state" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(StageError, match=r"training state .* is damaged .*--force train"):
        train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress())


@pytest.mark.parametrize(
    "override, match",
    [
        ('train.lora_targets=["nope"]', "train.lora_targets"),
        ('train.text_encoder_lora_targets=["nope"]', "train.text_encoder_lora_targets"),
    ],
)
def test_targets_matching_no_layer_are_a_config_error(kit, dataset, tmp_path, override, match):
    settings = _settings(kit, override, "train.text_encoder_lora_rank=2")
    with pytest.raises(ConfigError, match=rf"{match} \['nope'\] matched no"):
        train(settings, "akane_hoshino", dataset, tmp_path, SilentProgress())


def test_a_garbage_single_file_base_model_is_a_config_error(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ConfigError, match="cannot load base model .*check train.base_model"):
        load_pipeline(str(garbage))


def test_a_half_precision_base_model_loads_in_that_precision_without_a_deprecation_warning(kit, tmp_path):
    """Evaluation loads the base in the training precision, from a folder or a single file: every component
    in bf16, and none of diffusers' FutureWarnings that an argument is going away (a GPU run printed one each time)."""
    import warnings

    from lorafactory.testing.single_file import write_ldm_checkpoint

    single = write_ldm_checkpoint(kit.tiny_sd, tmp_path / "tiny-original.safetensors")
    for source, config in ((str(kit.tiny_sd), ""), (str(single), str(kit.tiny_sd))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = load_pipeline(source, torch.bfloat16, config)
        assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)], source
        assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16, source


def test_pivot_freezes_the_embedding(kit, dataset, tmp_path):
    train(_settings(kit, "train.embedding_pivot=0.5"), "akane_hoshino", dataset, tmp_path, SilentProgress())
    at_pivot, end = _weights(tmp_path, 4), _weights(tmp_path, 8)
    assert torch.equal(at_pivot["emb"], end["emb"])
    key = next(k for k in end if k.endswith("lora_up.weight"))
    assert not torch.equal(at_pivot[key], end[key])  # the LoRA kept training


def test_options_run_and_validation_is_reported(kit, dataset, tmp_path):
    settings = _settings(
        kit,
        "train.min_snr_gamma=5.0",
        "train.gradient_checkpointing=true",
        "train.gradient_accumulation=2",
        'train.lr_scheduler="cosine"',
        'train.prediction_type="v_prediction"',
        "train.zero_terminal_snr=true",
        "train.group_repeats={head = 2}",
        "train.group_loss_weights={person = 0.5}",
        "train.keep_tokens=1",
        f'train.latent_cache_dir="{tmp_path / "latents"}"',
        "train.validation_split=0.1",
    )
    result = train(settings, "akane_hoshino", dataset, tmp_path / "out", SilentProgress())
    assert result.details["prediction_type"] == "v_prediction"
    assert result.counts["validation_images"] > 0
    losses = result.details["validation_loss"]
    assert set(losses) == {"4", "8"} and set(losses["4"]) == {"t200", "t400", "t600", "t800", "mean"}
    up = next(v for k, v in _weights(tmp_path / "out", 8).items() if k.endswith("lora_up.weight"))
    assert up.abs().sum() > 0  # gradients reached the LoRA through checkpointing and accumulation
    cached = list((tmp_path / "latents").glob("*.pt"))
    assert cached and result.counts["latents_encoded"] == len(cached)
    again = train(settings, "akane_hoshino", dataset, tmp_path / "out2", SilentProgress())
    assert again.counts["latents_encoded"] == 0  # every latent came from the disk cache


def test_sdxl_trains_and_evaluates(kit, dataset, tmp_path):
    from conftest import KIT_ROOT
    from lorafactory.evaluate.evaluator import evaluate
    from lorafactory.testing.tiny_sd import build_tiny_sdxl

    model = build_tiny_sdxl(KIT_ROOT / "tiny-sdxl")
    settings = _settings(
        kit, f'train.base_model="{model}"', "train.max_steps=4", "train.save_every=2", "train.validation_split=0.1"
    )
    result = train(settings, "akane_hoshino", dataset, tmp_path / "train", SilentProgress())
    assert result.details["family"] == "sdxl" and list(result.checkpoints) == [2, 4]
    assert set(result.details["validation_loss"]["4"]) >= {"mean"}
    evaluation = evaluate(
        settings,
        "akane_hoshino",
        dataset,
        tmp_path / "train",
        result.checkpoints,
        {},
        tmp_path / "eval",
        SilentProgress(),
    )
    assert evaluation.counts["failed_checkpoints"] == 0 and evaluation.selection.best in (2, 4)
    assert all(m["ccip_recscore"] is not None and m["validation_loss"] is None for m in evaluation.table.values())
    images = [p for p in (tmp_path / "eval" / "steps").rglob("*.png") if p.name != "grid.png"]
    assert len(images) == 2 * evaluation.counts["images_per_checkpoint"]


def test_uncached_latents_train_the_same_model(kit, dataset, tmp_path):
    cached = train(_settings(kit), "akane_hoshino", dataset, tmp_path / "cached", SilentProgress())
    uncached = train(
        _settings(kit, "train.cache_latents=false"), "akane_hoshino", dataset, tmp_path / "uncached", SilentProgress()
    )
    assert (
        cached.counts["latents_encoded"] > 0
        and uncached.counts["latents_encoded"] == uncached.counts["validation_images"]
    )
    a, b = _weights(tmp_path / "cached", 8), _weights(tmp_path / "uncached", 8)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_regularization_images_and_fixed_buckets_train(kit, dataset, tmp_path):
    from lorafactory.testing.synthetic import CHARACTERS, generate_dataset

    folder = tmp_path / "reg"
    made = generate_dataset(folder / "images", CHARACTERS[2], count=3, monochrome=0, near_duplicates=0, others=0)
    (folder / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file": f"images/{m.filename}", "tags": ["1girl", "solo"], "post_id": m.filename}) + "\n"
            for m in made
        )
    )
    settings = _settings(
        kit, f'train.regularization_dir="{folder}"', "train.prior_loss_weight=0.5", 'train.bucket_mode="fixed"'
    )
    result = train(settings, "akane_hoshino", dataset, tmp_path / "out", SilentProgress())
    assert result.counts["regularization_images"] == 3
    assert all(int(w) * int(h) <= 128 * 128 for w, h in (b.split("x") for b in result.details["buckets"]))
    with safe_open(str(checkpoint_dir(tmp_path / "out", 8) / LORA_FILE), "pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == str(result.counts["images"])  # the character's images only
    with pytest.raises(StageError, match="not a prepared dataset"):
        train(
            _settings(kit, f'train.regularization_dir="{tmp_path}"'),
            "akane_hoshino",
            dataset,
            tmp_path / "bad",
            SilentProgress(),
        )


def test_prodigy_trains(kit, dataset, tmp_path):
    result = train(
        _settings(kit, 'train.optimizer="prodigy"', "train.unet_lr=1.0", "train.embedding_lr=1.0"),
        "akane_hoshino",
        dataset,
        tmp_path / "p",
        SilentProgress(),
    )
    assert result.finished and all(torch.isfinite(v).all() for v in _weights(tmp_path / "p", 8).values())


def test_adamw8bit_trains_and_resumes_exactly(kit, dataset, tmp_path):
    """bitsandbytes' 8-bit AdamW (CPU backend here): its quantized state survives a stop and resume."""
    pytest.importorskip("bitsandbytes")
    settings = _settings(
        kit, 'train.optimizer="adamw8bit"', "train.lora_rank=64"
    )  # LoRA matrices big enough (4096+) for 8-bit state
    straight = train(settings, "akane_hoshino", dataset, tmp_path / "straight", SilentProgress())
    train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress(), stop_after=4)
    train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress())
    adamw = train(_settings(kit, "train.lora_rank=64"), "akane_hoshino", dataset, tmp_path / "adamw", SilentProgress())
    a, b, c = (_weights(tmp_path / name, 8) for name in ("straight", "resumed", "adamw"))
    assert straight.finished and adamw.finished
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(
        not torch.allclose(a[key], c[key]) for key in a
    )  # quantized moments give a different update than float AdamW
    state = torch.load(tmp_path / "resumed" / "state" / "state.pt", weights_only=False)["optimizer"]["state"]
    quantized = [
        v
        for s in state.values()
        for v in s.get("__bnb_optimizer_quant_state__", {}).values()
        if isinstance(v, torch.Tensor)
    ]
    assert any(v.dtype == torch.uint8 for v in quantized)  # the saved moments really are 8-bit


def test_out_of_memory_names_the_settings_to_lower(kit, dataset, tmp_path, monkeypatch):
    """The GPU running out of memory (simulated at that edge) becomes a one-line, actionable error."""
    from lorafactory.train import trainer

    def no_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer._Run, "predict", no_memory)
    with pytest.raises(StageError, match="lower train.batch_size or train.resolution.*gradient_checkpointing"):
        train(_settings(kit), "akane_hoshino", dataset, tmp_path, SilentProgress())


def test_single_file_base_model_trains_like_its_folder(kit, dataset, tmp_path):
    """An original-format .safetensors base (loaded with diffusers' from_single_file) gives the same run."""
    from lorafactory.testing.single_file import write_ldm_checkpoint

    single = write_ldm_checkpoint(kit.tiny_sd, tmp_path / "base" / "tiny-original.safetensors")
    train(_settings(kit), "akane_hoshino", dataset, tmp_path / "folder", SilentProgress())
    from_file = _settings(kit, f'train.base_model="{single}"', f'train.base_config="{kit.tiny_sd}"')
    result = train(from_file, "akane_hoshino", dataset, tmp_path / "file", SilentProgress())
    a, b = _weights(tmp_path / "folder", 8), _weights(tmp_path / "file", 8)
    assert result.finished and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    with safe_open(str(checkpoint_dir(tmp_path / "file", 8) / LORA_FILE), "pt") as handle:
        assert handle.metadata()["ss_sd_model_name"] == "tiny-original.safetensors"


class _RecordedProgress(SilentProgress):
    def __init__(self):
        self.advanced, self.notes = {}, []

    @contextmanager
    def task(self, description, total):
        advanced = self.advanced

        class _Task:
            def advance(self, amount=1):
                advanced[description] = advanced.get(description, 0) + amount

        yield _Task()

    def note(self, message):
        self.notes.append(message)


@pytest.mark.slow
def test_two_processes_train_what_one_does_with_double_accumulation(kit, dataset, tmp_path):
    """torch.distributed workers (gloo on CPU): 2 processes x accumulation 1, stopped at step 4 and
    resumed, give the weights of 1 process x accumulation 2 straight through."""
    single = train(
        _settings(kit, "train.gradient_accumulation=2"), "akane_hoshino", dataset, tmp_path / "one", SilentProgress()
    )
    from lorafactory.launch import torchrun

    two = _settings(kit, "train.num_processes=2", 'train.device="cpu"')
    progress = _RecordedProgress()
    first = torchrun.train(two, "akane_hoshino", dataset, tmp_path / "two", progress, stop_after=4)
    assert (
        not first.finished and first.checkpoints == {4: "checkpoints/step-000004"} and first.details["processes"] == 2
    )
    assert progress.advanced["training"] == 4 and progress.notes == ["training on 2 processes"]
    second = torchrun.train(two, "akane_hoshino", dataset, tmp_path / "two", progress)
    assert second.finished and list(second.checkpoints) == [4, 8] and progress.advanced["training"] == 4 + 8
    a, b = _weights(tmp_path / "one", 8), _weights(tmp_path / "two", 8)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    for step, losses in single.details["validation_loss"].items():
        assert second.details["validation_loss"][step] == pytest.approx(losses, rel=1e-5)
    assert not (tmp_path / "two" / "distributed_job.json").exists()


@pytest.mark.slow
def test_distributed_errors_reach_the_caller(kit, dataset, tmp_path):
    from lorafactory.errors import ConfigError
    from lorafactory.launch import torchrun

    with pytest.raises(ConfigError, match="through lorafactory.launch.torchrun"):  # the trainer never launches
        train(_settings(kit, "train.num_processes=2"), "akane_hoshino", dataset, tmp_path, SilentProgress())
    with pytest.raises(ConfigError, match="train.num_processes = 2"):
        torchrun.train(
            _settings(kit, "train.num_processes=2", 'train.device="cuda"'),
            "akane_hoshino",
            dataset,
            tmp_path,
            SilentProgress(),
        )
    bad = _settings(kit, "train.num_processes=2", 'train.device="cpu"', f'train.regularization_dir="{tmp_path}"')
    with pytest.raises(
        StageError, match="not a prepared dataset"
    ):  # raised inside the workers, relayed by the launcher
        torchrun.train(bad, "akane_hoshino", dataset, tmp_path / "out", SilentProgress())


def test_long_captions_are_encoded_in_chunks_of_75_tokens(kit):
    """As kohya and A1111 do: BOS + 75 tokens + EOS per chunk; a short prompt is the usual 77 tokens."""
    from lorafactory.train.embedding import encode_text
    from lorafactory.train.model import load_pipeline
    from lorafactory.train.text import encode_prompts

    pipe = load_pipeline(str(kit.tiny_sd))
    tok, enc, cpu = pipe.tokenizer, pipe.text_encoder, torch.device("cpu")

    def ours(texts, chunks):
        return encode_prompts("sd1", [tok], [enc], texts, 2, cpu, chunks).hidden

    with torch.no_grad():
        plain = encode_text(
            enc, tok(["1girl, smile"], padding="max_length", max_length=77, return_tensors="pt").input_ids, 2
        )
        assert torch.equal(ours(["1girl, smile"], 1), plain) and torch.equal(ours(["1girl, smile"], None), plain)
        long_red, long_blue = (", ".join(["smile"] * 60 + [hair]) for hair in ("red hair", "blue hair"))
        assert len(tok(long_red, add_special_tokens=False).input_ids) > 75
        red, blue = ours([long_red], 3), ours([long_blue], 3)
        assert red.shape == (1, 154, plain.shape[-1])
        assert torch.equal(red[:, :77], blue[:, :77]) and not torch.allclose(
            red[:, 77:], blue[:, 77:]
        )  # the tail is seen
        assert torch.equal(ours([long_red], 1), ours([long_blue], 1))  # one chunk: the tail is cut
        passes = []
        hook = enc.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
        mixed = ours(["1girl, smile", long_red], 3)
        hook.remove()
        assert passes == [4]  # both chunks of both texts in one pass of the encoder
        empty = encode_text(enc, torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [tok.pad_token_id] * 75]), 2)
        assert mixed.shape[1] == 154 and torch.equal(mixed[:1, :77], plain) and torch.equal(mixed[:1, 77:], empty)
        assert torch.equal(mixed[1:], red)  # each text's chunks, in order, as when encoded alone


def _logged_losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_the_fused_optimizer_trains_what_the_per_tensor_one_does(kit, dataset, tmp_path):
    """The fused AdamW kernel is the default; over 8 steps its losses and weights match PyTorch's per-tensor
    AdamW within float32 rounding (1e-5 relative)."""
    fused = train(_settings(kit), "akane_hoshino", dataset, tmp_path / "fused", SilentProgress())
    plain = train(
        _settings(kit, "train.fused_optimizer=false"), "akane_hoshino", dataset, tmp_path / "plain", SilentProgress()
    )
    assert fused.counts["steps"] == plain.counts["steps"] == 8
    assert _logged_losses(tmp_path / "fused") == pytest.approx(_logged_losses(tmp_path / "plain"), rel=1e-5)
    a, b = _weights(tmp_path / "fused", 8), _weights(tmp_path / "plain", 8)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_lora_layers_under_autocast_skip_the_input_casts_and_train_the_same_bits(kit, dataset, tmp_path, monkeypatch):
    """With bf16 autocast (as on a GPU), peft's cast of each LoRA input to float32 and autocast's cast back are
    skipped: fewer operators per step, and losses and weights equal bit for bit to the casting run's."""
    from lorafactory.train import trainer

    def steps(folder):
        run = trainer._Run(
            _settings(kit, 'train.mixed_precision="bf16"'), "akane_hoshino", dataset, folder, SilentProgress()
        )
        losses = [float(run.step()) for _ in range(3)]
        with _CastCounter() as counter:
            losses.append(float(run.step()))
        return losses, {k: v.detach().clone() for k, v in run.trainables.items()}, counter.casts

    lean = steps(tmp_path / "lean")
    monkeypatch.setattr(trainer, "skip_lora_input_casts", lambda *modules: None)
    casting = steps(tmp_path / "casting")
    assert lean[0] == casting[0]
    assert lean[1].keys() == casting[1].keys() and all(torch.equal(lean[1][k], casting[1][k]) for k in lean[1])
    assert lean[2] < casting[2]


def test_cudnn_attention_is_kept_out_of_training_unless_allowed(kit, dataset, tmp_path):
    """Every UNet pass of a step and of the validation runs with cuDNN's attention as train.cudnn_attention
    says (cuDNN plans each new shape anew: costly over many buckets); the process's own choice is restored."""
    from lorafactory.train.trainer import _Run

    run = _Run(_settings(kit, "train.validation_split=0.3"), "akane_hoshino", dataset, tmp_path, SilentProgress())
    seen: list[bool] = []
    run.base.unet.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    for allowed in (False, True):  # a runtime setting: read at every pass
        run.t.cudnn_attention = allowed
        seen.clear()
        run.step()
        run.validate()
        assert len(seen) >= 2 and set(seen) == {allowed}
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_without_autocast_half_precision_copies_of_float32_masters_train_what_autocast_does(kit, dataset, tmp_path):
    """train.autocast=false: the modules hold bf16 working copies, the optimizer steps float32 masters, nothing
    runs under autocast and the casts are gone. CPU autocast keeps norms in bf16 too, so here the two runs
    must agree bit for bit (on CUDA autocast's float32 norms differ slightly), and so must the exports, which
    come from the float32 masters, not the bf16 copies."""
    from lorafactory.train.trainer import _Run

    def run(folder, autocast):
        settings = _settings(
            kit,
            'train.mixed_precision="bf16"',
            "train.text_encoder_lora_rank=4",
            "train.gradient_accumulation=2",
            f"train.autocast={str(autocast).lower()}",
        )
        live = _Run(settings, "akane_hoshino", dataset, folder, SilentProgress())
        seen: list[bool] = []
        live.base.unet.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        losses = [float(live.step()) for _ in range(3)]
        with _CastCounter() as counter:
            losses.append(float(live.step()))
        live.checkpoint()
        return live, losses, set(seen), counter.casts, load_file(checkpoint_dir(folder, 4) / LORA_FILE)

    mixed = run(tmp_path / "autocast", True)
    half = run(tmp_path / "half", False)
    assert mixed[2] == {True} and half[2] == {False}
    assert half[1] == mixed[1]
    masters, params = half[0].trainables, mixed[0].trainables
    assert masters.keys() == params.keys() and all(torch.equal(masters[k], params[k]) for k in masters)
    assert all(m.dtype == torch.float32 for m in masters.values())
    working = [p for p in half[0].base.unet.parameters() if p.requires_grad]
    assert working and all(p.dtype == torch.bfloat16 for p in working)
    assert half[3] < mixed[3] - 300  # a cast per LoRA weight and per gradient, each micro-batch
    exported = half[4]
    assert exported.keys() == mixed[4].keys() and all(torch.equal(exported[k], mixed[4][k]) for k in exported)
    up = next(t for k, t in exported.items() if k.endswith("lora_up.weight"))
    assert up.dtype == torch.float32 and not torch.equal(up.to(torch.bfloat16).float(), up)  # not the bf16 copy


def test_master_weights_sum_each_micro_batch_in_float32_and_copy_back():
    """A master's gradient is the float32 sum of its working copy's gradients over the step's micro-batches,
    also for a weight that got none in the first; after the step the working copies follow the masters, and
    the next step starts its sums afresh."""
    from lorafactory.train.master import MasterWeights

    a = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    masters = MasterWeights({"a": a, "b": b}, torch.bfloat16)
    ma, mb = masters.masters["a"], masters.masters["b"]
    assert a.dtype == b.dtype == torch.bfloat16 and ma.dtype == mb.dtype == torch.float32
    assert torch.equal(ma, torch.tensor([0.1, 0.2, 0.3]))  # the float32 values, not the bf16-rounded copy's
    (a * 2).sum().backward()  # micro-batch 1: only a
    masters.gather_gradients()
    assert a.grad is None and mb.grad is None and torch.equal(ma.grad, torch.full((3,), 2.0))
    ((a + b.sum()) * 3).sum().backward()  # micro-batch 2: a and b
    masters.gather_gradients()
    assert torch.equal(ma.grad, torch.full((3,), 5.0)) and torch.equal(mb.grad, torch.full((2,), 9.0))
    optimizer = torch.optim.SGD([ma, mb], lr=0.01)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    masters.publish()
    assert torch.equal(a, ma.to(torch.bfloat16)) and torch.equal(b, mb.to(torch.bfloat16))
    assert masters.master_of(a) is ma and masters.master_of(ma) is ma
    b.sum().backward()  # the next step's first micro-batch: a copy, not added to the last step's sums
    masters.gather_gradients()
    assert ma.grad is None and torch.equal(mb.grad, torch.ones(2))


def test_without_autocast_a_stopped_run_resumes_exactly(kit, dataset, tmp_path):
    """The saved state holds the float32 masters; a resumed run copies them into its bf16 working copies."""
    settings = _settings(kit, 'train.mixed_precision="bf16"', "train.autocast=false", "train.text_encoder_lora_rank=2")
    straight = train(settings, "akane_hoshino", dataset, tmp_path / "straight", SilentProgress())
    first = train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress(), stop_after=4)
    assert not first.finished
    train(settings, "akane_hoshino", dataset, tmp_path / "resumed", SilentProgress())
    assert _logged_losses(tmp_path / "resumed") == _logged_losses(tmp_path / "straight")
    a, b = _weights(tmp_path / "straight", 8), _weights(tmp_path / "resumed", 8)
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.details["dtype"] == "bfloat16"


def test_a_channels_last_unet_trains_what_the_default_layout_does(kit, dataset, tmp_path):
    """train.channels_last keeps every UNet convolution (the LoRA's too) in NHWC through training; the losses
    match the default layout's and the exported weights come out in the ordinary layout."""
    from lorafactory.train.trainer import _Run

    def run(folder, channels_last):
        targets = "train.lora_targets=['to_q', 'to_v', 'proj_in', 'conv1']"
        settings = _settings(kit, targets, f"train.channels_last={str(channels_last).lower()}")
        live = _Run(settings, "akane_hoshino", dataset, folder, SilentProgress())
        losses = [float(live.step()) for _ in range(4)]
        live.checkpoint()
        convs = [p for p in live.base.unet.parameters() if p.ndim == 4 and p.shape[-1] > 1]
        layout = {p.is_contiguous(memory_format=torch.channels_last) for p in convs}
        lora = [p for n, p in live.base.unet.named_parameters() if "lora_" in n and p.ndim == 4]
        return losses, layout, lora, load_file(checkpoint_dir(folder, 4) / LORA_FILE)

    plain, nhwc = run(tmp_path / "plain", False), run(tmp_path / "nhwc", True)
    assert nhwc[1] == {True} and plain[1] == {False}
    assert nhwc[2] and all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc[2])
    assert nhwc[0] == pytest.approx(plain[0], rel=1e-4)
    a, b = plain[3], nhwc[3]
    assert a.keys() == b.keys() and all(b[k].is_contiguous() for k in b)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6) for k in a)


def test_gradient_checkpointing_trains_what_a_run_without_it_does(kit, dataset, tmp_path):
    """train.gradient_checkpointing recomputes activations in the backward pass instead of keeping them: the
    same losses and weights, which is why it is a runtime setting (the fleet turns it on after running out of
    GPU memory, and that makes no artifact out of date)."""
    from lorafactory.train.trainer import _Run

    def run(folder, checkpointing):
        settings = _settings(kit, f"train.gradient_checkpointing={str(checkpointing).lower()}")
        live = _Run(settings, "akane_hoshino", dataset, folder, SilentProgress())
        losses = [float(live.step()) for _ in range(3)]
        live.checkpoint()
        return losses, live.base.unet.is_gradient_checkpointing, load_file(checkpoint_dir(folder, 3) / LORA_FILE)

    plain, recomputed = run(tmp_path / "plain", False), run(tmp_path / "recomputed", True)
    assert recomputed[1] and not plain[1]
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    a, b = plain[2], recomputed[2]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_validation_runs_batched_and_gives_the_per_pair_losses(kit, dataset, tmp_path):
    """A checkpoint's validation loss goes through the UNet in batches of train.batch_size (one latent shape
    per batch) and equals the loss computed one (image, timestep) pair at a time."""
    from lorafactory.train.trainer import _Run

    run = _Run(_settings(kit, "train.validation_split=0.3"), "akane_hoshino", dataset, tmp_path, SilentProgress())
    run.step()
    calls: list[int] = []
    run.base.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    run.t.batch_size = 1
    one_by_one = run.validate()
    pairs = len(run.validation.examples) * len(run.t.validation_timesteps)
    assert calls == [1] * pairs and pairs >= 8
    calls.clear()
    run.t.batch_size = 4
    batched = run.validate()
    shapes = {tuple(ex.latent.shape) for ex in run.validation.examples}
    assert sum(calls) == pairs and len(calls) < pairs and max(calls) == 4 and len(calls) <= pairs // 4 + len(shapes)
    assert batched.keys() == one_by_one.keys() == {"t200", "t400", "t600", "t800", "mean"}
    assert batched == pytest.approx(one_by_one, rel=1e-5)


def test_losses_are_read_back_in_batches_and_a_diverged_one_stops_the_run_naming_its_step(tmp_path):
    from lorafactory.train.steplog import SETTLE_EVERY, StepLog

    losses: list[float] = []
    with (tmp_path / "log.jsonl").open("w", encoding="utf-8") as log_file:
        log = StepLog(losses, log_file, None)
        for step in range(1, SETTLE_EVERY):
            log.add(step, torch.tensor(float(step)), {"lora": 1e-4, "embedding": 3e-3}, 1, step / 10)
        assert losses == [] and (tmp_path / "log.jsonl").read_text() == ""  # nothing read from the device yet
        log.add(SETTLE_EVERY, torch.tensor(0.5), {"lora": 1e-4, "embedding": 3e-3}, 2, 9.0)
        assert losses == [*map(float, range(1, SETTLE_EVERY)), 0.5]
        log.add(SETTLE_EVERY + 1, torch.tensor(float("nan")), {"lora": 1e-4}, 2, 9.5)
        with pytest.raises(StageError, match=f"loss became nan at step {SETTLE_EVERY + 1}; lower train.unet_lr"):
            log.settle()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, SETTLE_EVERY + 1)) and records[0]["lr"] == 1e-4


def test_cached_latents_move_to_the_device_only_within_the_budget():
    from lorafactory.train.data import Example, make_resident

    def example():
        return Example("a.png", "head", "a", [], (64, 64), torch.zeros(4, 8, 8), (64, 64), (0, 0), torch.ones(4, 8, 8))

    examples = [example(), example()]
    assert not make_resident(examples, torch.device("meta"), budget=4 * 8 * 8 * 4 * 4 - 1)
    assert all(ex.latent.device.type == "cpu" for ex in examples)
    assert make_resident(examples, torch.device("meta"), budget=4 * 8 * 8 * 4 * 4)
    assert all(ex.latent.is_meta and ex.flipped.is_meta for ex in examples)


COMPILED = ("train.compile=true", 'train.compile_backend="aot_eager"')  # graph capture, no code generation


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    """Nine images in three buckets at 192 px, each captioned in one 75-token chunk or in two: the shapes that
    reach a compiled UNet's blocks change from step to step, as on a crawled dataset. At 192 px every side
    stays above 1 at the tiny UNet's deepest level (dynamo compiles a side of 1 apart)."""
    import random

    from lorafactory.testing.synthetic import CHARACTERS

    folder = tmp_path_factory.mktemp("mixed-shapes")
    (folder / "images").mkdir()
    long = [f"{colour} {item}" for item in ("dress", "skirt", "coat", "hat") for colour in ("red", "blue", "green")]
    lines = []
    for i, size in enumerate([(192, 192), (288, 192), (192, 288)] * 3):
        CHARACTERS[0].draw(*size, outfit=i % 3, rng=random.Random(i)).save(folder / "images" / f"{i}.png")
        tags = ["1girl", "solo", "smile"] if i % 2 else ["1girl", *long, *long]
        lines.append(json.dumps({"file": f"images/{i}.png", "tags": tags, "post_id": str(i)}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def test_a_compiled_unet_trains_what_the_eager_one_does_and_is_compiled_once_per_process(kit, mixed_shapes, tmp_path):
    """train.compile compiles each transformer block in place, LoRA layers inside; the quick aot_eager backend
    checks the graph capture here (the GPU session times inductor). On images of three buckets with captions of
    one and two chunks, losses agree with eager to 1e-5 and exports are alike.
    The compile is paid once (one compile for the whole test, which is its cost):
    - sizes are symbolic from the first step (train.compile_dynamic): the first step compiles a graph per block
      width, and those graphs serve the later buckets and caption lengths, the first bucket's equal sides
      included (duck sizing off); without it each size that changes compiles every width again (7 graphs here);
    - a fleet's GPU worker trains model after model in one process: a later run's UNet (new weights, new LoRA)
      goes through the graphs the first run compiled;
    - a checkpoint's held-out loss runs eager (its no-grad passes over the held-out shapes and smaller last
      batches would each be compiled for a few passes), and measures what an eager run's validation measures."""
    from lorafactory.train.trainer import _Run

    steps = 6
    short = ("train.resolution=192", "train.batch_size=1", f"train.max_steps={steps}", f"train.save_every={steps}")
    short += ("train.validation_split=0.3",)  # a checkpoint, with its validation, at the last step
    counters = fresh_compile_counters()
    first = _Run(
        _settings(kit, *short, *COMPILED), "akane_hoshino", mixed_shapes, tmp_path / "first", SilentProgress()
    )
    blocks = [m for m in first.base.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    widths = len({block.norm1.normalized_shape for block in blocks})
    met = set()  # (latent height, latent width, caption tokens) of each step
    first.base.unet.register_forward_pre_hook(lambda unet, args: met.add((*args[0].shape[-2:], args[2].shape[1])))
    first.step()
    assert counters["stats"]["unique_graphs"] == widths  # one graph per block width
    for _ in range(steps - 1):
        first.step()
    assert len({(height, width) for height, width, _ in met}) == 3 and {tokens for *_, tokens in met} == {77, 154}, met
    assert counters["stats"]["unique_graphs"] == widths, dict(counters["stats"])  # nothing compiled after step 1
    # every shape the run met went through a compiled graph: none fell back to eager
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters["frames"])
    frames = counters["frames"]["total"]
    loss = first.validate()
    assert counters["frames"]["total"] == frames  # the held-out shapes, met here first, were not compiled
    eager = train(_settings(kit, *short), "akane_hoshino", mixed_shapes, tmp_path / "eager", SilentProgress())
    assert loss == pytest.approx(eager.details["validation_loss"][str(steps)], rel=1e-4)

    counters.clear()
    later = train(
        _settings(kit, *short, *COMPILED), "akane_hoshino", mixed_shapes, tmp_path / "later", SilentProgress()
    )
    assert not counters["frames"]["total"], dict(counters["frames"])  # a new UNet and LoRA, and nothing compiled
    assert later.counts["steps"] == eager.counts["steps"]
    assert _logged_losses(tmp_path / "later") == pytest.approx(_logged_losses(tmp_path / "eager"), rel=1e-5)
    a, b = _weights(tmp_path / "eager", steps), _weights(tmp_path / "later", steps)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
