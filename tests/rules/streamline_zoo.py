"""Shared by the streamline-slimming tests: model-zoo nets with random weights, and the checks every rewrite of
them must pass (kept blob shapes, untouched weights, new layers named *_merge, real Caffe and OpenCV run it)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import run_caffe, save

from deeprebirth.caffe.runtime import opencv_forward
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model
from deeprebirth.ir.shapes import Shape, conv_geometry, infer_shapes
from deeprebirth.rewrite import RewriteReport, rewrite
from deeprebirth.rules import Rule

NETS = ("bvlc_googlenet", "bvlc_alexnet", "bvlc_reference_caffenet")
# AlexNet and CaffeNet carry 61 M weights: seconds to draw, save and load
ZOO = [pytest.param(net, marks=pytest.mark.slow) if net != "bvlc_googlenet" else net for net in NETS]
_CACHE: dict[str, tuple[Graph, dict[str, tuple[int, ...]]]] = {}


def feed(graph: Graph) -> dict[str, np.ndarray]:
    """One image (batch 1) of N(0, 1) values per input."""
    shapes = infer_shapes(graph)
    rng = np.random.default_rng(7)
    return {graph.caffe_name(b): rng.standard_normal((1, *shapes[b][1:])).astype(np.float32)  # type: ignore[index]
            for b in graph.inputs()}


def caffe_shapes(graph: Graph, folder: Path, stem: str) -> tuple[dict[str, tuple[int, ...]], str, str]:
    """Save, run once in real Caffe and return the shape of every blob by Caffe name (and the files)."""
    proto, model = save(graph, folder, stem)
    names = sorted(set(graph.caffe_blob_names().values()))
    return {k: v.shape for k, v in run_caffe(proto, model, feed(graph), names).items()}, proto, model


def original(model_zoo: Path, net: str, folder: Path) -> tuple[Graph, dict[str, tuple[int, ...]]]:
    """The net with seeded random weights (shared: do not change it), and its blob shapes in real Caffe; both made
    once per test session (AlexNet's 61 M random weights take seconds)."""
    if net not in _CACHE:
        graph = load_model(model_zoo / net / "deploy.prototxt")
        random_weights(graph, seed=3)
        _CACHE[net] = (graph, caffe_shapes(graph, folder, f"{net}_original")[0])
    return _CACHE[net]


def shapes_by_name(graph: Graph) -> dict[str, Shape | None]:
    names, shapes = graph.caffe_blob_names(), infer_shapes(graph)
    return {names[b]: shapes[b] for b in graph.blobs()}


def same_blobs(a: list[np.ndarray] | None, b: list[np.ndarray] | None) -> bool:
    """Both without weights, or the same number of blobs, equal bit for bit."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def geometry(graph: Graph, layer: str) -> tuple[int, int, int]:
    """(kernel, stride, pad) of a square conv."""
    g = conv_geometry(graph.layer(layer).proto.convolution_param)
    assert g.kernel[0] == g.kernel[1] and g.stride[0] == g.stride[1] and g.pad[0] == g.pad[1], g
    return g.kernel[0], g.stride[0], g.pad[0]


def rewrite_and_check(model_zoo: Path, net: str, rules: Sequence[Rule], folder: Path) -> tuple[Graph, Graph,
                                                                                                 RewriteReport]:
    """Rewrite a copy of ``net`` with ``rules`` and check everything a lossy streamline rewrite must keep."""
    before, caffe_before = original(model_zoo, net, folder)
    after = copy.deepcopy(before)
    report = rewrite(after, rules)
    assert report.changes and not any(c.exact for c in report.changes)
    old, new = shapes_by_name(before), shapes_by_name(after)
    assert {n: old[n] for n in old.keys() & new.keys()} == {n: new[n] for n in old.keys() & new.keys()}
    outputs = {before.caffe_name(b): old[before.caffe_name(b)] for b in before.outputs()}
    assert outputs == {after.caffe_name(b): new[after.caffe_name(b)] for b in after.outputs()}
    reproduced = {name: change.reproduces for change in report.changes for name in change.relearn}
    for name, blob in reproduced.items():  # what each new layer reproduces in the end is there, with its shape
        assert name in after and blob is not None and blob in new and new[blob] == old[blob], (name, blob)
    for layer in after.layers():
        if layer.name in before:
            assert same_blobs(layer.blobs, before.layer(layer.name).blobs), layer.name
        else:
            assert layer.name.endswith("_merge") and layer.type == "Convolution", layer.name
            assert layer.name in report.relearn
            assert layer.blobs is not None
    caffe_after, proto, model = caffe_shapes(after, folder, f"{net}_rewritten")
    assert {n: caffe_before[n] for n in caffe_before.keys() & caffe_after.keys()} == \
        {n: caffe_after[n] for n in caffe_before.keys() & caffe_after.keys()}
    final = before.caffe_name(before.outputs()[0])
    assert caffe_after[final] == caffe_before[final]
    assert opencv_forward(proto, model, feed(after)).shape == caffe_before[final]
    return before, after, report
