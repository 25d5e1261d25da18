import random

import numpy as np
from PIL import Image

from lorafactory.dataset.tags import caption, core_tags, prompt_tag
from lorafactory.evaluate.metrics import ccip_recscore
from lorafactory.train import buckets
from lorafactory.train.data import build_caption
from lorafactory.train.embedding import expand_trigger, token_names


def test_buckets_never_upscale():
    small = buckets.fit(100, 150, resolution=512, step=64)
    assert small.resized == (100, 150) and small.bucket == (64, 128)
    large = buckets.fit(2000, 1000, resolution=512, step=64)
    w, h = large.resized
    assert w * h <= 512 * 512 and abs(w / h - 2.0) < 0.01
    assert large.bucket == (w // 64 * 64, h // 64 * 64)
    assert buckets.fit(40, 500, 512, 64) is None
    cropped = buckets.apply(Image.new("RGB", (100, 150)), small)
    assert cropped.size == (64, 128)


def test_caption_keeps_the_trigger_first():
    rng = random.Random(0)
    for _ in range(20):
        text = build_caption("akane", ["a", "b", "c", "d"], rng, shuffle=True, tag_dropout=0.5, caption_dropout=0.0)
        assert text.split(", ")[0] == "akane"
    assert caption("akane", ["smile"]) == "akane, smile"
    assert prompt_tag("surtr_(arknights)") == "surtr \\(arknights\\)"


def test_trigger_expansion_matches_diffusers_naming():
    assert token_names("akane", 3) == ["akane", "akane_1", "akane_2"]
    assert expand_trigger("akane, smile", "akane", 3) == "akane akane_1 akane_2, smile"
    assert expand_trigger("akane, smile", "akane", 1) == "akane, smile"


def test_core_tags_need_ratio_and_trait():
    lists = [["red_hair", "smile", "long_hair"], ["red_hair", "smile"], ["red_hair"], ["blue_eyes"]]
    assert core_tags(lists, 0.5, lambda t: t.endswith(("hair", "eyes"))) == ["red_hair"]
    assert core_tags([], 0.5, lambda t: True) == []


def test_recscore_pairs_and_images():
    diff = np.array([[0.1, 0.1, 0.5], [0.5, 0.5, 0.1]])
    score = ccip_recscore(diff, threshold=0.2)
    assert score.pair_share == 0.5
    assert score.image_share == 0.5 and score.per_image == [2 / 3, 1 / 3]


def test_fixed_buckets_cover_and_may_upscale():
    bucket_list = buckets.fixed_buckets(512, 64, 256, 1024)
    assert (512, 512) in bucket_list and (448, 576) in bucket_list and (576, 448) in bucket_list
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in bucket_list)
    small = buckets.fit_fixed(100, 150, bucket_list)
    assert small.bucket == (384, 576) or abs(small.bucket[0] / small.bucket[1] - 100 / 150) < 0.1
    assert small.resized[0] >= small.bucket[0] and small.resized[1] >= small.bucket[1]  # upscaled to cover
    assert buckets.apply(Image.new("RGB", (100, 150)), small).size == small.bucket


def test_regularization_is_balanced_against_training_samples():
    import torch

    from lorafactory.train.data import Example, batch_plan

    def example(i, regularization, group="person"):
        return Example(
            f"{i}.png", group, str(i), [], (64, 64), torch.zeros(1), (64, 64), (0, 0), regularization=regularization
        )

    train = [example(i, False) for i in range(5)] + [example(5, False, "head")]
    regular = [example(10 + i, True) for i in range(2)]
    plan = batch_plan(train + regular, 4, random.Random(0), {"head": 3})
    drawn = [i for batch in plan for i in batch]
    n_train = sum(1 for i in drawn if i < 6)
    assert n_train == 5 + 3  # repeats count
    assert sum(1 for i in drawn if i >= 6) == n_train  # as many regularization samples as training samples
    many = [example(20 + i, True) for i in range(30)]
    drawn = [i for batch in batch_plan(train + many, 4, random.Random(0), {}) for i in batch]
    assert sum(1 for i in drawn if i >= 6) == 6  # a larger set is subsampled


def test_full_batches_carry_bucket_leftovers_and_draw_each_sample_once_per_epoch():
    import torch

    from lorafactory.train.data import Example, batch_plan

    sizes = {(64, 64): 7, (64, 128): 3, (128, 64): 1, (128, 128): 4}  # images per bucket, batch of 4
    examples = [
        Example(f"{bucket}-{i}.png", "person", "", [], bucket, torch.zeros(1), bucket, (0, 0))
        for bucket, count in sizes.items()
        for i in range(count)
    ]
    partial = batch_plan(examples, 4, random.Random(0), {})
    assert sorted(map(len, partial)) == [1, 3, 3, 4, 4]  # kohya: the last batch of each bucket is partial

    rng, waiting, drawn, empty_epochs = random.Random(0), {}, [], 0
    epochs = 12
    for _ in range(epochs):
        plan = batch_plan(examples, 4, rng, {}, waiting)
        empty_epochs += not plan
        assert all(len(batch) == 4 for batch in plan)
        assert all(len({examples[i].bucket for i in batch}) == 1 for batch in plan)
        drawn += [i for batch in plan for i in batch]
        assert all(0 < len(left) < 4 for left in waiting.values())
    left = [i for leftovers in waiting.values() for i in leftovers]
    assert sorted(drawn + left) == sorted(list(range(len(examples))) * epochs)  # each image once per epoch
    assert empty_epochs == 0
    lonely = [Example("a.png", "head", "", [], (64, 64), torch.zeros(1), (64, 64), (0, 0))]
    waiting = {}
    plans = [batch_plan(lonely, 4, random.Random(0), {}, waiting) for _ in range(4)]
    assert plans == [[], [], [], [[0, 0, 0, 0]]] and waiting == {}  # waits until a batch is full


def test_regularization_captions_have_no_trigger():
    assert build_caption(None, ["1girl", "smile"], random.Random(0), False, 0, 0) == "1girl, smile"


def test_single_file_family_is_read_from_the_keys(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lorafactory.train.model import _single_file_is_sdxl

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(tmp_path / "xl.safetensors"))
    save_file(
        {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
        str(tmp_path / "sd1.safetensors"),
    )
    assert _single_file_is_sdxl(tmp_path / "xl.safetensors")
    assert not _single_file_is_sdxl(tmp_path / "sd1.safetensors")


def test_redact_masks_every_encoding_of_a_registered_secret(caplog):
    import html
    import json
    import logging
    from urllib.parse import quote, quote_plus

    from lorafactory.redact import RedactingFilter, redact, register

    secret = 'k/ey+"va&lue="'
    register(secret)
    forms = [secret, quote(secret, safe=""), quote(secret, safe="").lower(), quote_plus(secret)]
    forms += [html.escape(secret), json.dumps(secret)[1:-1]]
    text = " | ".join(forms)
    assert redact(text).count("***") == len(forms) and "va" not in redact(text).replace("***", "")
    logger = logging.getLogger("lorafactory.test_redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("url %s", quote_plus(secret))
    assert caplog.records[-1].getMessage() == "url ***"


def test_sixteen_bit_grayscale_and_exif_orientation_decode_correctly(tmp_path):
    import numpy as np
    from PIL import Image

    from lorafactory.dataset.clean import load_rgb

    gray = np.full((16, 24), 32768, dtype=np.uint16)
    gray[:, :12] = 8192
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    decoded = np.asarray(load_rgb(tmp_path / "gray16.png", 1024))
    assert decoded.shape == (16, 24, 3) and decoded[0, 0, 0] == 32 and decoded[0, -1, 0] == 128

    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: view rotated 90 degrees clockwise
    wide.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "turned.jpg", 1024)
    assert upright.size == (20, 40) and upright.getpixel((10, 5))[2] > 150  # the blue half is now on top


def test_own_tags_join_the_taggers():
    from lorafactory.dataset.prepare import with_own_tags

    assert with_own_tags({"smile": 0.6}, ["sailor_hat", "smile"]) == {"smile": 1.0, "sailor_hat": 1.0}


def test_host_tensor_keeps_values_and_dtype_and_passes_device_tensors_through():
    import torch

    from lorafactory.train.model import host_tensor

    cpu = torch.device("cpu")
    ids = host_tensor([[49406, 320, 49407]], cpu)
    assert ids.dtype == torch.int64 and ids.tolist() == [[49406, 320, 49407]]
    sizes = host_tensor([[1024, 768, 0, 0, 1024, 768]], cpu, torch.bfloat16)
    assert sizes.dtype == torch.bfloat16 and sizes.tolist() == [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]]
    latents = torch.randn(2, 4, 8, 8)
    assert host_tensor(latents, cpu) is latents  # already there: no copy
    assert host_tensor([0.5, 1.0], torch.device("meta")).is_meta


def test_an_os_error_of_no_file_operation_keeps_its_own_words():
    """A library's OSError that is not about a file (Ray's ConnectionError, an unreadable image) is shown as
    it says, not as an error "at the workspace"."""
    from PIL import UnidentifiedImageError

    from lorafactory.errors import from_os_error

    refused = from_os_error(ConnectionError("Could not find any running Ray instance.\nSet --address."))
    assert str(refused) == "Could not find any running Ray instance."
    unreadable = from_os_error(UnidentifiedImageError("cannot identify image file 'x.png'"))
    assert str(unreadable) == "cannot identify image file 'x.png'"
    assert str(from_os_error(ConnectionError())) == "ConnectionError"
    full = from_os_error(OSError(28, "No space left on device", "/ws/a.png"))
    assert str(full) == (
        "disk full at /ws/a.png: free space (`lorafactory prune` frees released characters' files) and rerun; "
        "nothing was lost"
    )


def _bars(progress_run) -> list[tuple[str, str]]:
    """Each bar's first word and count as RichProgress draws them last, after ``progress_run(progress)``."""
    import io

    from rich.console import Console

    from lorafactory.progress import RichProgress

    out = io.StringIO()
    progress_run(RichProgress(Console(file=out, width=100)))
    return [(words[0], words[-3]) for words in map(str.split, out.getvalue().splitlines())]


def _short_crawl_and_others(progress) -> None:
    with progress.task("crawling sites", total=200) as task:
        task.advance(120)
        task.complete()
    with progress.task("training", total=10) as task:
        task.advance(4)
    try:
        with progress.task("rendering", total=10) as task:
            task.advance(3)
            raise RuntimeError("out of memory")
    except RuntimeError:
        pass


def test_a_completed_bar_ends_full_at_its_count_and_others_where_they_stopped():
    """A site crawl's bar counts to the image limit, which sites with fewer posts never reach: the crawl says its
    work is complete, and its bar ends full at what came. Bars not completed keep their totals."""
    assert _bars(_short_crawl_and_others) == [("crawling", "120/120"), ("training", "4/10"), ("rendering", "3/10")]


def test_a_training_workers_bars_and_notes_reach_the_launching_process(capsys):
    """torchrun's workers draw through the launching process: their progress events, written as lines, drive its
    bars (a completed one included) and notes; other lines pass through, and the result is kept."""
    import io
    import json

    from lorafactory.launch import torchrun

    written = io.StringIO()
    relay = torchrun._RelayProgress(written)
    _short_crawl_and_others(relay)
    relay.note("resumed at step 4")
    lines = ["a worker's own output\n", *written.getvalue().splitlines(keepends=True)]
    lines.append(torchrun._EVENT + json.dumps({"result": {"steps": 4}}) + "\n")
    outcome, notes = {}, []

    def relayed(progress) -> None:
        progress.note = notes.append
        torchrun._relay(lines, progress, outcome)

    assert _bars(relayed) == [("crawling", "120/120"), ("training", "4/10"), ("rendering", "3/10")]
    assert notes == ["resumed at step 4"] and outcome == {"result": {"steps": 4}}
    assert capsys.readouterr().out == "a worker's own output\n"
