"""Shape inference and costs (deeprebirth.ir.shapes): Caffe's output-size rounding against brute-force window counts,
parameter and MAC counts against their formulas, errors that name the layer, and every real net against Caffe."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import graph_from_text
from hypothesis import given
from hypothesis import strategies as st

from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import conv_output_size, infer_shapes, layer_costs, pool_output_size


def zoo_prototxts(model_zoo: Path) -> list[Path]:
    return sorted(p for p in model_zoo.glob("*/*.prototxt") if "solver" not in p.name)


@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3), st.integers(1, 3))
def test_conv_output_size_counts_the_windows_that_fit(size: int, k: int, s: int, p: int, d: int) -> None:
    extent = d * (k - 1) + 1
    fits = [start for start in range(-p, size + p) if start + extent <= size + p]
    expected = len(fits[::s]) if fits else 0
    assert max(conv_output_size(size, k, s, p, d), 0) == expected


@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3))
def test_pool_output_size_is_caffes_ceil_rule(size: int, k: int, s: int, p: int) -> None:
    """Caffe pools with windows every s from -p until one reaches the padded end (so a last partial window
    counts), then, when padded, drops a last window that starts in the right padding."""
    if p >= k or k > size + 2 * p:
        return  # Caffe refuses these
    starts = [-p]
    while starts[-1] + k < size + p:
        starts.append(starts[-1] + s)
    if p and starts[-1] >= size:
        starts.pop()
    assert pool_output_size(size, k, s, p) == len(starts)


NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 17 dim: 17 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 group: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "gconv" type: "Convolution" bottom: "conv" top: "gconv"
        convolution_param { num_output: 4 kernel_h: 1 kernel_w: 3 group: 2 bias_term: false } }
layer { name: "pool" type: "Pooling" bottom: "gconv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 10 } }
"""


def test_shapes_params_and_macs_follow_the_formulas() -> None:
    graph = graph_from_text(NET, seed=None)
    shapes = {graph.caffe_name(b): s for b, s in infer_shapes(graph).items()}
    assert shapes["conv"] == (2, 8, 9, 9)  # (17 + 2 - 3) // 2 + 1
    assert shapes["gconv"] == (2, 4, 9, 7)
    assert shapes["pool"] == (2, 4, 4, 3)  # ceil((9 - 3) / 2) + 1, ceil((7 - 3) / 2) + 1
    assert shapes["fc"] == (2, 10)
    costs = {c.name: c for c in layer_costs(graph)}
    assert costs["conv"].params == 8 * 3 * 9 + 8 and costs["conv"].macs == 2 * 8 * 9 * 9 * 3 * 9
    assert costs["gconv"].params == 4 * 4 * 3 and costs["gconv"].macs == 2 * 4 * 9 * 7 * (8 // 2) * 3
    assert costs["bn"].params == 8 + 8 + 1 and costs["bn"].macs == 2 * 8 * 9 * 9
    assert costs["fc"].params == 10 * 4 * 4 * 3 + 10 and costs["fc"].macs == 2 * 10 * 48
    assert costs["bn"].activation_bytes == costs["relu"].activation_bytes == 0  # in place: no new memory
    assert costs["pool"].activation_bytes == 4 * 2 * 4 * 4 * 3


def test_unknown_layer_types_pass_unknown_shapes_on() -> None:
    graph = graph_from_text(NET.replace('type: "ReLU"', 'type: "MysteryOp"'), seed=None)
    shapes = {graph.caffe_name(b): s for b, s in infer_shapes(graph).items()}
    assert shapes["data"] == (2, 3, 17, 17) and shapes["gconv"] is None and shapes["fc"] is None
    assert {c.name: c.top_shapes for c in layer_costs(graph)}["fc"] is None


def test_a_layer_that_does_not_fit_is_named() -> None:
    text = NET.replace("num_output: 4 kernel_h: 1 kernel_w: 3 group: 2", "num_output: 4 kernel_size: 3 group: 3")
    with pytest.raises(DeepRebirthError, match="gconv"):
        infer_shapes(graph_from_text(text, seed=None))


def test_shapes_match_real_caffe(model_zoo: Path, assets: dict[str, str], tmp_path: Path) -> None:
    paths = [p for p in zoo_prototxts(model_zoo) if p.name == "deploy.prototxt"]
    paths += [Path(assets["open_nsfw.prototxt"]), Path(assets["ssd_face.prototxt"])]
    from deeprebirth.caffe.runtime import open_net

    for path in paths:
        graph = load_model(path)
        shapes = infer_shapes(graph)
        names = graph.caffe_blob_names()
        out = tmp_path / "net.prototxt"
        save_model(graph, out)
        net = open_net(out)
        final = {}  # the last SSA version of each Caffe name is what Caffe's blob holds
        for blob in graph.blobs():
            final[names[blob]] = shapes[blob]
        for name, shape in final.items():
            if graph.producer(next(b for b in graph.blobs() if names[b] == name)).type == "DetectionOutput":
                continue
            assert tuple(net.blobs[name].data.shape) == shape, f"{path.name}: {name}"


