import pytest

from lorafactory.config import PRESETS, Settings, load_settings, parse_override, settings_hash, to_toml, tomllib
from lorafactory.errors import ConfigError


def test_defaults_come_from_the_sd15_anime_preset():
    settings = load_settings()
    assert settings.preset == "sd15-anime"
    assert settings.train.clip_skip == 2 and settings.train.embedding_vectors == 4
    assert settings.evaluate.sampler == "dpmpp_2m_karras"


def test_the_sdxl_preset_trains_at_1024_and_samples_at_sdxl_sizes():
    sdxl = load_settings(preset="sdxl-anime")
    assert sdxl.preset == "sdxl-anime" and sdxl.train.resolution == 1024 and sdxl.train.gradient_checkpointing
    assert (sdxl.evaluate.width, sdxl.evaluate.height) == (832, 1216)
    assert sdxl.train.embedding_vectors == load_settings().train.embedding_vectors  # the rest is the SD1.5 default
    assert 'preset = "sdxl-anime"' in to_toml(sdxl) and Settings.model_validate(tomllib.loads(to_toml(sdxl))) == sdxl


def test_precedence_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny-demo"\n[train]\nmax_steps = 77\nlora_rank = 3\n')
    settings = load_settings(path, overrides=["train.lora_rank=5", 'crawl.tags=["a_(b)", "solo"]'])
    assert settings.preset == "tiny-demo"
    assert settings.train.resolution == PRESETS["tiny-demo"]["train"]["resolution"]  # from the preset
    assert settings.train.max_steps == 77  # from the file
    assert settings.train.lora_rank == 5  # from the override
    assert settings.crawl.tags == ["a_(b)", "solo"]


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=["train.rnak=4"])
    message = str(info.value)
    assert "unknown key 'train.rnak'" in message and "lora_rank" in message
    assert "\n" not in message


def test_bad_value_names_the_key_and_allowed_values():
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=['crawl.sites=["pixiv2"]'])
    assert "crawl.sites.0" in str(info.value) and "'danbooru'" in str(info.value) and "or 'pixiv'" in str(info.value)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_settings(overrides=["train.max_steps=0"])


def test_a_compile_backend_torch_does_not_have_is_refused_as_the_settings_load():
    """Not at the first training step or render, minutes in: a one-line error naming the setting and the fix;
    any backend torch has registered is taken."""
    for section in ("train", "evaluate"):
        with pytest.raises(ConfigError) as info:
            load_settings(overrides=[f'{section}.compile_backend="inductr"'])
        message = str(info.value)
        assert f"{section}.compile_backend: torch.compile has no backend 'inductr'" in message
        assert "inductor" in message and "\n" not in message
    settings = load_settings(overrides=['train.compile_backend="aot_eager_decomp_partition"'])
    assert settings.train.compile_backend == "aot_eager_decomp_partition"  # not among the usual names


def test_a_custom_prompt_set_without_prompts_is_refused_and_says_what_to_add():
    custom = ['evaluate.prompt_set="custom"']
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=[*custom, "evaluate.cluster_prompts=false"])
    message = str(info.value)
    assert message.startswith("invalid config: evaluate: prompt_set 'custom' renders only evaluate.prompts")
    assert "add [[evaluate.prompts]]" in message and "\n" not in message
    assert load_settings(overrides=[*custom, 'evaluate.prompts=[{name = "a", prompt = "smile"}]']).evaluate.prompts
    from lorafactory.evaluate.prompts import prompt_specs

    clusters_only = load_settings(overrides=custom).evaluate  # the dataset's outfit clusters may still give some
    with pytest.raises(ValueError, match="has none: add \\[\\[evaluate.prompts\\]\\]"):
        prompt_specs(clusters_only, [["1girl"], ["smile"]])


def test_bad_preset_file_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_settings(preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.max_steps")


def test_unquoted_override_values_are_strings():
    assert parse_override("train.base_model=/models/x")["train"]["base_model"] == "/models/x"


def test_toml_round_trip_and_hash_stability():
    settings = load_settings(preset="tiny-demo", overrides=['character.name="X"'])
    again = Settings.model_validate(tomllib.loads(to_toml(settings)))
    assert again == settings
    assert settings_hash(settings.train) == settings_hash(again.train)
    assert settings_hash(settings.train) != settings_hash(load_settings(overrides=["train.max_steps=9"]).train)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.bucket_step=60", "train.bucket_step"),
        ("train.group_repeats={head = -1}", "train.group_repeats.head"),
        ("train.group_loss_weights={head = -0.5}", "train.group_loss_weights.head"),
        ("train.max_steps=1000000000", "train.max_steps"),
        ("train.validation_timesteps=[200, 5000]", "train.validation_timesteps.1"),
        ('train.device="banana"', "train.device"),
        ("evaluate.width=100", "evaluate.width"),
        ("evaluate.height=32", "evaluate.height"),
        ("prepare.purity_bootstrap=4", "prepare.purity_bootstrap"),
        ('character.trigger="Has Space"', "character.trigger"),
        (f'character.trigger="{"x" * 65}"', "character.trigger"),
    ],
)
def test_invalid_values_are_refused_before_any_work(override, key):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=[override])
    assert f"{key}:" in str(info.value) and "\n" not in str(info.value)


def test_valid_edge_values_are_accepted():
    settings = load_settings(
        overrides=["train.bucket_step=8", 'train.device="cuda:1"', "evaluate.width=64", "prepare.purity_bootstrap=5"]
    )
    assert settings.train.bucket_step == 8 and settings.train.device == "cuda:1"
