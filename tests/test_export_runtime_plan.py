"""Runtime-aware planning: each candidate merge timed alone on an exported runtime (`plan --runtime`), and
`rewrite --runtime R --min-gain PCT` applying only the lossy merges that pay there (exact folds always)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import tiny_inception

from deeprebirth.cli import main
from deeprebirth.plan.runtime_plan import RuntimeCandidate, RuntimePlan, exclusions, plan_on_runtime


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save(graph_from_text(tiny_inception(), seed=4), tmp_path_factory.mktemp("net"), "tiny")


def test_plan_on_runtime_times_every_candidate(model: tuple[str, str]) -> None:
    plan = plan_on_runtime(*model, "onnxruntime", rounds=2, warmup=1)
    rules = {c.rule for c in plan.candidates}
    assert {"eliminate_dropout", "merge_pooling_into_conv", "merge_lrn_into_conv",
            "merge_inception_branches"} <= rules
    assert plan.original_ms > 0 and all(c.base_ms > 0 and c.after_ms > 0 for c in plan.candidates)
    assert any(c.stage > 0 for c in plan.candidates)  # e.g. an LRN merge once its pooling is merged
    pooling = next(c for c in plan.candidates if c.rule == "merge_pooling_into_conv")
    assert pooling.eliminated == ["pool1"]


def candidate(rule: str, risk: str, layers: tuple[str, ...], removed: list[str], saved: float) -> RuntimeCandidate:
    return RuntimeCandidate(rule, "g", risk, 0, layers, "", removed, [n for n in removed if "pool" in n], [],
                            10.0, 10.0 - saved)


def test_exclusions_leave_out_lossy_merges_below_the_gain_never_exact_folds() -> None:
    plan = RuntimePlan("net", "mnn", 1, 1, 3, 10.0, [
        candidate("fuse_batchnorm_into_conv", "exact", ("conv1", "bn1"), ["bn1"], 0.0),
        candidate("merge_pooling_into_conv", "lossy", ("conv1", "pool1"), ["pool1", "conv1"], 0.05),
        candidate("merge_pooling_into_conv", "lossy", ("conv2", "pool2"), ["pool2", "conv2"], 2.0),
    ])
    names, dropped = exclusions(plan, 1.0)
    assert names == ["pool1"] and [c.layers[1] for c in dropped] == ["pool1"]
    assert exclusions(plan, 50.0)[0] == ["pool1", "pool2"]


def test_plan_and_rewrite_with_runtime_cli(model: tuple[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["plan", model[0], "--weights", model[1], "--runtime", "ncnn", "--rounds", "2",
                                  "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.stderr
    assert "saved on ncnn (ms)" in result.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["runtime"] == "ncnn"
    out = tmp_path / "out.prototxt", tmp_path / "out.caffemodel"
    result = runner.invoke(main, ["rewrite", model[0], str(out[0]), "--weights", model[1], "--out-weights",
                                  str(out[1]), "--runtime", "onnxruntime", "--min-gain", "1000",
                                  "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert {c["rule"] for c in report["changes"]} == {"eliminate_dropout"}  # no lossy merge pays 1000%
    assert any("not applied: merge_pooling_into_conv" in w and "accuracy spent for nothing" in w
               for w in report["warnings"])


def test_exclusions_leave_nothing_to_noise() -> None:
    # a plan on a busy machine: identical copies of the net measured 5% apart, so a merge measured to save 0.5%
    # (or to cost 2%) may well save 3%: it is kept; one measured to cost 8% surely saves under 1%
    merges = [candidate("merge_pooling_into_conv", "lossy", (f"conv{i}", f"pool{i}"), [f"pool{i}"], saved)
              for i, saved in enumerate((0.05, -0.2, -0.8))]
    plan = RuntimePlan("net", "mnn", 1, 1, 3, 10.0, merges, noise=0.05)
    names, dropped = exclusions(plan, 1.0)
    assert names == ["pool2"] and len(dropped) == 1
    assert exclusions(RuntimePlan("net", "mnn", 1, 1, 3, 10.0, merges), 1.0)[0] == ["pool0", "pool1", "pool2"]


def test_plan_measures_its_own_noise_floor(model: tuple[str, str]) -> None:
    plan = plan_on_runtime(*model, "mnn", rounds=3, warmup=1)
    # identical copies of the net: their spread is measured, not assumed (never exactly 0 on a real clock)
    assert 0.0 < plan.noise < 1.0


def test_exclusions_never_block_a_merge_that_stays() -> None:
    # GoogLeNet's shape: the LRN merge runs through pool1 (conv1 -> pool1 -> norm1), so excluding pool1 because
    # the pooling merge saves little would silently block the LRN merge as well
    pool = candidate("merge_pooling_into_conv", "lossy", ("pool1", "conv1", "conv1_relu"), ["pool1", "conv1"], 0.0)
    pool.eliminated = ["pool1"]
    lrn = candidate("merge_lrn_into_conv", "lossy", ("norm1", "conv1", "conv1_relu", "pool1"), ["norm1"], 4.0)
    lrn.eliminated = ["norm1"]
    plan = RuntimePlan("net", "onnxruntime", 1, 1, 3, 10.0, [pool, lrn])
    assert exclusions(plan, 1.0) == ([], [])
    assert exclusions(plan, 50.0)[0] == ["pool1", "norm1"]  # both below: both left out
