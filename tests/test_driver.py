"""The rule driver shared by rewrite, plan, inspect and the runtime plan: the same checks on every path, and a
rewrite report that reads back from its JSON as the same typed report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, save
from nets import tiny_inception

from deeprebirth.api import RewriteOptions, inspect_file, rewrite_files
from deeprebirth.errors import DeepRebirthError
from deeprebirth.plan.candidates import plan_graph
from deeprebirth.rewrite import (
    RewriteReport,
    candidates,
    rewrite,
    select_rules,
    skips,
    stages,
)
from deeprebirth.rules import RULES, RuleConfig

BN_NET = """name: "bn"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
"""


class _NoTimes:
    """A profile that measured nothing: plan_graph then prices merges by MACs alone."""

    def times(self) -> dict[str, float]:
        return {}


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    """Lossy and exact changes, a Tucker split that removes a merged conv (relearn is derived), skips, warnings."""
    proto, weights = save(graph_from_text(tiny_inception(), seed=2), tmp_path, "in")
    result = rewrite_files(proto, tmp_path / "o.prototxt", weights, tmp_path / "o.caffemodel", tmp_path / "r.json",
                           RewriteOptions(rules="all,tucker", rank_method="speedup:2"))
    report = result.report
    assert report.changes and report.skipped and any(not c.exact for c in report.changes)
    assert any(set(c.removed) & {n for e in report.changes for n in e.relearn} for c in report.changes)
    written = json.loads((tmp_path / "r.json").read_text())
    again = RewriteReport.from_json(written)
    assert again == report
    assert again.relearn == report.relearn == written["relearn"]
    assert again.to_json() == json.loads(json.dumps(report.to_json()))


@pytest.mark.parametrize(("data", "problem"), [
    ([], "no 'changes' list"), ({"changes": 3}, "no 'changes' list"),
    ({"changes": [], "before": {}}, "KeyError"), ({"rules": [], "before": {"layers": 1}, "changes": []}, "TypeError"),
])
def test_a_report_that_is_not_one_is_a_user_error(data: object, problem: str) -> None:
    with pytest.raises(DeepRebirthError, match="not a rewrite report") as err:
        RewriteReport.from_json(data)
    assert problem in str(err.value)


def test_non_finite_weights_are_refused_on_every_path() -> None:
    """A BatchNorm variance below -eps would fold into NaN weights: rewrite refused it, plan's copy of the loop
    did not. Now both (and the staged exploration the runtime plan uses) go through apply_one."""
    graph = graph_from_text(BN_NET, seed=1)
    bn = graph.layer("bn")
    assert bn.blobs is not None
    bn.blobs = [bn.blobs[0], np.full_like(bn.blobs[1], -5.0), bn.blobs[2]]
    message = "fuse_batchnorm_into_conv would give weight blob 0 NaN or Inf values"
    with pytest.raises(DeepRebirthError, match=message):
        rewrite(copy.deepcopy(graph))
    with pytest.raises(DeepRebirthError, match=message):
        plan_graph(graph, _NoTimes(), select_rules("exact"))  # type: ignore[arg-type]
    with pytest.raises(DeepRebirthError, match=message):
        list(stages(graph, select_rules("exact"), RuleConfig()))


def test_plan_stages_reach_the_rewrite_fixed_point() -> None:
    """Applying every staged candidate leaves what rewrite leaves, and both end with the same skips."""
    rules = select_rules("all")
    planned = graph_from_text(tiny_inception(), seed=3)
    found = [(stage, rule.name) for stage, new in stages(planned, rules, RuleConfig()) for rule, _ in new]
    rewritten = graph_from_text(tiny_inception(), seed=3)
    report = rewrite(rewritten, rules)
    assert {stage for stage, _ in found} == {0, 1}  # pool2 merges into conv2 once norm2 is merged into it
    assert sorted(name for _, name in found) == sorted(c.rule for c in report.changes)
    assert planned.to_net() == rewritten.to_net()
    assert not list(candidates(planned, rules, RuleConfig()))
    assert skips(planned, rules, RuleConfig()) == [(name, s) for name, found_skips in report.skipped.items()
                                                   for s in found_skips]


def test_inspect_lists_what_the_driver_finds(tmp_path: Path) -> None:
    proto, weights = save(graph_from_text(BN_NET, seed=1), tmp_path, "in")
    found = inspect_file(proto, weights)
    # the opt-in Tucker rule is listed too: its default ranks keep half of each unfolding's energy, of a random
    # kernel as of a trained one (pure VBMF would call a random kernel all noise and skip it)
    assert [rule for rule, _ in found.fires] == ["fuse_batchnorm_into_conv", "decompose_conv_tucker"]
    assert found.skips == skips(found.graph, RULES, RuleConfig())
