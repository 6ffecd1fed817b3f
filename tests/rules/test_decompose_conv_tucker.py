"""decompose_conv_tucker: exact at full ranks in real Caffe, MACs as predicted at reduced ranks, refusals,
idempotence, the opt-in group and preset, and GoogLeNet decomposed end to end in Caffe and OpenCV dnn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, input_feed, planted, relative_error, run_caffe, save
from nets import tiny_inception

from deeprebirth.api import PRESETS, preset_options, rewrite_files
from deeprebirth.caffe.runtime import opencv_forward
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model
from deeprebirth.ir.shapes import layer_costs
from deeprebirth.rewrite import RewriteReport, rewrite, select_rules
from deeprebirth.rules import RULES, RuleConfig, Skip
from deeprebirth.rules.decompose_conv_tucker import RULE, match

INPUT = 'input: "data" input_shape { dim: 2 dim: 8 dim: 11 dim: 9 }\n'
CONV = ('layer { name: "conv" type: "TYPE" bottom: "data" top: "y" param { lr_mult: 1 } param { lr_mult: 2 } '
        'convolution_param { num_output: 12 SETTINGS weight_filler { type: "xavier" } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }\n')


def conv_text(settings: str = "kernel_size: 3 pad: 1", kind: str = "Convolution") -> str:
    text = CONV.replace("TYPE", kind).replace("SETTINGS", settings)
    return text.replace(" param { lr_mult: 2 }", "") if "bias_term: false" in settings else text


def net(settings: str = "kernel_size: 3 pad: 1", kind: str = "Convolution") -> str:
    return INPUT + conv_text(settings, kind)


def decompose(graph: Graph, method: str, **config: str) -> RewriteReport:
    return rewrite(graph, (RULE,), config=RuleConfig(rank_method=method, **config))  # type: ignore[arg-type]


def macs(graph: Graph, names: list[str]) -> int:
    return sum(c.macs for c in layer_costs(graph) if c.name in names)


GEOMETRIES = {
    "3x3_pad1": "kernel_size: 3 pad: 1",
    "3x3_stride2_pad1": "kernel_size: 3 stride: 2 pad: 1",
    "5x5_stride2_no_pad": "kernel_size: 5 stride: 2",
    "rect_3x5_pad_1x2": "kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2",
    "rect_stride_2x1": "kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1",
    "dilation2_pad2": "kernel_size: 3 dilation: 2 pad: 2",
    "no_bias": "kernel_size: 3 pad: 1 bias_term: false",
    "no_bias_stride3_dilation2": "kernel_size: 3 stride: 3 dilation: 2 bias_term: false",
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_full_ranks_reproduce_the_conv_in_caffe(case: str, tmp_path: Path) -> None:
    text = net(GEOMETRIES[case])
    original = graph_from_text(text, seed=7)
    proto_a, model_a = save(original, tmp_path, "original")
    graph = graph_from_text(text, seed=7)
    report = decompose(graph, "full")
    [change] = report.changes
    assert change.added == ["conv_tucker_reduce", "conv_tucker_core", "conv_tucker_expand"]
    assert change.relearn == change.added and change.removed == ["conv"] and not change.exact
    assert change.reproduces == "y"
    assert [layer.name for layer in graph.layers()][1:] == [*change.added, "relu"]
    bias = "bias_term: false" not in GEOMETRIES[case]
    assert [len(graph.layer(n).blobs or []) for n in change.added] == [1, 1, 2 if bias else 1]
    proto_b, model_b = save(graph, tmp_path, "decomposed")
    feed = input_feed(original, seed=3)
    a = run_caffe(proto_a, model_a, feed, ["y"])["y"]
    b = run_caffe(proto_b, model_b, feed, ["y"])["y"]
    assert a.shape == b.shape
    assert relative_error(a, b) <= 1e-4, case


def test_reduced_ranks_cut_macs_by_the_formula() -> None:
    graph = graph_from_text(net("kernel_size: 3 stride: 2 pad: 1"), seed=1)
    before = macs(graph, ["conv"])
    report = decompose(graph, "ranks:3,5")
    [change] = report.changes
    n, c, r1, r2 = 12, 8, 3, 5
    in_px, out_px = 2 * 11 * 9, 2 * 6 * 5
    assert before == out_px * n * c * 9
    assert macs(graph, ["conv_tucker_reduce"]) == in_px * c * r1
    assert macs(graph, ["conv_tucker_core"]) == out_px * r1 * r2 * 9
    assert macs(graph, ["conv_tucker_expand"]) == out_px * r2 * n
    assert report.after is not None and report.before.macs - report.after.macs == before - macs(graph, change.added)
    assert [b.shape for b in graph.layer("conv_tucker_core").blobs or []] == [(5, 3, 3, 3)]
    assert graph.layer("conv_tucker_core").proto.convolution_param.stride == [2]


def test_speedup_halves_macs_with_ranks_in_proportion() -> None:
    text = INPUT.replace("dim: 8", "dim: 32") + conv_text().replace("num_output: 12", "num_output: 64")
    graph = graph_from_text(text, seed=1)
    before = macs(graph, ["conv"])
    [change] = decompose(graph, "speedup:2").changes
    assert macs(graph, change.added) <= before / 2
    r1 = graph.layer("conv_tucker_reduce").proto.convolution_param.num_output
    r2 = graph.layer("conv_tucker_core").proto.convolution_param.num_output
    assert abs(r1 / r2 - 32 / 64) < 0.05


def test_a_full_rank_factor_is_folded_into_the_core(tmp_path: Path) -> None:
    """R1 = C (GoogLeNet conv1's 3 input channels): no reduce layer, the core reads the input (Tucker-1)."""
    text = net("kernel_size: 3 pad: 1")
    graph = graph_from_text(text, seed=2)
    [change] = decompose(graph, "ranks:8,5").changes
    assert change.added == ["conv_tucker_core", "conv_tucker_expand"]
    core = graph.layer("conv_tucker_core")
    assert core.bottoms == ["data"] and [b.shape for b in core.blobs or []] == [(5, 8, 3, 3)]
    # at R2 = N as well as R1 = C nothing is left to decompose
    graph = graph_from_text(text, seed=2)
    report = decompose(graph, "ranks:8,12")
    assert not report.changes and "full ranks" in report.skipped[RULE.name][0].reason
    # without an expand the core carries the bias
    graph = graph_from_text(text, seed=2)
    [change] = decompose(graph, "ranks:4,12").changes
    assert change.added == ["conv_tucker_reduce", "conv_tucker_core"]
    assert graph.layer("conv_tucker_core").tops == ["y"] and len(graph.layer("conv_tucker_core").blobs or []) == 2


def test_planted_ranks_found_by_vbmf_and_energy() -> None:
    for method in ("vbmf", "energy:0.99"):
        text = INPUT.replace("dim: 8", "dim: 24") + conv_text().replace("num_output: 12", "num_output: 32")
        graph = graph_from_text(text, seed=0)
        conv = graph.layer("conv")
        assert conv.blobs is not None
        conv.blobs[0] = planted(32, 24, (4, 6), noise=1e-3).astype(np.float32)
        decompose(graph, method)
        assert graph.layer("conv_tucker_reduce").proto.convolution_param.num_output == 4, method
        assert graph.layer("conv_tucker_core").proto.convolution_param.num_output == 6, method


def test_a_conv_on_the_image_keeps_its_colour_channels() -> None:
    """An RGB input read by a 3x3 conv of random weights (each colour about a third of the energy): energy:0.5 cuts
    the output mode only (no reduce: Tucker-1). The same conv behind another conv gets its 3-channel input cut to
    2, as before."""
    rgb = INPUT.replace("dim: 8", "dim: 3") + conv_text().replace("num_output: 12", "num_output: 32")
    graph = graph_from_text(rgb, seed=0)
    [change] = decompose(graph, "energy:0.5").changes
    assert change.added == ["conv_tucker_core", "conv_tucker_expand"]
    assert graph.layer("conv_tucker_core").proto.convolution_param.num_output < 32
    inner = (INPUT + 'layer { name: "pre" type: "Convolution" bottom: "data" top: "x" convolution_param { '
             'num_output: 3 kernel_size: 1 weight_filler { type: "xavier" } } }\n'
             + conv_text().replace('bottom: "data"', 'bottom: "x"').replace("num_output: 12", "num_output: 32"))
    graph = graph_from_text(inner, seed=0)
    changes = decompose(graph, "energy:0.5").changes
    assert [c.added for c in changes] == [["conv_tucker_reduce", "conv_tucker_core", "conv_tucker_expand"]]
    assert graph.layer("conv_tucker_reduce").proto.convolution_param.num_output == 2


def reasons(text: str, method: str = "vbmf", seed: int | None = 0) -> list[str]:
    graph = graph_from_text(text, seed=seed)
    report = decompose(graph, method)
    assert not report.changes
    return [s.reason for s in report.skipped.get(RULE.name, [])]


def test_refusals() -> None:
    assert "1x1" in reasons(net("kernel_size: 1"), "full")[0]
    assert "group 2" in reasons(net("kernel_size: 3 group: 2"), "full")[0]
    assert "Deconvolution" in reasons(net("kernel_size: 3 stride: 2", kind="Deconvolution"), "full")[0]
    assert "would not save MACs" in reasons(net(), "ranks:7,11")[0]
    assert "no weights" in reasons(net(), "vbmf", seed=None)[0]
    assert "no weights" in reasons(net(), "energy:0.9", seed=None)[0]
    assert "VBMF finds no component" in reasons(net(), "vbmf")[0]  # random weights are all noise
    assert "even ranks (1, 1)" in reasons(net("kernel_h: 2 kernel_w: 1"), "speedup:100")[0]
    shared = net().replace("param { lr_mult: 1 }", 'param { name: "w" lr_mult: 1 }')
    assert "shared" in reasons(shared, "full")[0]


def test_ranks_read_off_the_kernel_must_save_a_tenth_of_the_macs() -> None:
    """energy:0.9 keeps ranks (7, 10) of this 8 -> 12 kernel: 6.7% fewer MACs, not worth two more layers; at 0.85
    it saves 15%; the same ranks given explicitly are taken as given."""
    [reason] = reasons(net(), "energy:0.9")
    assert reason == ("energy ranks (7, 10) would save 6.71% of its MACs: under 10%, too little for the error and the extra "
                      "layers")
    kept = graph_from_text(net(), seed=0)
    [change] = decompose(kept, "energy:0.85").changes
    assert 1 - macs(kept, change.added) / 171072 > 0.1
    explicit = graph_from_text(net(), seed=0)
    [change] = decompose(explicit, "ranks:7,10").changes
    assert macs(explicit, change.added) == 159588  # 6.7% fewer


def test_without_weights_speedup_decomposes_the_prototxt_only() -> None:
    graph = graph_from_text(net(), seed=None)
    [change] = decompose(graph, "speedup:2").changes
    assert all(graph.layer(name).blobs is None for name in change.added)
    random_weights(graph)  # weights made later fit the new layers
    assert [b.shape for b in graph.layer("conv_tucker_expand").blobs or []][1] == (12,)


def test_filler_init(tmp_path: Path) -> None:
    graph = graph_from_text(net(), seed=3)
    [change] = decompose(graph, "ranks:3,5", init="filler").changes
    blobs = [graph.layer(n).blobs for n in change.added]
    assert [[b.shape for b in bs or []] for bs in blobs] == [[(3, 8, 1, 1)], [(5, 3, 3, 3)], [(12, 5, 1, 1), (12,)]]
    assert not np.allclose(blobs[0][0][:, :, 0, 0] @ blobs[0][0][:, :, 0, 0].T, np.eye(3))  # type: ignore[index]


def test_rewriting_twice_equals_once(tmp_path: Path) -> None:
    graph = graph_from_text(net(), seed=4)
    decompose(graph, "ranks:3,5")
    once = graph.to_net().SerializeToString(), graph.weights()
    report = decompose(graph, "ranks:3,5")
    assert not report.changes
    assert {s.reason for s in report.skipped[RULE.name]} == {"a piece of an earlier Tucker decomposition"}
    assert graph.to_net().SerializeToString() == once[0]
    assert all(np.array_equal(a, b) for k in once[1] for a, b in zip(once[1][k], graph.weights()[k]))
    # and after a save and reload, too
    proto, model = save(graph, tmp_path, "once")
    again = load_model(proto, model)
    assert not decompose(again, "full").changes


def test_opt_in_group_and_registration() -> None:
    names = [rule.name for rule in RULES]
    assert names[-1] == RULE.name and RULE.group == "tucker" and not RULE.exact
    assert RULE not in select_rules("all")
    assert RULE in select_rules("tucker") and RULE in select_rules("all,tucker")
    assert RULE in select_rules("decompose_conv_tucker")
    assert RULE not in select_rules("all,tucker", skip=["tucker"])
    assert RULE not in rewrite(graph_from_text(net(), seed=0)).rules  # the library's default is "all" too
    assert PRESETS["deeprebirth+tucker"] == {"rules": "all,tucker", "rank_method": "vbmf:0.5"}
    options = preset_options("deeprebirth+tucker", rank_method=None, rules=None, seed=3)
    assert (options.rules, options.rank_method, options.seed) == ("all,tucker", "vbmf:0.5", 3)
    assert preset_options("deeprebirth+tucker", rank_method="speedup:2").rank_method == "speedup:2"
    with pytest.raises(DeepRebirthError, match="unknown preset"):
        preset_options("fastest")


def test_unknown_rank_method_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DeepRebirthError, match="unknown rank method"):
        list(match(graph_from_text(net(), seed=0), RuleConfig(rank_method="svd")))
    proto, _ = save(graph_from_text(net(), seed=0), tmp_path, "in")
    result = CliRunner().invoke(main, ["rewrite", proto, str(tmp_path / "o.prototxt"), "--rank-method", "svd"])
    assert result.exit_code == 2 and "unknown rank method 'svd'" in result.stderr
    assert not (tmp_path / "o.prototxt").exists()


def test_slimming_first_then_tucker_with_the_preset(tmp_path: Path) -> None:
    """The preset on a GoogLeNet in miniature: every slimming change comes before the first decomposition (opt-in
    rules wait for the others' fixed point), each decomposition reproduces a blob of the original net (that of the
    merge it decomposes, when it splits a merged conv), and the re-learn list names layers the net has."""
    proto, model = save(graph_from_text(tiny_inception(), seed=5), tmp_path, "in")
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["rewrite", proto, str(tmp_path / "o.prototxt"), "--weights", model,
                                       "--out-weights", str(tmp_path / "o.caffemodel"), "--preset",
                                       "deeprebirth+tucker", "--rank-method", "speedup:2", "--check", "1",
                                       "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "[decompose_conv_tucker]" in result.stdout
    options = preset_options("deeprebirth+tucker", rank_method="speedup:2")
    report = rewrite_files(proto, tmp_path / "p.prototxt", model, tmp_path / "p.caffemodel", options=options).report
    rules = [c.rule for c in report.changes]
    first = rules.index(RULE.name)
    assert set(rules[first:]) == {RULE.name} and len(set(rules[:first])) >= 3
    original = set(load_model(proto).caffe_blob_names().values())
    assert all(c.reproduces in original for c in report.changes if c.rule == RULE.name)
    slim = load_model(tmp_path / "p.prototxt", tmp_path / "p.caffemodel")
    assert report.relearn and all(name in slim for name in report.relearn)
    assert report.after is not None and report.after.macs < report.before.macs
    slimmed = rewrite_files(proto, tmp_path / "s.prototxt", model, tmp_path / "s.caffemodel").report
    assert slimmed.after is not None and report.after.macs < slimmed.after.macs
    assert RULE.name not in [c.rule for c in slimmed.changes]


def test_decomposed_googlenet_runs_in_caffe_and_opencv(model_zoo: Path, tmp_path: Path) -> None:
    graph = load_model(model_zoo / "bvlc_googlenet" / "deploy.prototxt")
    random_weights(graph, seed=0)
    proto_a, model_a = save(graph, tmp_path, "original")
    report = decompose(graph, "speedup:2")
    decomposed = {c.removed[0] for c in report.changes}
    kxk = {c.name for c in layer_costs(load_model(proto_a)) if c.type == "Convolution"} - {
        s.layer for s in report.skipped[RULE.name] if "1x1" in s.reason}
    assert decomposed == kxk and len(decomposed) == 20  # conv1, conv2/3x3 and the 3x3 and 5x5 of 9 modules
    assert report.after is not None and report.after.macs < 0.62 * report.before.macs
    proto_b, model_b = save(graph, tmp_path, "tucker")
    feed = {"data": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    a = run_caffe(proto_a, model_a, feed, ["prob"])["prob"]
    b = run_caffe(proto_b, model_b, feed, ["prob"])["prob"]
    c = opencv_forward(proto_b, model_b, feed)
    assert a.shape == b.shape == c.shape == (1, 1000)
    assert np.all(np.isfinite(b)) and relative_error(b, c) < 1e-3


def test_no_kernel_is_left_undecomposable_by_the_skip_list() -> None:
    """Every Convolution is either matched or skipped with a reason (nothing silently ignored)."""
    graph = graph_from_text(tiny_inception(), seed=1)
    found = list(match(graph, RuleConfig(rank_method="speedup:2")))
    named = {m.layers[0] if not isinstance(m, Skip) else m.layer for m in found}
    assert named == {layer.name for layer in graph.layers() if layer.type == "Convolution"}
