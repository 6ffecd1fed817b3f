"""deeprebirth.plan.candidates and `deeprebirth plan`: every candidate merge priced with a real Caffe profile."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.cli import main
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.shapes import layer_costs
from deeprebirth.measure.profile import profile_net
from deeprebirth.plan.candidates import Plan, conv_ms_per_mac, plan_file, plan_graph
from deeprebirth.rules import RULES, Change, Match, Rule, RuleConfig, Skip

NET = """name: "bn_net"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "pool" type: "Pooling" bottom: "bn2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 4 } }
"""
FAST = {"rounds": 2, "warmup": 1}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save(graph_from_text(NET, seed=2), tmp_path_factory.mktemp("plan"), "bn_net")


@pytest.fixture(scope="module")
def plan(model: tuple[str, str]) -> Plan:
    return plan_file(*model, **FAST)


def test_lists_the_batchnorm_folds(plan: Plan) -> None:
    folds = [c for c in plan.candidates if c.rule == "fuse_batchnorm_into_conv"]
    assert [c.layers[0] for c in folds] == ["bn1", "bn2"]
    for c in folds:
        assert c.risk == "exact" and c.group == "exact" and c.stage == 0
        assert c.params_saved > 0 and c.memory_saved_bytes > 0 and c.macs_saved > 0
        assert c.extra_macs == 0 and c.time_saved_ms == pytest.approx(plan.profile.times()[c.layers[0]])
        assert c.removed == [c.layers[0]] and not c.estimated
    bn1, bn2 = folds
    assert bn1.activation_bytes_saved == 0  # in place: its memory was shared with conv1
    assert bn2.activation_bytes_saved == 4 * 8 * 16 * 16  # not in place: its own top goes away
    assert bn1.params_saved == 2 * 8 + 1  # mean, variance, factor; conv1 already had a bias
    assert bn2.params_saved == 2 * 8 + 1 - 8  # conv2 gains a bias


def test_scale_fold_appears_once_the_batchnorm_is_gone(plan: Plan) -> None:
    scale = [c for c in plan.candidates if c.rule == "fuse_scale_into_conv"]
    assert [(c.layers[0], c.stage, c.risk) for c in scale] == [("scale1", 1, "exact")]
    assert scale[0].params_saved == 16


def test_generic_over_rules(plan: Plan) -> None:
    groups = {rule.name: rule.group for rule in RULES}
    assert all(groups[c.rule] == c.group for c in plan.candidates)
    assert plan.conv_ms_per_mac > 0 and not plan.random_weights
    assert plan.profile.weights is not None


def test_without_weights_plans_with_random_ones(model: tuple[str, str]) -> None:
    found = plan_file(model[0], None, **FAST)
    assert found.random_weights and {c.layers[0] for c in found.candidates} >= {"bn1", "bn2", "scale1"}


# ---------------------------------------------------------------------------------------------------------------
# a lossy rule made up for the test: drop a pooling layer after a convolution and multiply its stride in

POOLED = """name: "pooled"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 4 } }
"""


def _match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    for layer in graph.layers():
        if layer.type == "Pooling" and graph.producer(layer.bottoms[0]).type == "Convolution":
            yield Match((layer.name, graph.producer(layer.bottoms[0]).name))


def _apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    pool, conv = graph.layer(found.layers[0]), graph.layer(found.layers[1])
    del conv.proto.convolution_param.stride[:]
    conv.proto.convolution_param.stride.append(2)
    graph.replace_uses(pool.tops[0], pool.bottoms[0])
    graph.remove_layer(pool.name)
    return Change("merge_test_pool", False, removed=[pool.name], added=[], changed=[conv.name],
                  summary="merged", relearn=[conv.name])


LOSSY = Rule("merge_test_pool", exact=False, group="streamline", match=_match, apply=_apply)


def test_lossy_merge_prices_the_cheaper_convolution(tmp_path: Path) -> None:
    graph = graph_from_text(POOLED, seed=1)
    model = save(graph, tmp_path, "pooled")
    profile = profile_net(*model, **FAST)
    found = plan_graph(graph, profile, (LOSSY,))
    assert len(graph) == 4  # the graph itself is left alone
    (c,) = found.candidates
    assert c.risk == "lossy" and c.group == "streamline" and c.relearn == ["conv1"]
    conv_macs = 8 * 16 * 16 * 27
    assert c.extra_macs == conv_macs // 4 - conv_macs
    assert c.macs_saved == conv_macs - conv_macs // 4
    assert c.activation_bytes_saved == 4 * 8 * 16 * 16  # the pooled blob goes, conv1's top shrinks by the same
    rate = conv_ms_per_mac(profile, layer_costs(graph))
    assert rate == pytest.approx(profile.times()["conv1"] / conv_macs)
    assert c.time_saved_ms == pytest.approx(profile.times()["pool1"] + 0.75 * profile.times()["conv1"])


LRN_NET = """name: "lrn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc" inner_product_param { num_output: 4 } }
"""


def test_renamed_conv_costs_nothing(tmp_path: Path) -> None:
    """A merge that only re-creates a conv under a new name saves exactly the measured time of what it drops."""
    if "merge_lrn_into_conv" not in {rule.name for rule in RULES}:
        pytest.skip("merge_lrn_into_conv is not among the rules")
    graph = graph_from_text(LRN_NET, seed=1)
    profile = profile_net(*save(graph, tmp_path, "lrn"), **FAST)
    (c,) = [c for c in plan_graph(graph, profile).candidates if c.rule == "merge_lrn_into_conv"]
    assert c.risk == "lossy" and c.group == "streamline" and c.extra_macs == 8 * 16 * 16 * 27 and c.macs_saved == 0
    assert "conv1" in c.removed and "norm1" in c.removed
    assert c.time_saved_ms == pytest.approx(profile.times()["norm1"] + profile.times()["conv1"]
                                            - c.ms_per_mac * 8 * 16 * 16 * 27)
    assert c.time_saved_ms == pytest.approx(profile.times()["norm1"])


# ---------------------------------------------------------------------------------------------------------------
# the command


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_plan(model: tuple[str, str], tmp_path: Path) -> None:
    report = tmp_path / "plan.json"
    code, out, err = run("plan", model[0], "--weights", model[1], "--rounds", "2", "--json", str(report))
    assert code == 0, err
    assert "fuse_batchnorm_into_conv" in out and "bn2" in out and "exact" in out
    payload = json.loads(report.read_text())
    assert [c["layers"][0] for c in payload["candidates"]][:2] == ["bn1", "bn2"]


def test_rules_choose_what_is_planned(model: tuple[str, str]) -> None:
    found = plan_file(*model, rules="fuse_batchnorm_into_conv", **FAST)
    assert {c.rule for c in found.candidates} == {"fuse_batchnorm_into_conv"}
    code, _, err = run("plan", model[0], "--weights", model[1], "--rules", "no_such_rule")
    assert code == 2 and "unknown rule or group 'no_such_rule'" in err


def test_cli_plan_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "x" type: "Convolution" bottom: "nothing" top: "x" }')
    code, _, err = run("plan", str(bad))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "nothing" in lines[0], err


def test_tucker_is_planned_on_the_slimmed_convs_as_the_rewrite_decomposes_them(tmp_path: Path) -> None:
    from nets import tiny_inception

    from deeprebirth.rewrite import rewrite, select_rules

    graph = graph_from_text(tiny_inception(32), seed=1)
    proto, model = save(graph, tmp_path, "net")
    config = RuleConfig(rank_method="speedup:2")  # VBMF finds no structure in random weights
    plan = plan_file(proto, model, rules="all,tucker", rounds=1, warmup=0, config=config)
    tucker = [c for c in plan.candidates if c.rule == "decompose_conv_tucker"]
    slimming = [c for c in plan.candidates if c.rule != "decompose_conv_tucker"]
    assert tucker and slimming and min(c.stage for c in tucker) > max(c.stage for c in slimming)
    rewritten = graph_from_text(tiny_inception(32), seed=1)
    report = rewrite(rewritten, select_rules("all,tucker"), config=config)
    made = {change.removed[0] for change in report.changes if change.rule == "decompose_conv_tucker"}
    assert made == {c.layers[0] for c in tucker}  # e.g. conv1_merge, not conv1
    assert "conv1_merge" in made
