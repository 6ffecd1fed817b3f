"""Cheap siblings of slow tests: where a slow test (tests/conftest.py's TIERS) was the only one to reach a code path,
a smaller case here reaches it in the fast tier, so `make check` keeps the coverage `make test` has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import tiny_inception
from test_batch import CAFFE_ABORTS, DEPLOY, by_path, leftovers, with_weights
from test_finetune import options as finetune_options
from test_finetune import run as finetune_run
from test_finetune_export import CAFFE, export, nets  # noqa: F401  (nets: the module fixture, built here too)
from test_finetune_export import options as export_options

# the library through its facade, so the package's inner layout can move under these tests
from deeprebirth import api
from deeprebirth.cli import main
from deeprebirth.io import caffe_io


def test_run_sh_chains_caffe_train_into_a_deploy_caffemodel(nets: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """test_run_sh_end_to_end_matches_the_in_process_result, one short whole-net phase in mimic mode."""
    plan = export(nets, tmp_path / "plan", export_options(mode="mimic", schedule="whole", budget="6it"))
    env = dict(os.environ, CAFFE=str(CAFFE), PYTHON=sys.executable, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([str(tmp_path / "plan" / "run.sh")], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(plan.steps) == 1
    final = caffe_io.read_weights(tmp_path / "plan" / "final.caffemodel")
    assert set(final) == set(caffe_io.read_weights(nets["slim_weights"]))  # the deploy net's layers, no teacher


def test_a_short_time_budget_ends_the_run_on_time(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    """test_a_time_budget_ends_the_run_on_time with one whole-net phase and a few seconds."""
    seconds = 6.0
    left: list[float] = []
    result = finetune_run(finetune_nets, tmp_path / "final.caffemodel",
                          finetune_options(budget=f"{seconds:g}s", patience=0, schedule="whole",
                                           solver=api.SolverOptions("adam", lr=1e-3)),
                          progress=lambda e: left.append(e.seconds_left) if e.event == "iteration" else None)
    # loose above: one iteration past the deadline on a loaded machine is the granularity of a time budget
    assert result.complete and 0.8 * seconds <= result.seconds <= 1.5 * seconds, result.seconds
    assert result.steps[0].iterations > 0 and left[0] > left[-1] >= 0


def test_rewrite_for_a_runtime_leaves_out_merges_that_do_not_pay(tmp_path: Path) -> None:
    """test_plan_and_rewrite_with_runtime_cli, with one timing round: the plan's CLI and the exclusions."""
    proto, model = save(graph_from_text(tiny_inception(), seed=4), tmp_path, "tiny")
    done = CliRunner().invoke(main, ["plan", proto, "--weights", model, "--runtime", "onnxruntime", "--rounds", "1"])
    assert done.exit_code == 0, done.output
    assert "saved on onnxruntime (ms)" in done.stdout
    report = tmp_path / "report.json"
    api.rewrite_files(proto, tmp_path / "out.prototxt", model, tmp_path / "out.caffemodel", report,
                      api.RewriteOptions(runtime="onnxruntime", min_gain=1000, runtime_rounds=1))
    written = json.loads(report.read_text())
    assert {c["rule"] for c in written["changes"]} == {"eliminate_dropout"}  # exact folds always; no merge pays 1000%
    assert any("not applied: merge_pooling_into_conv" in w for w in written["warnings"])


def test_a_batch_records_a_caffe_abort_in_the_check_and_writes_its_summary(tmp_path: Path) -> None:
    """test_batch_rewrites_a_zoo_and_a_second_run_skips_finished_models, without the model zoo's big nets."""
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    with_weights(zoo / "tiny", DEPLOY)
    with_weights(zoo / "caffe_aborts", CAFFE_ABORTS)
    rows = by_path(api.run_batch(zoo, out, api.BatchOptions(rules="exact", check=2, jobs=2)).results)
    assert rows["tiny/deploy.prototxt"].status == "ok" and rows["tiny/deploy.prototxt"].check.startswith("passed")
    aborts = rows["caffe_aborts/deploy.prototxt"]
    assert aborts.status == "check_failed" and "Caffe aborted" in aborts.error
    assert all((out / f"summary.{kind}").is_file() for kind in ("csv", "md", "json")) and leftovers(out) == []
