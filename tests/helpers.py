"""Small test helpers: build nets from prototxt text, give them random weights, run them in real Caffe."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from deeprebirth.caffe.runtime import forward, open_net
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import save_model
from deeprebirth.ir.shapes import infer_shapes

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A script of the project (``benchmarks/``, ``scripts/``: not packages) imported from its path."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graph_from_text(text: str, seed: int | None = 0) -> Graph:
    """A graph from prototxt text; with ``seed`` it gets random weights."""
    graph = Graph.from_net(caffe_io.normalize_net(caffe_io.parse_prototxt(text)), source="<test>")
    infer_shapes(graph)
    if seed is not None:
        random_weights(graph, seed)
    return graph


def save(graph: Graph, folder: Path, stem: str) -> tuple[str, str]:
    proto, model = folder / f"{stem}.prototxt", folder / f"{stem}.caffemodel"
    save_model(graph, proto, model)
    return str(proto), str(model)


def input_feed(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    shapes = infer_shapes(graph)
    rng = np.random.default_rng(seed)
    return {graph.caffe_name(b): rng.standard_normal(shapes[b]).astype(np.float32)  # type: ignore[arg-type]
            for b in graph.inputs()}


def run_caffe(proto: str, model: str, feed: dict[str, np.ndarray], blobs: list[str]) -> dict[str, np.ndarray]:
    """Forward once in real Caffe (in this process)."""
    return forward(open_net(proto, model), feed, blobs)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |a|."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12))


def planted(n: int = 32, c: int = 24, ranks: tuple[int, int] = (4, 6), kernel: tuple[int, int] = (3, 3),
            noise: float = 1e-3, seed: int = 0) -> np.ndarray:
    """A kernel (N, C, kh, kw) of exact Tucker ranks (R1 on C, R2 on N), plus Gaussian noise relative to its peak."""
    rng = np.random.default_rng(seed)
    r1, r2 = ranks
    core = rng.standard_normal((r2, r1, *kernel))
    u_in = np.linalg.qr(rng.standard_normal((c, r1)))[0]
    u_out = np.linalg.qr(rng.standard_normal((n, r2)))[0]
    w = np.einsum("srhw,cr,ns->nchw", core, u_in, u_out)
    return w + noise * np.abs(w).max() * rng.standard_normal(w.shape)
