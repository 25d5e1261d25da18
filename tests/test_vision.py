"""imgutils' own code against the stand-in hub, through our facade."""

import random

import numpy as np
import pytest
from PIL import ImageOps

from lorafactory.config import PrepareSettings, VisionSettings
from lorafactory.dataset.crops import three_stage
from lorafactory.testing.synthetic import CHARACTERS
from lorafactory.vision.ccip import default_threshold, differences, extract_features
from lorafactory.vision.classify import monochrome_score
from lorafactory.vision.detect import detect
from lorafactory.vision.tagging import is_character_trait, tag_counts, tag_image

V = VisionSettings()


def _draw(character, seed, size=(200, 300), outfit=0):
    return character.draw(*size, outfit=outfit, rng=random.Random(seed))


def _figure_box(image):
    """The bounding box of the non-background pixels: where the character really is."""
    dark = np.asarray(image.convert("RGB")).min(axis=2) < 230
    rows, cols = np.where(dark.any(axis=1))[0], np.where(dark.any(axis=0))[0]
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_detectors_box_the_character(seed):
    image = _draw(CHARACTERS[0], seed, (300, 420))
    person = detect(image, "person", V.person_model)
    assert len(person) == 1  # the shifted duplicate was removed by NMS, the weak box by the threshold
    box, truth = person[0], _figure_box(image)
    tolerance = 8 * 420 / 640 + 2  # the stand-in works on an 8-pixel grid of its 640-pixel input
    assert all(abs(a - b) <= tolerance for a, b in zip((box.x0, box.y0, box.x1, box.y1), truth))
    head = detect(image, "head", V.head_model)[0]
    assert box.y0 <= head.y0 and head.y1 < box.y0 + 0.3 * box.height


def test_three_stage_crops_nest():
    image = _draw(CHARACTERS[0], 2, (320, 480))
    crops = three_stage(image, PrepareSettings(min_crop_side=20), V)
    assert [c.group for c in crops] == ["person", "halfbody", "head"]
    person, half, head = (c.image for c in crops)
    assert half.height < person.height and head.height < half.height


def test_ccip_tells_characters_apart():
    same = [_draw(CHARACTERS[0], s, outfit=s % 3) for s in range(3)]
    other = [_draw(c, 9) for c in CHARACTERS[1:]]
    features = extract_features(same + other, V.ccip_model, batch_size=2)
    assert features.shape == (6, 768)
    diff = differences(features[:1], features[1:], V.ccip_model)[0]
    threshold = default_threshold(V.ccip_model)
    assert (diff[:2] < threshold).all() and (diff[2:] > threshold).all()


def test_tagger_and_monochrome_follow_colours():
    image = _draw(CHARACTERS[0], 3, (300, 300))
    tags = tag_image(image, V.tagger_model, 0.35, drop_overlap=True)
    assert list(tags.values()) == sorted(tags.values(), reverse=True)
    assert "1girl" in tags and "red_hair" in tags
    assert monochrome_score(ImageOps.grayscale(image).convert("RGB"), V.monochrome_model) > 0.5
    assert monochrome_score(image, V.monochrome_model) < 0.5
    assert is_character_trait("red_hair") and not is_character_trait("1girl")


def test_every_standin_model_runs_through_imgutils():
    """Signatures of the models the pipeline does not call yet (LPIPS, aesthetic, portrait...) are right too."""
    from imgutils.metrics import anime_dbaesthetic, lpips_clustering
    from imgutils.tagging import drop_blacklisted_tags, drop_overlap_tags
    from imgutils.validate import anime_completeness, anime_portrait

    a = _draw(CHARACTERS[0], 4, (240, 320))
    a2 = a.copy().rotate(0.5, fillcolor=(250, 250, 250))
    b = _draw(CHARACTERS[1], 5, (240, 320))
    labels = lpips_clustering([a, a2, b])
    assert labels[0] == labels[1] and labels[2] != labels[0]
    label, percentile = anime_dbaesthetic(a)
    assert label in ("worst", "low", "normal", "good", "great", "best", "masterpiece") and 0 <= percentile <= 1
    assert anime_portrait(a)[0] in ("person", "halfbody", "head")
    assert anime_completeness(a)[0] in ("monochrome", "rough", "polished")
    assert drop_blacklisted_tags({"cosplay": 0.9, "smile": 0.8}) == {"smile": 0.8}
    assert drop_overlap_tags(["long_hair", "very_long_hair", "hair"]) == ["very_long_hair"]


def test_tag_counts_come_from_the_taggers_own_tag_list():
    counts = tag_counts(VisionSettings().tagger_model)
    assert counts and all(isinstance(n, int) and n > 0 for n in counts.values())
    assert "bikini" in counts and len(set(counts.values())) > 1  # real per-tag counts, not a constant


def test_a_gpu_run_with_the_cpu_onnx_runtime_is_told_how_to_score_on_the_gpu(monkeypatch):
    import torch

    from lorafactory.vision.runtime import onnx_provider, vision_on_cpu_warning

    monkeypatch.delenv("ONNX_MODE", raising=False)
    assert onnx_provider() == "CPUExecutionProvider"  # this machine's onnxruntime has no CUDA provider
    warning = vision_on_cpu_warning(torch.device("cuda"))
    assert warning and "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in warning
    assert "\n" not in warning
    assert vision_on_cpu_warning(torch.device("cpu")) is None  # a CPU run has nothing to move
    monkeypatch.setenv("ONNX_MODE", "cpu")  # the user's own choice
    assert vision_on_cpu_warning(torch.device("cuda")) is None
