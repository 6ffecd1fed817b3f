"""The ONNX exporter layer type by layer type: small generated nets run in real Caffe and in ONNX Runtime must agree
(max |a - b| / max |a| <= 1e-5), and every exported model passes onnx.checker's full check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import graph_from_text, input_feed, relative_error, run_caffe, save

from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.onnx import pool_pads, to_onnx
from deeprebirth.ir.shapes import pool_output_size


def net(body: str, *shapes: tuple[int, ...], tops: tuple[str, ...] = ("data",)) -> str:
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes)
    top = " ".join(f'top: "{t}"' for t in tops)
    return f'name: "t"\nlayer {{ name: "input" type: "Input" {top} input_param {{ {dims} }} }}\n{body}'


def conv(name: str, bottom: str, settings: str = "num_output: 6 kernel_size: 3 pad: 1") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ {settings} }} }}\n')


def layer(name: str, kind: str, bottoms: str | list[str], settings: str = "", top: str | None = None) -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    return f'layer {{ name: "{name}" type: "{kind}" {b} top: "{top or name}" {settings} }}\n'


X = (1, 4, 7, 9)
CASES: dict[str, str] = {
    "conv": net(conv("c", "data"), X),
    "conv_group_dilation_rect": net(conv("c", "data", "num_output: 6 kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 "
                                                        "pad_h: 1 pad_w: 2 dilation: 2 group: 2 bias_term: false"),
                                    (2, 4, 11, 12)),
    "conv_two_bottoms": net(conv("c", "data").replace('top: "c"', 'bottom: "data2" top: "c" top: "c2"'), X, X,
                            tops=("data", "data2")),
    "deconv": net(layer("d", "Deconvolution", "data",
                        "convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2 }"), X),
    "pool_max_ceil": net(layer("p", "Pooling", "data", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"), X),
    # Caffe's ceil rule clips the last window here (it would start in the padding): 5 -> 3, not 4
    "pool_max_clipped": net(layer("p", "Pooling", "data", "pooling_param { pool: MAX kernel_size: 2 stride: 2 "
                                                          "pad: 1 }"), (1, 3, 5, 7)),
    "pool_ave_clipped": net(layer("p", "Pooling", "data", "pooling_param { pool: AVE kernel_size: 2 stride: 2 "
                                                          "pad: 1 }"), (1, 3, 5, 7)),
    # the last window reaches past the padding: Caffe's divisor leaves that part out
    "pool_ave_past_pad": net(layer("p", "Pooling", "data", "pooling_param { pool: AVE kernel_size: 3 stride: 2 "
                                                           "pad: 1 }"), (1, 3, 6, 8)),
    "pool_ave_ceil_no_pad": net(layer("p", "Pooling", "data", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }"),
                                X),
    "pool_ave_same": net(layer("p", "Pooling", "data", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }"),
                         X),
    "pool_rect_stride_gt_kernel": net(layer("p", "Pooling", "data", "pooling_param { pool: MAX kernel_h: 2 "
                                                                    "kernel_w: 1 stride_h: 3 stride_w: 2 }"), X),
    "pool_global_max": net(layer("p", "Pooling", "data", "pooling_param { pool: MAX global_pooling: true }"), X),
    "pool_global_ave": net(layer("p", "Pooling", "data", "pooling_param { pool: AVE global_pooling: true }"), X),
    "inner_product": net(layer("fc", "InnerProduct", "data", "inner_product_param { num_output: 5 }"), X),
    "inner_product_axis2": net(layer("fc", "InnerProduct", "data", "inner_product_param { num_output: 5 axis: 2 }"),
                               X),
    "inner_product_transpose": net(layer("fc", "InnerProduct", "data", "inner_product_param { num_output: 5 "
                                                                       "transpose: true bias_term: false }"), (3, 10)),
    "relu": net(layer("r", "ReLU", "data"), X),
    "relu_leaky_in_place": net(conv("c", "data") + layer("r", "ReLU", "c", "relu_param { negative_slope: 0.1 }",
                                                         top="c"), X),
    "relu6_in_place": net(conv("c", "data") + layer("r", "ReLU6", "c", top="c"), X),
    "relu6_threshold": net(layer("r", "ReLU6", "data", "relu6_param { threshold: 0.5 }"), X),
    "prelu": net(layer("r", "PReLU", "data"), X),
    "prelu_shared": net(layer("r", "PReLU", "data", "prelu_param { channel_shared: true }"), X),
    "elu": net(layer("r", "ELU", "data", "elu_param { alpha: 0.7 }"), X),
    "sigmoid": net(layer("r", "Sigmoid", "data"), X),
    "tanh": net(layer("r", "TanH", "data"), X),
    "absval": net(layer("r", "AbsVal", "data"), X),
    "bnll": net(layer("r", "BNLL", "data"), X),
    "lrn_across": net(layer("n", "LRN", "data", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }"),
                      (1, 6, 5, 5)),
    "lrn_within": net(layer("n", "LRN", "data", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 "
                                                "norm_region: WITHIN_CHANNEL }"), X),
    "concat": net(conv("a", "data") + conv("b", "data") + layer("cat", "Concat", ["a", "data", "b"]), X),
    "concat_axis2": net(layer("cat", "Concat", ["data", "data"], "concat_param { axis: 2 }"), X),
    "eltwise_sum_coeff": net(conv("a", "data") + layer("s", "Eltwise", ["a", "a", "a"],
                                                       "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 "
                                                       "coeff: 2 }"), X),
    "eltwise_prod": net(conv("a", "data") + conv("b", "data") + layer("s", "Eltwise", ["a", "b", "a"],
                                                                      "eltwise_param { operation: PROD }"), X),
    "eltwise_max": net(conv("a", "data") + conv("b", "data") + layer("s", "Eltwise", ["a", "b"],
                                                                     "eltwise_param { operation: MAX }"), X),
    "softmax": net(layer("s", "Softmax", "data"), X),
    "softmax_axis2": net(layer("s", "Softmax", "data", "softmax_param { axis: 2 }"), X),
    "batchnorm_scale_in_place": net(conv("c", "data") + layer("bn", "BatchNorm", "c", "batch_norm_param { eps: 0.01 }",
                                                              top="c")
                                    + layer("sc", "Scale", "c", "scale_param { bias_term: true }", top="c"), X),
    "scale_two_bottoms": net(layer("sc", "Scale", ["data", "f"], "scale_param { axis: 0 }"), (2, 4, 3, 3), (2, 4),
                             tops=("data", "f")),
    "bias": net(layer("b", "Bias", "data"), X),
    "power": net(layer("p", "Power", "data", "power_param { power: 2 scale: 0.5 shift: 1 }"), X),
    "flatten": net(layer("f", "Flatten", "data"), X),
    "flatten_axis2": net(layer("f", "Flatten", "data", "flatten_param { axis: 2 }"), X),
    "reshape": net(layer("r", "Reshape", "data", "reshape_param { shape { dim: 0 dim: -1 dim: 3 } }"), X),
    "slice": net(layer("s", "Slice", "data", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }", top="s1")
                 .replace('top: "s1"', 'top: "s1" top: "s2" top: "s3"'), X),
    "split": net(layer("sp", "Split", "data", top="d1").replace('top: "d1"', 'top: "d1" top: "d2"')
                 + conv("a", "d1") + conv("b", "d2"), X),
    "crop": net(layer("c", "Crop", ["data", "ref"], "crop_param { axis: 2 offset: 1 offset: 2 }"), X, (1, 4, 4, 5),
                tops=("data", "ref")),
    "dropout": net(conv("c", "data") + layer("d", "Dropout", "c", top="c") + layer("s", "Softmax", "c"), X),
    "dropout_is_output": net(conv("c", "data") + layer("d", "Dropout", "c", top="c"), X),
}


def export_and_compare(text: str, folder: Path, tolerance: float = 1e-5) -> onnx.ModelProto:
    graph = graph_from_text(text, seed=3)
    proto, weights = save(graph, folder, "net")
    model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    feed = input_feed(graph)
    outputs = [graph.caffe_name(b) for b in graph.outputs()]
    assert [o.name for o in model.graph.output] == outputs
    want = run_caffe(proto, weights, feed, outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(outputs, session.run(outputs, feed)))
    for name in outputs:
        assert got[name].shape == want[name].shape, name
        assert relative_error(want[name], got[name]) <= tolerance, (name, relative_error(want[name], got[name]))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_caffe(case: str, tmp_path: Path) -> None:
    model = export_and_compare(CASES[case], tmp_path)
    ops = {node.op_type for node in model.graph.node}
    if case.startswith("dropout") or case == "split":
        assert "Dropout" not in ops and "Split" not in ops  # identities at inference
    if case == "pool_ave_past_pad":
        assert "Pad" in ops


def test_small_inception_net_matches_caffe(tmp_path: Path) -> None:
    from nets import tiny_inception

    export_and_compare(tiny_inception(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# pooling geometry against a reference of Caffe's pooling loops (pooling_layer.cpp), many sizes in one go


def caffe_pool(x: np.ndarray, kernel: int, stride: int, pad: int, ave: bool, ceil: bool = True) -> np.ndarray:
    """Caffe's forward pooling loops for one spatial axis pair with equal settings, in numpy."""
    n, c, h, w = x.shape
    oh, ow = (pool_output_size(s, kernel, stride, pad, ceil) for s in (h, w))
    out = np.zeros((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * stride - pad, j * stride - pad
            he, we = min(hs + kernel, h + pad), min(ws + kernel, w + pad)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            window = x[:, :, hs:he, ws:we]
            out[:, :, i, j] = window.sum(axis=(2, 3)) / size if ave else window.max(axis=(2, 3))
    return out


def test_pool_pads_reproduce_caffe_geometry_everywhere() -> None:
    rng = np.random.default_rng(0)
    cases = [(size, k, s, p, ave, ceil) for size in (3, 4, 5, 6, 7, 9) for k in (1, 2, 3, 4) for s in (1, 2, 3, 5)
             for p in range(k) for ave in (False, True) for ceil in (True, False)
             if k <= size + 2 * p and all(pool_pads(n, k, s, p, pool_output_size(n, k, s, p, ceil))[1] < k
                                          for n in (size, size + 1))]
    assert len(cases) > 500
    for size, k, s, p, ave, ceil in cases:
        rounding = "" if ceil else " round_mode: FLOOR"
        text = net(layer("p", "Pooling", "data", f"pooling_param {{ pool: {'AVE' if ave else 'MAX'} kernel_size: {k} "
                                                 f"stride: {s} pad: {p}{rounding} }}"), (1, 2, size, size + 1))
        graph = graph_from_text(text, seed=None)
        x = rng.standard_normal((1, 2, size, size + 1)).astype(np.float32)
        model = to_onnx(graph)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                       {"data": x})[0]
        want = caffe_pool(x, k, s, p, ave, ceil)
        assert got.shape == want.shape, (size, k, s, p, ave, ceil)
        assert np.allclose(got, want, atol=1e-6), (size, k, s, p, ave, ceil)


def test_pool_pads_formula() -> None:
    assert pool_pads(5, 2, 2, 1, 3) == (1, 0)  # the clipped window is gone: no extra pad
    assert pool_pads(6, 3, 2, 1, 4) == (1, 2)  # end pad past Caffe's: AVE divisor handled by Pad + exclude-pad
    assert pool_pads(7, 2, 3, 0, 2) == (0, -2)  # FLOOR rounding, stride > kernel: two rows never read


# ---------------------------------------------------------------------------------------------------------------
# refusals: by layer name and type, one line


@pytest.mark.parametrize("kind, settings, why", [
    ("ArgMax", "", "no ONNX equivalent"),
    ("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 }", "stochastic"),
    ("BatchNorm", "batch_norm_param { use_global_stats: false }", "use_global_stats"),
    ("Normalize", "", "SSD-only"),
    ("ReLU6", "relu6_param { negative_slope: 0.1 }", "negative slope"),
])
def test_refused_layers_are_named(kind: str, settings: str, why: str) -> None:
    graph = graph_from_text(net(layer("odd", kind, "data", settings), X), seed=None)
    with pytest.raises(DeepRebirthError) as err:
        to_onnx(graph)
    message = str(err.value)
    assert "layer 'odd'" in message and kind in message and why in message and "\n" not in message


def test_opset_range_and_outputs_option() -> None:
    graph = graph_from_text(CASES["dropout"], seed=1)
    with pytest.raises(DeepRebirthError, match="opset 11"):
        to_onnx(graph, opset=11)
    model = to_onnx(graph, outputs=["c", "s"])
    assert [o.name for o in model.graph.output] == ["c", "s"]
    with pytest.raises(DeepRebirthError, match="no blob named 'nope'"):
        to_onnx(graph, outputs=["nope"])
    trimmed = to_onnx(graph, outputs=["c"])
    assert {n.op_type for n in trimmed.graph.node} == {"Conv", "Identity"}  # c is the Dropout's (in place)
