"""merge_pooling_into_conv: kept shapes on the model zoo, the solved geometry, inherited weights checked in real
Caffe, and the places where it must not fire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, relative_error, run_caffe, save
from hypothesis import given
from hypothesis import strategies as st
from streamline_zoo import ZOO, geometry, rewrite_and_check, same_blobs

from deeprebirth.ir.graph import Graph
from deeprebirth.ir.shapes import conv_output_size, infer_shapes, pool_output_size
from deeprebirth.rewrite import rewrite
from deeprebirth.rules import RuleConfig, merge_pooling_into_conv
from deeprebirth.rules._shared import solve_axis

RULES = (merge_pooling_into_conv.RULE,)
# what merging the pooling alone does (norm1/norm2 sit between conv and pool in AlexNet and GoogLeNet conv2)
EXPECTED = {
    "bvlc_googlenet": {"conv1/7x7_s2_merge": (7, 4, 3)},
    "bvlc_alexnet": {"conv5_merge": (3, 2, 0)},
    "bvlc_reference_caffenet": {"conv1_merge": (19, 8, 0), "conv2_merge": (5, 2, 1), "conv5_merge": (3, 2, 0)},
}


@pytest.mark.parametrize("net", ZOO)
def test_model_zoo_keeps_shapes_and_runs(net: str, model_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    before, after, report = rewrite_and_check(model_zoo, net, RULES, tmp_path_factory.mktemp(net))
    merged = {layer.name: geometry(after, layer.name) for layer in after.layers() if layer.name.endswith("_merge")}
    assert merged == EXPECTED[net]
    assert len(after) == len(before) - len(merged)
    assert sorted(report.relearn) == sorted(merged)
    if net == "bvlc_googlenet":  # kernel kept: inherited weights are the original conv's
        new, old = after.layer("conv1/7x7_s2_merge").blobs, before.layer("conv1/7x7_s2").blobs
        assert new is not None and same_blobs(new, old)
    if net == "bvlc_reference_caffenet":  # widened to the receptive field: the kernel sits at the window centre
        new, old = after.layer("conv1_merge").blobs, before.layer("conv1").blobs
        assert new is not None and old is not None and new[0].shape == (96, 3, 19, 19)
        assert np.array_equal(new[0][:, :, 4:15, 4:15], old[0]) and np.count_nonzero(new[0]) == old[0].size
        assert np.array_equal(new[1], old[1])


def test_solver_on_the_paper_examples() -> None:
    assert solve_axis(224, 7, 2, 3, 3, 2, 0, 56) == (7, 3)  # GoogLeNet conv1: kernel kept
    assert solve_axis(56, 3, 1, 1, 3, 2, 0, 28) == (3, 1)  # GoogLeNet conv2/3x3
    assert conv_output_size(227, 11, 8, 0) == 28  # AlexNet conv1 with the kernel kept: one too many
    assert solve_axis(227, 11, 4, 0, 3, 2, 0, 27) == (19, 0)  # ... so it takes the receptive field


@given(st.integers(4, 40), st.integers(1, 7), st.integers(1, 3), st.integers(0, 3), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 2))
def test_solver_gives_the_pooled_size_exactly(size: int, k: int, s: int, p: int, kp: int, sp: int, pp: int) -> None:
    conv = conv_output_size(size, k, s, min(p, k - 1))
    if conv < kp or pp >= kp:
        return
    out = pool_output_size(conv, kp, sp, pp)
    solved = solve_axis(size, k, s, min(p, k - 1), kp, sp, pp, out)
    if kp > 1:  # only kernel-1 subsampling can leave no choice (see the negative test)
        assert solved is not None
    if solved is not None:
        kernel, pad = solved
        assert k <= kernel <= k + (kp - 1) * s and 0 <= pad < kernel
        assert conv_output_size(size, kernel, s * sp, pad) == out


INPUT = 'input: "data" input_shape { dim: 2 dim: 3 dim: %d dim: %d }\n'
CONV = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 %s } }\n'
RELU = 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
POOL = 'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { %s } }\n'


def net(conv: str, pool: str, size: tuple[int, int] = (9, 9), relu: str = RELU, extra: str = "") -> str:
    return INPUT % size + CONV % conv + relu + POOL % pool + extra


def merge(text: str, seed: int | None = 0, config: RuleConfig | None = None) -> tuple[Graph, Graph]:
    before, after = graph_from_text(text, seed), graph_from_text(text, seed)
    report = rewrite(after, RULES, config=config)
    assert [c.relearn for c in report.changes] == [["conv_merge"]]
    assert [c.reproduces for c in report.changes] == ["pool"]
    shapes_a, shapes_b = infer_shapes(before), infer_shapes(after)
    assert shapes_a["pool"] == shapes_b[after.outputs()[0]] and after.caffe_name(after.outputs()[0]) == "pool"
    assert [layer.type for layer in after.layers()] == [t for t in ("Input", "Convolution", "ReLU")
                                                         if t != "ReLU" or "ReLU" in text]
    return before, after


def outputs(before: Graph, after: Graph, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original conv (after its ReLU), the original pooling and the merged net's output, in real Caffe."""
    feed = input_feed(before, seed=4)
    a = run_caffe(*save(before, folder, "before"), feed, ["conv", "pool"])
    b = run_caffe(*save(after, folder, "after"), feed, ["pool"])
    assert a["pool"].shape == b["pool"].shape
    return a["conv"], a["pool"], b["pool"]


def test_kept_kernel_is_the_conv_sampled_at_each_window(tmp_path: Path) -> None:
    before, after = merge(net("kernel_size: 3 pad: 1", "pool: MAX kernel_size: 3 stride: 2", (8, 8)))
    assert geometry(after, "conv_merge") == (3, 2, 1)
    conv, _, merged = outputs(before, after, tmp_path)
    assert relative_error(conv[:, :, ::2, ::2], merged) <= 1e-5


def test_widened_kernel_is_the_conv_at_each_window_centre(tmp_path: Path) -> None:
    before, after = merge(net("kernel_size: 3", "pool: MAX kernel_size: 3 stride: 2"))  # 9 -> 7 -> 3
    assert geometry(after, "conv_merge") == (5, 2, 0)  # k3 s2 would give 4
    conv, _, merged = outputs(before, after, tmp_path)
    assert relative_error(conv[:, :, 1::2, 1::2], merged) <= 1e-5


def test_average_pooling_gives_the_averaged_kernel_exact_inside(tmp_path: Path) -> None:
    before, after = merge(net("kernel_size: 3", "pool: AVE kernel_size: 3 stride: 2", relu=""))
    assert geometry(after, "conv_merge") == (5, 2, 0)
    _, pool, merged = outputs(before, after, tmp_path)  # windows fit exactly: no border, so exact everywhere
    assert relative_error(pool, merged) <= 1e-5


def test_rectangular_input_solves_each_axis(tmp_path: Path) -> None:
    before, after = merge(net("kernel_size: 3", "pool: MAX kernel_size: 3 stride: 2", (9, 10)))
    p = after.layer("conv_merge").proto.convolution_param
    assert (p.kernel_h, p.kernel_w, list(p.kernel_size)) == (5, 3, [])  # W: 10 -> 8 -> 4 = k3 s2
    outputs(before, after, tmp_path)


def test_group_conv_merges() -> None:
    text = net("kernel_size: 3 pad: 1 group: 2", "pool: MAX kernel_size: 2 stride: 2").replace("dim: 3", "dim: 6")
    _, after = merge(text)
    assert after.layer("conv_merge").proto.convolution_param.group == 2


def test_without_weights_rewrites_the_prototxt_only() -> None:
    _, after = merge(net("kernel_size: 3", "pool: MAX kernel_size: 3 stride: 2"), seed=None)
    assert after.layer("conv_merge").blobs is None


def test_filler_init_draws_seeded_weights_of_the_right_shape() -> None:
    text = net("kernel_size: 3 weight_filler { type: 'xavier' } bias_filler { type: 'constant' value: 0.1 }",
               "pool: MAX kernel_size: 3 stride: 2")
    blobs = [merge(text, config=RuleConfig(init="filler", seed=s))[1].layer("conv_merge").blobs for s in (1, 1, 2)]
    assert blobs[0] is not None and blobs[1] is not None and blobs[2] is not None
    assert [b.shape for b in blobs[0]] == [(4, 3, 5, 5), (4,)] and np.all(blobs[0][1] == np.float32(0.1))
    assert np.array_equal(blobs[0][0], blobs[1][0]) and not np.array_equal(blobs[0][0], blobs[2][0])


def skip_reasons(text: str, seed: int | None = 0) -> list[str]:
    graph = graph_from_text(text, seed)
    report = rewrite(graph, RULES)
    assert not report.changes
    return [s.reason for s in report.skipped["merge_pooling_into_conv"]]


POOLED = "pool: MAX kernel_size: 3 stride: 2"
OTHER = 'layer { name: "other" type: "Sigmoid" bottom: "%s" top: "s" }\n'
RELU_APART = 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "r" }\n'


@pytest.mark.parametrize("text, reason", [
    (net("kernel_size: 3", POOLED, extra=OTHER % "conv"), "other consumers"),  # the ReLU's output, read twice
    (net("kernel_size: 3", POOLED, relu="", extra=OTHER % "conv"), "other consumers"),
    (net("kernel_size: 3", POOLED, relu=RELU_APART + OTHER % "conv").replace('"conv" top: "pool"', '"r" top: "pool"'),
     "other consumers"),  # the conv's output, read by the ReLU and another layer
    (net("kernel_size: 3", "pool: AVE global_pooling: true"), "global"),
    (net("kernel_size: 3 dilation: 2", POOLED), "dilated"),
    (net("kernel_size: 3", "pool: STOCHASTIC kernel_size: 3 stride: 2"), "STOCHASTIC"),
    # kernel-1 subsampling (as some ResNets do it) on an even size: Caffe's pooling gives 6 -> ceil(5 / 2) + 1 = 4,
    # a stride-2 conv 3; only a pad as large as the kernel would give 4, and such a window sees no input
    (net("kernel_size: 1", "pool: MAX kernel_size: 1 stride: 2", (6, 6)), "no kernel"),
    (INPUT % (9, 9) + POOL.replace('bottom: "conv"', 'bottom: "data"') % POOLED, "not a chain"),
    (INPUT % (9, 9) + 'layer { name: "odd" type: "MyCustomLayer" bottom: "data" top: "x" }\n'
     + (CONV + RELU + POOL).replace('bottom: "data"', 'bottom: "x"') % ("kernel_size: 3", POOLED), "unknown"),
], ids=["relu_output_read_twice", "conv_output_read_twice", "conv_output_read_by_relu_and_other", "global",
        "dilated", "stochastic", "no_exact_shape", "not_after_a_conv", "shapes_unknown"])
def test_does_not_fire(text: str, reason: str) -> None:
    reasons = skip_reasons(text, seed=None if "MyCustomLayer" in text else 0)
    assert reasons and reason in reasons[0], reasons
