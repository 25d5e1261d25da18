"""Small ONNX graph builders for the stand-in models (opset 17, IR version 8).

In opset 17 ReduceSum takes its axes as an input; ReduceMean, ReduceMax and ReduceMin take an attribute.

The graphs really consume their input image, so outputs follow the picture: colours become
a soft palette histogram, which drives character identity, tags and classifier scores.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

# Anchor colours (RGB, 0..1) of the palette histogram; the synthetic characters are drawn from them.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.85, 0.20),
    "green": (0.15, 0.65, 0.20),
    "cyan": (0.20, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.85),
    "purple": (0.55, 0.18, 0.80),
    "pink": (0.97, 0.50, 0.75),
    "brown": (0.50, 0.30, 0.12),
    "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.97, 0.97, 0.97),
    "skin": (0.99, 0.86, 0.74),
}
PALETTE_NAMES = list(PALETTE)
_SHARPNESS = 60.0  # softmax(-sharpness * squared distance): a pixel belongs mostly to its nearest anchor


@dataclass
class GraphBuilder:
    """Accumulates nodes and constants; names are generated so callers never collide."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    def name(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def const(self, value: np.ndarray | float | list, dtype: type = np.float32) -> str:
        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, *inputs: str, outputs: int = 1, out: str | list[str] | None = None, **attrs
    ) -> str | list[str]:
        if out is None:
            names = [self.name(op_type.lower()) for _ in range(outputs)]
        else:
            names = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def model(self, inputs: list, outputs: list, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "standin", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        return model


def tensor(name: str, shape: list, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def palette_fractions(g: GraphBuilder, rgb: str, pool: int) -> str:
    """[N,3,H,W] RGB in 0..1 -> [N,K] share of pixels nearest each palette anchor."""
    small = g.op("AveragePool", rgb, kernel_shape=[pool, pool], strides=[pool, pool])
    n_pixels = g.op("Reshape", small, g.const([0, 3, -1], np.int64))  # [N,3,P]
    pixels = g.op("Transpose", n_pixels, perm=[0, 2, 1])  # [N,P,3]
    anchors = np.array(list(PALETTE.values()), dtype=np.float32)  # [K,3]
    sq_pixels = g.op("ReduceSum", g.op("Mul", pixels, pixels), g.const([2], np.int64), keepdims=1)  # [N,P,1]
    cross = g.op("MatMul", pixels, g.const(anchors.T))  # [N,P,K]
    sq_anchors = g.const((anchors**2).sum(axis=1)[None, None, :])
    dist = g.op("Add", g.op("Sub", sq_pixels, g.op("Mul", cross, g.const(2.0))), sq_anchors)
    weights = g.op("Softmax", g.op("Mul", dist, g.const(-_SHARPNESS)), axis=2)
    return g.op("ReduceMean", weights, axes=[1], keepdims=0)  # [N,K]


def saturation(g: GraphBuilder, rgb: str, pool: int) -> str:
    """[N,3,H,W] -> [N,1] mean (max channel - min channel) over the non-background pixels:
    about 0 for greyscale images, however much white background surrounds the figure."""
    small = g.op("AveragePool", rgb, kernel_shape=[pool, pool], strides=[pool, pool])
    darkest = g.op("ReduceMin", small, keepdims=1, axes=[1])
    spread = g.op("Sub", g.op("ReduceMax", small, keepdims=1, axes=[1]), darkest)
    figure = g.op("Cast", g.op("Less", darkest, g.const(0.9)), to=TensorProto.FLOAT)
    total = g.op(
        "ReduceSum",
        g.op("Reshape", g.op("Mul", spread, figure), g.const([0, -1], np.int64)),
        g.const([1], np.int64),
        keepdims=1,
    )
    count = g.op("ReduceSum", g.op("Reshape", figure, g.const([0, -1], np.int64)), g.const([1], np.int64), keepdims=1)
    return g.op("Div", total, g.op("Add", count, g.const(1.0)))


def orthonormal_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """A [rows, cols] matrix with orthonormal rows: it preserves cosine similarity."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
    return q.T.astype(np.float32)
