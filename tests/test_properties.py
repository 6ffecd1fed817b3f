"""Properties of reading, writing and rewriting, on random valid Caffe nets with random weights.

The nets come from the generator in tests/fuzzing/nets.py driven by hypothesis (chains, branches, in-place layers,
blobs with several readers, groups, dilation, odd sizes; BatchNorm, Scale, Dropout, ReLU, Pooling, Concat, Eltwise,
InnerProduct, Convolution, Deconvolution, LRN, Flatten, Slice, Softmax ...), so a failure shrinks to a small net.
Real Caffe runs in one long-lived spawned worker: an abort there fails the example instead of killing pytest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzing.harness import caffe_outputs
from fuzzing.nets import hypothesis_nets, net_graph
from helpers import input_feed, relative_error
from hypothesis import HealthCheck, given, settings

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.io import caffe_io
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import infer_shapes

# DEEPREBIRTH_EXAMPLES=2000 for a long hunt; CI keeps the test time to seconds
SCALE = int(os.environ.get("DEEPREBIRTH_EXAMPLES", "60")) / 60
QUICK = settings(max_examples=max(1, int(60 * SCALE)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
WITH_CAFFE = settings(max_examples=max(1, int(30 * SCALE)), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])


class Caffe:
    """pycaffe in a spawned worker that is replaced when Caffe aborts in it."""

    def __init__(self) -> None:
        self.pool = self._new()

    @staticmethod
    def _new() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))

    def outputs(self, prototxt: Path, caffemodel: Path, feed: dict[str, np.ndarray],
                blobs: list[str]) -> dict[str, np.ndarray]:
        try:
            return self.pool.submit(caffe_outputs, str(prototxt), str(caffemodel), feed, blobs).result()
        except BrokenProcessPool:
            self.pool = self._new()
            raise AssertionError(f"Caffe aborted on {prototxt.name}:\n{prototxt.read_text()}") from None


@pytest.fixture(scope="module")
def caffe() -> Iterator[Caffe]:
    runner = Caffe()
    yield runner
    runner.pool.shutdown()


def rewrite_pair(text: str, folder: Path, rules: str, seed: int = 0) -> tuple[Any, Path, Path, Path, Path]:
    """Write the net with random weights as a.prototxt/a.caffemodel and rewrite it into b.*."""
    save_model(net_graph(text, seed), folder / "a.prototxt", folder / "a.caffemodel")
    result = rewrite_files(folder / "a.prototxt", folder / "b.prototxt", folder / "a.caffemodel",
                           folder / "b.caffemodel", options=RewriteOptions(rules=rules))
    return result.report, folder / "a.prototxt", folder / "a.caffemodel", folder / "b.prototxt", folder / "b.caffemodel"


@QUICK
@given(hypothesis_nets())
def test_write_then_read_is_the_identity(text: str) -> None:
    graph = net_graph(text, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        proto, model = Path(tmp) / "n.prototxt", Path(tmp) / "n.caffemodel"
        save_model(graph, proto, model)
        again = load_model(proto, model)
        assert again.to_net() == graph.to_net()
        for layer in graph.layers():
            other = again.layer(layer.name)
            assert len(layer.blobs or []) == len(other.blobs or [])
            for a, b in zip(layer.blobs or [], other.blobs or []):
                assert a.shape == b.shape and a.tobytes() == b.tobytes(), layer.name
        save_model(again, Path(tmp) / "m.prototxt", Path(tmp) / "m.caffemodel")
        assert (Path(tmp) / "m.prototxt").read_bytes() == proto.read_bytes()
        assert (Path(tmp) / "m.caffemodel").read_bytes() == model.read_bytes()
        assert caffe_io.parse_prototxt(caffe_io.format_prototxt(graph.to_net())) == graph.to_net()


@WITH_CAFFE
@given(hypothesis_nets())
def test_exact_rewrites_keep_outputs_in_caffe(caffe: Caffe, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report, a_proto, a_model, b_proto, b_model = rewrite_pair(text, Path(tmp), "exact")
        assert all(change.exact for change in report.changes)
        original = load_model(a_proto, a_model)
        outputs = [original.caffe_name(b) for b in original.outputs()]
        feed = input_feed(original, seed=3)
        before = caffe.outputs(a_proto, a_model, feed, outputs)
        after = caffe.outputs(b_proto, b_model, feed, outputs)
        for name in outputs:
            assert before[name].shape == after[name].shape, name
            assert relative_error(before[name], after[name]) <= 1e-4, (name, report.changes)


@WITH_CAFFE
@given(hypothesis_nets())
def test_every_rewrite_keeps_the_output_shapes(caffe: Caffe, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report, a_proto, _, b_proto, b_model = rewrite_pair(text, Path(tmp), "all")
        assert report.after.output_shapes == report.before.output_shapes
        before_inputs = {(n, tuple(s)) for n, s in _inputs(a_proto)}
        assert {(n, tuple(s)) for n, s in _inputs(b_proto)} == before_inputs
        rewritten = load_model(b_proto, b_model)
        shapes = infer_shapes(rewritten)
        assert {rewritten.caffe_name(b): list(shapes[b] or ()) for b in rewritten.outputs()} == \
            report.before.output_shapes
        # and Caffe agrees: it builds the rewritten net and its outputs have those shapes
        names = list(report.before.output_shapes)
        after = caffe.outputs(b_proto, b_model, input_feed(rewritten, seed=3), names)
        assert {name: list(after[name].shape) for name in names} == report.before.output_shapes


def _inputs(prototxt: Path) -> list[tuple[str, list[int]]]:
    graph = load_model(prototxt)
    shapes = infer_shapes(graph)
    return [(graph.caffe_name(b), list(shapes[b] or ())) for b in graph.inputs()]


@QUICK
@given(hypothesis_nets())
def test_rewriting_twice_equals_rewriting_once(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rewrite_pair(text, folder, "all")
        second = rewrite_files(folder / "b.prototxt", folder / "c.prototxt", folder / "b.caffemodel",
                               folder / "c.caffemodel", options=RewriteOptions(rules="all"))
        assert second.report.changes == []
        assert (folder / "c.prototxt").read_bytes() == (folder / "b.prototxt").read_bytes()
        assert (folder / "c.caffemodel").read_bytes() == (folder / "b.caffemodel").read_bytes()
