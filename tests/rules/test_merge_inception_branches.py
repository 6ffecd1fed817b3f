"""merge_inception_branches: kept shapes and weights, real Caffe and OpenCV runs, and a numeric proof of the channel
layout: with the removed branches' convs zeroed in the original and the freed channels zeroed in the rewritten net,
both nets compute the same function, so every inherited channel (and every permuted reader) must line up."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, relative_error, run_caffe, save
from nets import tiny_inception

from deeprebirth.caffe.runtime import open_net, opencv_forward
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import infer_shapes, layer_costs
from deeprebirth.rewrite import RewriteReport, rewrite
from deeprebirth.rules import RULES, Match, RuleConfig, Skip
from deeprebirth.rules.merge_inception_branches import RULE, match

MODES = ("balanced", "3x3", "5x5")
GOOGLENET_WIDTHS = [256, 480, 512, 512, 512, 528, 832, 832, 1024]
# (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) of inception_3a, in GoogLeNet's Concat order


def googlenet(model_zoo: Path, seed: int | None = 0) -> Graph:
    graph = load_model(model_zoo / "bvlc_googlenet" / "deploy.prototxt")
    next(layer for layer in graph.layers() if layer.type == "Input").proto.input_param.shape[0].dim[0] = 1
    if seed is not None:
        random_weights(graph, seed)
    return graph


def slim(graph: Graph, widen: str = "balanced", init: str = "inherit", seed: int = 0) -> RewriteReport:
    return rewrite(graph, rules=(RULE,), config=RuleConfig(init=init, widen=widen, seed=seed))


def concat_widths(graph: Graph) -> dict[str, int]:
    shapes = infer_shapes(graph)
    return {layer.name: shapes[layer.tops[0]][1] for layer in graph.layers() if layer.type == "Concat"}  # type: ignore


def blob_shapes(graph: Graph) -> dict[str, tuple[int, ...] | None]:
    return {graph.caffe_name(blob): shape for blob, shape in infer_shapes(graph).items()}


def freed_channels_zeroed(original: Graph, rewritten: Graph, report: RewriteReport) -> Graph:
    """A copy of ``rewritten`` whose freed channels are zero; checks on the way that every widened conv holds each
    original output channel's weights bit for bit, once, in the original order."""
    zeroed = copy.deepcopy(rewritten)
    for name in report.relearn:
        new, old = zeroed.layer(name), original.layer(name.removesuffix("_merge"))
        assert new.blobs is not None and old.blobs is not None
        rows = {old.blobs[0][j].tobytes(): j for j in range(old.blobs[0].shape[0])}
        own = [(i, rows[new.blobs[0][i].tobytes()]) for i in range(new.blobs[0].shape[0])
               if new.blobs[0][i].tobytes() in rows]
        assert [j for _, j in own] == list(range(old.blobs[0].shape[0]))
        inherited = np.array([i for i, _ in own])
        assert np.array_equal(new.blobs[1][inherited], old.blobs[1])
        freed = np.setdiff1d(np.arange(new.blobs[0].shape[0]), inherited)
        new.blobs = [b.copy() for b in new.blobs]
        for blob in new.blobs:
            blob[freed] = 0
    return zeroed


def removed_branches_zeroed(original: Graph) -> Graph:
    zeroed = copy.deepcopy(original)
    for layer in zeroed.layers():
        if layer.type == "Convolution" and layer.name.rsplit("/", 1)[-1] in ("1x1", "pool_proj"):
            layer.blobs = [np.zeros_like(b) for b in layer.blobs or []]
    return zeroed


def assert_channel_permutation(a: np.ndarray, b: np.ndarray) -> None:
    """``b`` holds ``a``'s channels in some order (per-channel sums and sums of squares agree as multisets)."""
    for stat in (lambda x: x.sum(axis=(0, 2, 3)), lambda x: (x.astype(np.float64) ** 2).sum(axis=(0, 2, 3))):
        np.testing.assert_allclose(np.sort(stat(b)), np.sort(stat(a)), rtol=1e-4, atol=1e-4)


def check_same_function(original: Graph, rewritten: Graph, report: RewriteReport, widen: str, tmp: Path) -> None:
    """Real Caffe: the zeroed nets agree on every conv/IP output they share and on the final output; Concat
    outputs agree channel for channel with widen=balanced and up to a channel permutation otherwise."""
    feed = input_feed(original)
    a, b = removed_branches_zeroed(original), freed_channels_zeroed(original, rewritten, report)
    shapes_a, shapes_b = blob_shapes(a), blob_shapes(b)
    linear = [b.caffe_name(layer.tops[0]) for layer in b.layers() if layer.type in ("Convolution", "InnerProduct")]
    common = [n for n in linear if shapes_a.get(n) is not None and shapes_a.get(n) == shapes_b[n]]
    concats = [b.caffe_name(layer.tops[0]) for layer in b.layers() if layer.type == "Concat"]
    final = b.caffe_name(b.outputs()[0])
    out_a = run_caffe(*save(a, tmp, "zeroed_original"), feed, [*common, *concats, final])
    out_b = run_caffe(*save(b, tmp, "zeroed_rewritten"), feed, [*common, *concats, final])
    for name in [*common, final]:
        assert relative_error(out_a[name], out_b[name]) < 1e-5, name
    for name in concats:
        if widen == "balanced":
            assert relative_error(out_a[name], out_b[name]) < 1e-5, name
        else:
            assert_channel_permutation(out_a[name], out_b[name])


# ------------------------------------------------------------------------------------------------ GoogLeNet


@pytest.mark.parametrize("widen", MODES)
def test_fires_on_all_nine_googlenet_modules_and_keeps_shapes(model_zoo: Path, widen: str) -> None:
    graph = googlenet(model_zoo)
    original = copy.deepcopy(graph)
    report = slim(graph, widen)
    assert [c.reproduces for c in report.changes] == [name for name in concat_widths(original)]
    assert len(report.changes) == 9 and all(not c.exact for c in report.changes)
    assert list(concat_widths(graph).values()) == GOOGLENET_WIDTHS
    before, after = blob_shapes(original), blob_shapes(graph)
    assert all(before[name] == shape for name, shape in after.items() if name in before)
    assert report.after is not None and report.after.output_shapes == report.before.output_shapes
    types = graph.layer_types()
    assert types["Concat"] == 9 and types["Pooling"] == 5  # the 9 stride-1 branch poolings are gone
    assert all(name.endswith(("/3x3_merge", "/5x5_merge")) for name in report.relearn)
    assert len(report.relearn) == (18 if widen == "balanced" else 9)
    for layer in graph.layers():
        if layer.name in original:
            old = original.layer(layer.name).blobs or []
            assert len(old) == len(layer.blobs or []) and all(np.array_equal(x, y) for x, y in zip(old, layer.blobs or []))
    removed = {name for c in report.changes for name in c.removed}
    assert {f"inception_{m}/{b}" for m in ("3a", "4e", "5b") for b in ("1x1", "pool", "pool_proj")} <= removed
    macs = sum(c.macs for c in layer_costs(graph))
    assert macs > sum(c.macs for c in layer_costs(original))  # 1x1 work moved into wider KxK convs


@pytest.mark.parametrize("widen", MODES)
def test_googlenet_runs_in_caffe_and_opencv_and_inherited_channels_line_up(model_zoo: Path, tmp_path: Path,
                                                                            widen: str) -> None:
    original = googlenet(model_zoo)
    graph = copy.deepcopy(original)
    report = slim(graph, widen)
    feed = input_feed(graph)
    proto, model = save(graph, tmp_path, "slim")
    caffe_out = run_caffe(proto, model, feed, ["prob"])["prob"]
    assert caffe_out.shape == (1, 1000)
    assert relative_error(caffe_out, opencv_forward(proto, model, feed).reshape(caffe_out.shape)) < 1e-4
    check_same_function(original, graph, report, widen, tmp_path)


def test_googlenet_prototxt_only(model_zoo: Path, tmp_path: Path) -> None:
    graph = googlenet(model_zoo, seed=None)
    report = slim(graph, "3x3")
    assert len(report.changes) == 9 and all(layer.blobs is None for layer in graph.layers())
    proto = tmp_path / "slim.prototxt"
    save_model(graph, proto)
    assert open_net(proto).blobs["prob"].data.shape == (1, 1000)


# --------------------------------------------------------------------------------------- the tiny inception net


@pytest.mark.parametrize("widen", MODES)
def test_tiny_inception_same_function_when_freed_channels_are_zero(tmp_path: Path, widen: str) -> None:
    original = graph_from_text(tiny_inception())
    graph = copy.deepcopy(original)
    report = slim(graph, widen)
    assert len(report.changes) == 3
    assert concat_widths(graph) == concat_widths(original)
    check_same_function(original, graph, report, widen, tmp_path)
    feed = input_feed(graph)
    proto, model = save(graph, tmp_path, "slim")
    caffe_out = run_caffe(proto, model, feed, ["prob"])["prob"]
    assert relative_error(caffe_out, opencv_forward(proto, model, feed).reshape(caffe_out.shape)) < 1e-4


def test_change_lists_and_names() -> None:
    graph = graph_from_text(tiny_inception())
    before = {layer.name for layer in graph.layers()}
    found = next(m for m in match(graph, RuleConfig(widen="3x3")) if isinstance(m, Match))
    change = RULE.apply(graph, found, RuleConfig(widen="3x3"))
    graph.check()
    assert change.reproduces == "inception_1/output" and change.relearn == ["inception_1/3x3_merge"]
    assert change.added == ["inception_1/3x3_merge", "inception_1/3x3_relu_merge"]
    assert change.changed == [f"inception_2/{b}_merge" for b in ("1x1", "3x3_reduce", "5x5_reduce", "pool_proj")]
    assert set(change.removed) == {f"inception_1/{b}" for b in ("1x1", "1x1_relu", "pool", "pool_proj",
                                                               "pool_proj_relu", "3x3", "3x3_relu")} | \
        {f"inception_2/{b}" for b in ("1x1", "3x3_reduce", "5x5_reduce", "pool_proj")}
    after = {layer.name for layer in graph.layers()}
    assert "inception_1/output" in after
    assert after == before - set(change.removed) | set(change.added) | set(change.changed)


def test_new_channels_follow_seed_and_init() -> None:
    def widened(**config: object) -> np.ndarray:
        graph = graph_from_text(tiny_inception())
        slim(graph, "balanced", **config)  # type: ignore[arg-type]
        return graph.layer("inception_1/3x3_merge").blobs[0]  # type: ignore[index]

    original = graph_from_text(tiny_inception()).layer("inception_1/3x3").blobs[0]  # type: ignore[index]
    a, b, c = widened(seed=1), widened(seed=1), widened(seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[8:], original)  # balanced: the 1x1's 8 channels come first
    np.testing.assert_array_equal(a[8:], c[8:])
    filler = widened(init="filler")
    assert filler.shape == a.shape and not np.array_equal(filler[8:], original)


def test_registered_after_the_exact_rules() -> None:
    names = [rule.name for rule in RULES]
    assert "merge_inception_branches" in names
    assert all(names.index(rule.name) < names.index(RULE.name) for rule in RULES if rule.group in ("exact", "streamline"))


# ----------------------------------------------------------------------------------------------- refusals


def skips(graph: Graph, widen: str = "balanced") -> list[Match | Skip]:
    return list(match(graph, RuleConfig(widen=widen)))


def block_net(body: str, channels: int = 8, size: int = 8) -> str:
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: 1 dim: {channels} dim: {size} dim: {size} }} }} }}\n' + body)


def conv(name: str, bottom: str, out: int, kernel: int = 1, extra: str = "") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param '
            f'{{ num_output: {out} kernel_size: {kernel} pad: {kernel // 2} {extra} }} }}\n')


def test_concat_without_pooling_branch_does_not_fire() -> None:
    text = block_net(conv("a", "data", 4) + conv("r", "data", 4) + conv("b", "r", 6, 3)
                     + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n')
    assert skips(graph_from_text(text)) == [Skip("cat", "no pooling branch")]
    wide_only = block_net(conv("r", "data", 4) + conv("a", "r", 4, 3) + conv("b", "r", 6, 5)
                          + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n')
    assert skips(graph_from_text(wide_only)) == []


def test_branch_read_elsewhere_does_not_fire() -> None:
    extra = ('layer { name: "peek" type: "Pooling" bottom: "inception_1/pool_proj" top: "peek" '
             'pooling_param { pool: AVE global_pooling: true } }\n')
    graph = graph_from_text(tiny_inception(extra=extra))
    found = skips(graph)
    assert isinstance(found[0], Skip) and "also read by peek" in found[0].reason
    assert [type(f) for f in found[1:]] == [Match, Match]
    assert len(slim(graph).changes) == 2


def test_strided_pooling_branch_does_not_fire() -> None:
    body = (conv("one", "data", 4, extra="stride: 2") + conv("r", "data", 4)
            + conv("three", "r", 6, 3, extra="stride: 2")
            + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
              'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n' + conv("proj", "pool", 4)
            + 'layer { name: "cat" type: "Concat" bottom: "one" bottom: "three" bottom: "proj" top: "cat" }\n')
    (found,) = skips(graph_from_text(block_net(body)))
    assert isinstance(found, Skip) and "stride 1" in found.reason


def test_group_conv_target_does_not_fire() -> None:
    text = tiny_inception()
    grouped = text.replace('num_output: 12 kernel_size: 3', 'num_output: 12 group: 2 kernel_size: 3', 1)
    assert grouped != text
    found = skips(graph_from_text(grouped), "3x3")
    assert isinstance(found[0], Skip) and "inception_1/3x3" in found[0].reason
    assert isinstance(skips(graph_from_text(grouped), "5x5")[0], Match)


@pytest.mark.parametrize(("after", "reason"), [
    ('layer { name: "norm" type: "LRN" bottom: "inception_1/output" top: "norm" }\n', "across channels"),
    ('layer { name: "sum" type: "Eltwise" bottom: "inception_1/output" bottom: "inception_1/output" top: "sum" }\n',
     "more than once"),
], ids=["lrn_across_channels", "eltwise_reads_twice"])
def test_unpermutable_reader_refused_only_when_channels_move(after: str, reason: str) -> None:
    graph = graph_from_text(tiny_inception(blocks=[(8, 8, 12, 4, 6, 6)], extra=after))
    found = skips(graph, "3x3")
    assert isinstance(found[0], Skip) and reason in found[0].reason
    assert isinstance(skips(graph, "balanced")[0], Match)


def test_permutation_through_batchnorm_scale_concat_and_flatten(tmp_path: Path) -> None:
    head = ('layer { name: "bn" type: "BatchNorm" bottom: "inception_1/output" top: "bn" }\n'
            'layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }\n'
            + conv("side", "pool2", 5)
            + 'layer { name: "both" type: "Concat" bottom: "side" bottom: "bn" top: "both" }\n'
            + conv("mix", "both", 7)
            + 'layer { name: "flat" type: "Flatten" bottom: "inception_1/output" top: "flat" }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 3 } }\n')
    original = graph_from_text(tiny_inception(blocks=[(8, 8, 12, 4, 6, 6)], extra=head))
    graph = copy.deepcopy(original)
    report = slim(graph, "5x5")
    assert set(report.changes[0].changed) == {"bn_merge", "sc_merge", "mix_merge", "fc_merge", "classifier_merge"}
    feed = input_feed(original)
    a = run_caffe(*save(removed_branches_zeroed(original), tmp_path, "a"), feed, ["mix", "fc", "prob"])
    b = run_caffe(*save(freed_channels_zeroed(original, graph, report), tmp_path, "b"), feed, ["mix", "fc", "prob"])
    for name in ("mix", "fc", "prob"):
        assert relative_error(a[name], b[name]) < 1e-5, name
