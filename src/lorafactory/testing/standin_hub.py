"""A stand-in Hugging Face cache of tiny ONNX models with imgutils' exact I/O signatures.

Run imgutils against it with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=<root>`` set before
huggingface_hub is imported; imgutils' own loading, pre- and post-processing then run unchanged.
This module imports neither huggingface_hub nor imgutils, so it can run before those settings exist.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from lorafactory.testing.onnx_graphs import (
    PALETTE_NAMES,
    GraphBuilder,
    orthonormal_rows,
    palette_fractions,
    saturation,
    save,
    tensor,
)

BUILD_VERSION = "13"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CCIP_THRESHOLD = 0.17847511429108218
FIGURES = 4  # boxes a stand-in detector finds at most in one image
MIN_CELLS = 3  # the narrowest figure it finds, in 8-pixel cells of its 640-pixel input
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

DETECTORS = {
    "deepghs/anime_person_detection": ("person_detect_v1.1_m", "person", None),
    "deepghs/anime_halfbody_detection": ("halfbody_detect_v1.0_s", "halfbody", (0.0, 0.55)),
    "deepghs/anime_head_detection": ("head_detect_v2.0_s", "head", (0.0, 0.24)),
    "deepghs/anime_face_detection": ("face_detect_v1.4_s", "face", (0.06, 0.20)),
}
CLASSIFIERS = {
    "deepghs/monochrome_detect": ("mobilenetv3_large_100_dist_safe2", ["monochrome", "normal"], 384),
    "deepghs/anime_classification": (
        "mobilenetv3_v1.5_dist",
        ["3d", "bangumi", "comic", "illustration", "not_painting"],
        384,
    ),
    "deepghs/anime_completeness": ("mobilenetv3_v2.2_dist", ["monochrome", "rough", "polished"], 384),
    "deepghs/anime_portrait": ("mobilenetv3_v0_dist", ["person", "halfbody", "head"], 384),
    "deepghs/bangumi_char_type": ("mobilenetv3_v0_dist", ["vision", "imagery", "halfbody", "face"], 384),
    "deepghs/ai_image_corrupted": ("caformer_s36_v0_focal", ["corrupted", "normal"], 384),
    "deepghs/anime_aesthetic": (
        "swinv2pv3_v0_448_ls0.2_x",
        ["worst", "low", "normal", "good", "great", "best", "masterpiece"],
        448,
    ),
}
WD14_MODEL = "SmilingWolf/wd-swinv2-tagger-v3"
HAIR_TAGS = {
    "red": "red_hair",
    "blue": "blue_hair",
    "green": "green_hair",
    "yellow": "blonde_hair",
    "purple": "purple_hair",
    "pink": "pink_hair",
    "black": "black_hair",
    "orange": "orange_hair",
    "cyan": "aqua_hair",
}


def _repo_dir(root: Path, repo_id: str, repo_type: str = "model") -> Path:
    """Create the repository's cache folder (``models--org--name``) with ``refs/main`` (no trailing newline) and
    return its snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    repo = root / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# detectors -----------------------------------------------------------------------------


def _detector(label: str, band: tuple[float, float] | None) -> onnx.ModelProto:
    """One box per figure: the non-white columns split into runs (figures side by side, with white
    between them), each boxed over its own rows; head/face/halfbody take a vertical band of the box,
    as the characters are drawn.

    Output ``output0`` [1, 5, 8] (YOLOv8 layout, cx cy w h score): up to ``FIGURES`` real boxes, a
    shifted duplicate of the first that NMS must remove, a box below any default threshold, and
    empty slots.
    """
    g = GraphBuilder()
    cells = 80  # 640 / 8
    small = g.op("AveragePool", "images", kernel_shape=[8, 8], strides=[8, 8])  # [1,3,80,80]
    darkest = g.op("ReduceMin", small, axes=[1], keepdims=0)  # [1,80,80]
    mask = g.op("Cast", g.op("Less", darkest, g.const(0.9)), to=TensorProto.FLOAT)
    raw = g.op("ReduceMax", mask, axes=[1], keepdims=1)  # [1,1,80]: the columns with some figure in them

    def pool(x: str) -> str:
        return g.op("MaxPool", x, kernel_shape=[3], pads=[1, 1])

    closed = g.op("Neg", pool(g.op("Neg", pool(raw))))  # a one-cell gap inside a figure is no gap
    cols = g.op("Reshape", closed, g.const([cells], np.int64))  # [80]
    zero = g.const([0.0])
    before = g.op("Slice", g.op("Concat", zero, cols, axis=0), g.const([0], np.int64), g.const([cells], np.int64))
    after = g.op("Slice", g.op("Concat", cols, zero, axis=0), g.const([1], np.int64), g.const([cells + 1], np.int64))
    order = g.const(np.arange(cells, 0, -1, dtype=np.float32))  # earlier columns rank higher

    def first_runs(edges: str) -> tuple[str, str]:
        """Values (> 0 where a run exists) and column indices of the first FIGURES run edges."""
        values, indices = g.op("TopK", g.op("Mul", edges, order), g.const([FIGURES], np.int64), outputs=2)
        return values, g.op("Cast", indices, to=TensorProto.FLOAT)

    start_score, start = first_runs(g.op("Mul", cols, g.op("Sub", g.const(1.0), before)))
    _, end = first_runs(g.op("Mul", cols, g.op("Sub", g.const(1.0), after)))
    wide = g.op("GreaterOrEqual", g.op("Sub", end, start), g.const(float(MIN_CELLS - 1)))  # slivers are no figure
    present = g.op("Cast", g.op("And", g.op("Greater", start_score, g.const(0.0)), wide), to=TensorProto.FLOAT)
    column = g.const(np.arange(cells, dtype=np.float32).reshape(1, cells))
    inside = g.op(
        "Mul",
        g.op("Cast", g.op("GreaterOrEqual", column, g.op("Unsqueeze", start, g.const([1], np.int64))), to=1),
        g.op("Cast", g.op("LessOrEqual", column, g.op("Unsqueeze", end, g.const([1], np.int64))), to=1),
    )  # [K,80]
    per_figure = g.op("Mul", mask, g.op("Unsqueeze", inside, g.const([1], np.int64)))  # [K,80,80]
    rows = g.op("ReduceMax", per_figure, axes=[2], keepdims=0)  # [K,80]

    def edge(line: str, last: int) -> str:
        index = g.op("ArgMax", line, axis=1, keepdims=0, select_last_index=last)
        return g.op("Mul", g.op("Cast", index, to=TensorProto.FLOAT), g.const(8.0))

    y0, y1 = edge(rows, 0), g.op("Add", edge(rows, 1), g.const(8.0))
    x0, x1 = g.op("Mul", start, g.const(8.0)), g.op("Mul", g.op("Add", end, g.const(1.0)), g.const(8.0))
    height = g.op("Sub", y1, y0)
    if band is not None:
        y0, y1 = (g.op("Add", y0, g.op("Mul", height, g.const(frac))) for frac in band)
        if label in ("head", "face"):
            centre_x = g.op("Mul", g.op("Add", x0, x1), g.const(0.5))
            half = g.op("Mul", g.op("Sub", y1, y0), g.const(0.5))
            x0, x1 = g.op("Sub", centre_x, half), g.op("Add", centre_x, half)
    cx = g.op("Mul", g.op("Add", x0, x1), g.const(0.5))
    cy = g.op("Mul", g.op("Add", y0, y1), g.const(0.5))
    w, h = g.op("Sub", x1, x0), g.op("Sub", y1, y0)
    score = g.op("Mul", present, g.const(0.9))
    boxes = g.op(
        "Unsqueeze",
        g.op("Concat", *(g.op("Unsqueeze", v, g.const([0], np.int64)) for v in (cx, cy, w, h, score)), axis=0),
        g.const([0], np.int64),
    )  # [1,5,K]
    first = g.op("Slice", boxes, g.const([0], np.int64), g.const([1], np.int64), g.const([2], np.int64))  # [1,5,1]
    shift = g.op(
        "Mul",
        g.op("Slice", first, g.const([2], np.int64), g.const([3], np.int64), g.const([1], np.int64)),
        g.const(0.03),
    )
    duplicate = g.op(
        "Mul",
        g.op("Add", first, g.op("Mul", shift, g.const(np.array([1, 0, 0, 0, 0], np.float32).reshape(1, 5, 1)))),
        g.const(np.array([1, 1, 1, 1, 0.8 / 0.9], np.float32).reshape(1, 5, 1)),
    )
    low = g.const(np.array([320.0, 320.0, 64.0, 64.0, 0.1], np.float32).reshape(1, 5, 1))
    empty = g.const(np.zeros((1, 5, 8 - FIGURES - 2), np.float32))
    g.op("Concat", boxes, duplicate, low, empty, axis=2, out="output0")  # 8 candidates: never 6 (end-to-end)
    return g.model(
        [tensor("images", [1, 3, 640, 640])],
        [tensor("output0", [1, 5, 8])],
        metadata={"names": repr({0: label}), "imgsz": "[640, 640]"},
    )


# CCIP -------------------------------------------------------------------------------------


def _ccip_feature() -> onnx.ModelProto:
    """Palette histogram of the non-background colours, rotated into 768 dimensions."""
    g = GraphBuilder()
    rgb = g.op(
        "Add", g.op("Mul", "input", g.const(CLIP_STD.reshape(1, 3, 1, 1))), g.const(CLIP_MEAN.reshape(1, 3, 1, 1))
    )
    hist = palette_fractions(g, rgb, pool=8)
    keep = [i for i, name in enumerate(PALETTE_NAMES) if name not in ("white", "skin")]
    colours = g.op("Gather", hist, g.const(keep, np.int64), axis=1)
    g.op("MatMul", colours, g.const(orthonormal_rows(len(keep), 768, seed=7)), out="output")
    return g.model([tensor("input", ["N", 3, 384, 384])], [tensor("output", ["N", 768])])


def _ccip_metrics() -> onnx.ModelProto:
    """Pairwise difference ``clip((1 - cos) / 2, 0, 1)``: small for the same character."""
    g = GraphBuilder()
    norm = g.op(
        "Sqrt",
        g.op(
            "Add", g.op("ReduceSum", g.op("Mul", "input", "input"), g.const([1], np.int64), keepdims=1), g.const(1e-12)
        ),
    )
    unit = g.op("Div", "input", norm)
    cosine = g.op("MatMul", unit, g.op("Transpose", unit, perm=[1, 0]))
    diff = g.op("Mul", g.op("Sub", g.const(1.0), cosine), g.const(0.5))
    g.op("Clip", diff, g.const(0.0), g.const(1.0), out="output")
    return g.model([tensor("input", ["N", 768])], [tensor("output", ["N", "N"])])


# WD14 -------------------------------------------------------------------------------------


def _wd14_tags() -> list[tuple[str, int, np.ndarray, float, bool]]:
    """(name, category, weights over the palette, bias, relative) for each tag, in CSV order.

    ``relative`` weights read colour shares of the figure (the non-white pixels), so a tag such as
    ``red_hair`` does not depend on how much background surrounds her; the others read shares of
    the whole picture.
    """
    zero = np.zeros(len(PALETTE_NAMES), dtype=np.float32)

    def w(**colours: float) -> np.ndarray:
        vec = zero.copy()
        for name, value in colours.items():
            vec[PALETTE_NAMES.index(name)] = value
        return vec

    tags = [
        ("general", 9, zero, 3.0, False),
        ("sensitive", 9, zero, -3.0, False),
        ("questionable", 9, zero, -4.0, False),
        ("explicit", 9, zero, -5.0, False),
        ("1girl", 0, zero, 3.0, False),
        ("solo", 0, zero, 2.0, False),
        ("long_hair", 0, zero, 1.0, False),
        ("very_long_hair", 0, w(brown=12.0), -2.0, True),
        ("smile", 0, zero, 0.2, False),
        ("looking_at_viewer", 0, zero, 0.0, False),
        ("white_background", 0, w(white=8.0), -3.0, False),
        ("simple_background", 0, w(white=8.0), -2.5, False),
        ("monochrome", 0, w(gray=8.0, black=3.0), -4.0, True),
        ("greyscale", 0, w(gray=8.0, black=3.0), -4.5, True),
        ("hair_ornament", 0, w(yellow=12.0), -2.0, True),
        ("dress", 0, w(blue=4.0, purple=4.0, pink=4.0), -1.5, True),
        ("shirt", 0, w(cyan=5.0), -1.0, True),
        ("skirt", 0, w(black=5.0, red=3.0), -2.0, True),
        ("bikini", 0, w(orange=10.0), -2.5, True),
        ("cosplay", 0, zero, -0.3, False),
    ]
    for colour, tag in HAIR_TAGS.items():
        tags.append((tag, 0, w(**{colour: 20.0}), -2.0, True))
    tags += [("standin_character_(a)", 4, zero, -5.0, False), ("standin_character_(b)", 4, zero, -5.0, False)]
    return tags


def _wd14_model(tags: list[tuple[str, int, np.ndarray, float, bool]]) -> onnx.ModelProto:
    g = GraphBuilder()
    nchw = g.op("Transpose", "input_1:0", perm=[0, 3, 1, 2])
    rgb = g.op("Mul", g.op("Gather", nchw, g.const([2, 1, 0], np.int64), axis=1), g.const(1.0 / 255.0))
    hist = palette_fractions(g, rgb, pool=8)
    white = g.op("Gather", hist, g.const([PALETTE_NAMES.index("white")], np.int64), axis=1)  # [N,1]
    figure = g.op("Div", hist, g.op("Add", g.op("Sub", g.const(1.0), white), g.const(0.02)))
    relative = np.stack([t[2] if t[4] else np.zeros_like(t[2]) for t in tags], axis=1)
    absolute = np.stack([np.zeros_like(t[2]) if t[4] else t[2] for t in tags], axis=1)
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    logits = g.op(
        "Add",
        g.op("Add", g.op("MatMul", figure, g.const(relative)), g.op("MatMul", hist, g.const(absolute))),
        g.const(bias),
    )
    g.op("Sigmoid", logits, out="predictions_sigmoid")
    g.op("MatMul", hist, g.const(orthonormal_rows(len(PALETTE_NAMES), 1024, seed=11)), out="embedding")
    return g.model(
        [tensor("input_1:0", ["N", 448, 448, 3])],
        [tensor("predictions_sigmoid", ["N", len(tags)]), tensor("embedding", ["N", 1024])],
    )


def _selected_tags_csv(tags: list[tuple[str, int, np.ndarray, float, bool]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    for i, (name, category, *_) in enumerate(tags):
        writer.writerow([100000 + i, name, category, 1000 - i])
    return buffer.getvalue()


# classifiers and LPIPS ----------------------------------------------------------------------


def _classifier(labels: list[str], size: int, seed: int) -> onnx.ModelProto:
    """Softmax over labels; monochrome-like labels follow (low) saturation, ``vision`` (a character
    drawn without detail) follows how much of the figure one colour covers, the others colour mix."""
    g = GraphBuilder()
    rgb = g.op("Add", g.op("Mul", "input", g.const(0.5)), g.const(0.5))
    sat = saturation(g, rgb, pool=8)  # [N,1]
    hist = palette_fractions(g, rgb, pool=16)
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1.0, (len(PALETTE_NAMES), len(labels))).astype(np.float32)
    sat_weight = np.zeros((1, len(labels)), dtype=np.float32)
    bias = np.zeros(len(labels), dtype=np.float32)
    for i, label in enumerate(labels):
        if label in ("monochrome", "comic"):
            sat_weight[0, i], bias[i] = -40.0, 4.0
        elif label in ("normal", "illustration", "polished"):
            sat_weight[0, i], bias[i] = 40.0, -4.0
    flat_weight = np.zeros((1, len(labels)), dtype=np.float32)
    if "vision" in labels:
        flat_weight[0, labels.index("vision")], bias[labels.index("vision")] = 80.0, -52.4
    white = g.op("Gather", hist, g.const([PALETTE_NAMES.index("white")], np.int64), axis=1)  # [N,1]
    colours = g.op("Gather", hist, g.const([i for i, n in enumerate(PALETTE_NAMES) if n != "white"], np.int64), axis=1)
    share = g.op("Div", colours, g.op("Add", g.op("Sub", g.const(1.0), white), g.const(0.02)))  # of the figure
    flat = g.op("ReduceMax", share, axes=[1], keepdims=1)  # [N,1]: near 1 for a one-colour figure
    logits = g.op(
        "Add",
        g.op(
            "Add",
            g.op("Add", g.op("MatMul", hist, g.const(mix)), g.op("MatMul", sat, g.const(sat_weight))),
            g.op("MatMul", flat, g.const(flat_weight)),
        ),
        g.const(bias),
        out="logits",
    )
    g.op("Softmax", logits, axis=1, out="output")
    return g.model(
        [tensor("input", ["N", 3, size, size])],
        [tensor("output", ["N", len(labels)]), tensor("logits", ["N", len(labels)])],
    )


_LPIPS_LEVELS = [(64, 6, 4), (192, 10, 8), (384, 24, 16), (256, 24, 16), (256, 24, 16)]  # channels, kernel, stride


def _lpips_feature() -> onnx.ModelProto:
    """Five average-pooled, channel-expanded maps with the real model's shapes (99, 49, 24, 24, 24)."""
    g = GraphBuilder()
    outputs = []
    rng = np.random.default_rng(3)
    for i, (channels, kernel, stride) in enumerate(_LPIPS_LEVELS):
        pooled = g.op("AveragePool", "input", kernel_shape=[kernel, kernel], strides=[stride, stride])
        weight = rng.normal(0, 1.0, (channels, 3, 1, 1)).astype(np.float32)
        g.op("Conv", pooled, g.const(weight), out=f"feat_{i}")
        side = (400 - kernel) // stride + 1
        outputs.append(tensor(f"feat_{i}", ["N", channels, side, side]))
    return g.model([tensor("input", ["N", 3, 400, 400])], outputs)


def _lpips_diff() -> onnx.ModelProto:
    """Sum over levels of the mean absolute feature difference, scaled so near-duplicates fall under 0.45."""
    g = GraphBuilder()
    inputs, terms = [], []
    for i, (channels, kernel, stride) in enumerate(_LPIPS_LEVELS):
        side = (400 - kernel) // stride + 1
        x, y = f"feat_x_{i}", f"feat_y_{i}"
        inputs += [tensor(x, ["N", channels, side, side]), tensor(y, ["N", channels, side, side])]
        terms.append(g.op("ReduceMean", g.op("Abs", g.op("Sub", x, y)), keepdims=0))
    total = terms[0]
    for term in terms[1:]:
        total = g.op("Add", total, term)
    g.op("Mul", total, g.const(4.0), out="output")
    return g.model(inputs, [tensor("output", [])])


# the cache ------------------------------------------------------------------------------


def build_standin_hub(root: Path) -> Path:
    """Build (once) the stand-in cache under ``root`` and return it; use it as ``HF_HUB_CACHE``."""
    root = Path(root)
    stamp = root / ".lorafactory-standin"
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    for repo_id, (model, label, band) in DETECTORS.items():
        snap = _repo_dir(root, repo_id)
        save(_detector(label, band), snap / model / "model.onnx")
        _json(snap / model / "model_type.json", {"model_type": "yolo"})

    ccip = _repo_dir(root, "deepghs/ccip_onnx") / "ccip-caformer-24-randaug-pruned"
    save(_ccip_feature(), ccip / "model_feat.onnx")
    save(_ccip_metrics(), ccip / "model_metrics.onnx")
    _json(ccip / "metrics.json", {"threshold": CCIP_THRESHOLD})
    _json(
        ccip / "cluster.json",
        {
            "dbscan_2": {"eps": CCIP_THRESHOLD, "min_samples": 2},
            "dbscan_free": {"eps": CCIP_THRESHOLD, "min_samples": 2},
            "optics": {"eps": 0.5, "min_samples": 5},
        },
    )

    tags = _wd14_tags()
    save(_wd14_model(tags), _repo_dir(root, "deepghs/wd14_tagger_with_embeddings") / WD14_MODEL / "model.onnx")
    (_repo_dir(root, WD14_MODEL) / "selected_tags.csv").write_text(_selected_tags_csv(tags))

    filtering = _repo_dir(root, "alea31415/tag_filtering", repo_type="dataset")
    _json(filtering / "overlap_tags_simplified.json", {"long_hair": ["very_long_hair"], "hair_ornament": ["hairclip"]})
    (filtering / "blacklist_tags.txt").write_text("cosplay\nno_eyewear\n")

    for seed, (repo_id, (model, labels, size)) in enumerate(CLASSIFIERS.items()):
        snap = _repo_dir(root, repo_id)
        save(_classifier(labels, size, seed), snap / model / "model.onnx")
        _json(snap / model / "meta.json", {"labels": labels})
    scores = np.sort(np.random.default_rng(5).uniform(0, 6, 200)).astype(np.float32)
    np.savez(
        _repo_dir(root, "deepghs/anime_aesthetic") / "swinv2pv3_v0_448_ls0.2_x" / "samples.npz",
        np.stack([scores, np.linspace(0, 1, len(scores), dtype=np.float32)]),
    )

    lpips = _repo_dir(root, "deepghs/imgutils-models") / "lpips"
    save(_lpips_feature(), lpips / "lpips_feature.onnx")
    save(_lpips_diff(), lpips / "lpips_diff.onnx")

    stamp.write_text(BUILD_VERSION)
    return root
