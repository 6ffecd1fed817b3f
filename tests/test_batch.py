"""Batch over a model zoo: discovery and pairing, parallel workers that may fail, crash or hang, the summary, second
runs, Ctrl-C, and the CLI's exit codes."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fuzzing.nets import RandomChooser, net_graph, random_net_text

from deeprebirth.batch import (
    BatchOptions,
    ModelResult,
    ModelTask,
    discover,
    rewrite_model,
    run_batch,
)
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.model import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
"""
TRAIN_VAL = """name: "tiny"
layer { name: "d" type: "Data" top: "data" include { phase: TRAIN } data_param { source: "train_lmdb" } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
"""
SOLVER = 'net: "train_val.prototxt"\nbase_lr: 0.01\nmax_iter: 100\n'
# deeprebirth accepts an even LRN size (its shape is the input's), Caffe aborts the process on it
CAFFE_ABORTS = DEPLOY.replace('layer { name: "relu"', 'layer { name: "lrn" type: "LRN" bottom: "conv" top: "lrn" '
                              'lrn_param { local_size: 4 } }\nlayer { name: "relu"')


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def generated_model(folder: Path, stem: str, seed: int, weights_name: str | None = None) -> None:
    """A random valid net with random weights (prototxt ``<stem>.prototxt``, caffemodel ``weights_name``)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = net_graph(random_net_text(RandomChooser(random.Random(seed)), 6), seed)
    save_model(graph, folder / f"{stem}.prototxt", folder / (weights_name or f"{stem}.caffemodel"))


def with_weights(folder: Path, text: str, stem: str = "deploy", weights_name: str | None = None) -> None:
    write(folder / "tmp.prototxt", text)
    graph = load_model(folder / "tmp.prototxt")
    from deeprebirth.ir.initializers import random_weights

    random_weights(graph, 1)
    (folder / "tmp.prototxt").unlink()
    save_model(graph, folder / f"{stem}.prototxt", folder / (weights_name or f"{stem}.caffemodel"))


def leftovers(out: Path) -> list[str]:
    """Staging folders and temp files: a finished or interrupted batch must leave none."""
    return [str(p) for p in out.rglob("*") if p.name.startswith(".")]


def by_path(rows: list[ModelResult]) -> dict[str, ModelResult]:
    return {row.prototxt: row for row in rows}


# ---------------------------------------------------------------------------------------------------------------
# discovery


def test_discover_pairs_weights_and_tells_deploy_from_training_files(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    write(zoo / "a" / "deploy.prototxt", DEPLOY)
    write(zoo / "a" / "bvlc_a.caffemodel", "x")  # the folder's only caffemodel pairs with deploy.prototxt
    write(zoo / "a" / "train_val.prototxt", TRAIN_VAL)
    write(zoo / "a" / "solver.prototxt", SOLVER)
    write(zoo / "b" / "net.prototxt", DEPLOY)
    write(zoo / "b" / "net.caffemodel", "x")  # same stem
    write(zoo / "b" / "orphan.caffemodel", "x")
    write(zoo / "c" / "sub" / "train_val.prototxt", TRAIN_VAL)  # no deploy net beside it: rewritten (phase TEST)
    write(zoo / "c" / "sub" / "snapshot.caffemodel", "x")
    write(zoo / "d" / "deploy.prototxt.txt", DEPLOY)  # among several nets the deploy* one takes the caffemodel
    write(zoo / "d" / "variant.prototxt", DEPLOY)
    write(zoo / "d" / "res10.caffemodel", "x")
    write(zoo / "e" / "lenet.prototxt", SOLVER.replace("base_lr", "lr_policy"))  # a solver by content
    write(zoo / ".git" / "deploy.prototxt", DEPLOY)  # hidden folders are not searched
    write(zoo / "out" / "a" / "deploy.prototxt", DEPLOY)  # nor the output folder
    found = {(m.prototxt, m.weights, m.kind, bool(m.skip)) for m in discover(zoo, exclude=zoo / "out")}
    assert found == {
        ("a/deploy.prototxt", "a/bvlc_a.caffemodel", "deploy", False),
        ("a/train_val.prototxt", None, "train_val", True),
        ("a/solver.prototxt", None, "solver", True),
        ("b/net.prototxt", "b/net.caffemodel", "deploy", False),
        ("b/orphan.caffemodel", None, "caffemodel", True),
        ("c/sub/train_val.prototxt", "c/sub/snapshot.caffemodel", "train_val", False),
        ("d/deploy.prototxt.txt", "d/res10.caffemodel", "deploy", False),
        ("d/variant.prototxt", None, "deploy", False),
        ("e/lenet.prototxt", None, "solver", True),
    }


# ---------------------------------------------------------------------------------------------------------------
# a whole zoo


@pytest.fixture
def zoo(tmp_path: Path, model_zoo: Path) -> Path:
    """The model-zoo prototxts (deploy, train_val, solvers; no weights), generated nets with weights, a syntax
    error and a net that makes Caffe abort during --check."""
    zoo = tmp_path / "zoo"
    for name in ("bvlc_googlenet", "bvlc_alexnet"):
        for source in (model_zoo / name).iterdir():
            (zoo / name).mkdir(parents=True, exist_ok=True)
            (zoo / name / source.name).symlink_to(source)
    with_weights(zoo / "tiny", DEPLOY, weights_name="tiny_iter_100.caffemodel")
    for i in range(3):
        generated_model(zoo / "generated", f"net{i}", seed=i)
    write(zoo / "broken" / "deploy.prototxt", 'name: "x"\nlayer {\n  name: "a"\n  botom: "data"\n}\n')
    with_weights(zoo / "caffe_aborts", CAFFE_ABORTS)
    return zoo


def test_batch_rewrites_a_zoo_and_a_second_run_skips_finished_models(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[tuple[str, int, int]] = []
    summary = run_batch(zoo, out, BatchOptions(rules="exact", check=2, jobs=2),
                        on_result=lambda row, done, total: seen.append((row.prototxt, done, total)))
    rows = by_path(summary.results)
    assert [done for _, done, _ in seen] == list(range(1, len(rows) + 1))
    assert rows["bvlc_googlenet/deploy.prototxt"].status == "ok"
    assert rows["bvlc_googlenet/deploy.prototxt"].check == "skipped: no caffemodel"
    assert rows["bvlc_googlenet/train_val.prototxt"].status == "skipped"
    assert rows["bvlc_googlenet/quick_solver.prototxt"].status == "skipped"
    tiny = rows["tiny/deploy.prototxt"]
    assert tiny.status == "ok" and tiny.weights == "tiny/tiny_iter_100.caffemodel"
    assert tiny.rules_fired == {"fuse_batchnorm_into_conv": 1}
    assert tiny.layers_before == 4 and tiny.layers_after == 3
    assert tiny.check.startswith("passed")
    assert all(rows[f"generated/net{i}.prototxt"].status == "ok" for i in range(3))
    broken = rows["broken/deploy.prototxt"]
    assert broken.status == "failed" and "deploy.prototxt:4:" in broken.error and "botom" in broken.error
    aborts = rows["caffe_aborts/deploy.prototxt"]
    assert aborts.status == "check_failed" and "Caffe aborted" in aborts.error
    assert {r.status for r in summary.failed} == {"failed", "check_failed"}

    # outputs under the same relative paths and names; nothing half-written or staged
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [
        "deploy.batch.json", "deploy.prototxt", "deploy.report.json", "tiny_iter_100.caffemodel"]
    assert load_model(out / "tiny" / "deploy.prototxt", out / "tiny" / "tiny_iter_100.caffemodel")
    assert not (out / "broken").exists() or not list((out / "broken").iterdir())
    assert leftovers(out) == []

    # the summary, three ways
    data = json.loads((out / "summary.json").read_text())
    assert data["counts"] == summary.counts and len(data["models"]) == len(rows)
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["prototxt"]: r["status"] for r in table} == {k: v.status for k, v in rows.items()}
    tiny_csv = next(r for r in table if r["prototxt"] == "tiny/deploy.prototxt")
    assert tiny_csv["rules_fired"] == "fuse_batchnorm_into_convx1" and tiny_csv["layers_after"] == "3"
    markdown = (out / "summary.md").read_text()
    assert "| tiny/deploy.prototxt | tiny/tiny_iter_100.caffemodel | ok | 4 → 3 |" in markdown

    # second run: finished models are not redone, failed ones are retried; --force redoes everything
    stamp = (out / "tiny" / "deploy.prototxt").stat().st_mtime_ns
    again = by_path(run_batch(zoo, out, BatchOptions(rules="exact", check=2, jobs=2)).results)
    assert again["tiny/deploy.prototxt"].cached and again["generated/net0.prototxt"].cached
    assert not again["broken/deploy.prototxt"].cached and again["broken/deploy.prototxt"].status == "failed"
    assert (out / "tiny" / "deploy.prototxt").stat().st_mtime_ns == stamp
    other_options = by_path(run_batch(zoo, out, BatchOptions(rules="exact", jobs=2)).results)  # no --check
    assert not other_options["tiny/deploy.prototxt"].cached
    assert (out / "tiny" / "deploy.prototxt").stat().st_mtime_ns != stamp


# ---------------------------------------------------------------------------------------------------------------
# workers that crash or hang (run in the spawned worker process: importable from this module)


def misbehaving_worker(task: ModelTask) -> ModelResult:
    name = task.model.prototxt
    if "crash" in name:
        sys.stderr.write("F1125 12:00:00.000000  4242 net.cpp:42] Check failed: boom (3 vs. 4)\n")
        sys.stderr.flush()
        os.abort()
    if "hang" in name:
        # write a partial output first: a timed-out model must leave nothing behind
        (Path(task.staging) / "deploy.prototxt").write_text("partial")
        time.sleep(120)
    if "bug" in name:
        raise KeyError("an internal bug")
    return rewrite_model(task)


def test_crashed_and_hung_workers_are_recorded_and_the_batch_goes_on(tmp_path: Path) -> None:
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    for name in ("crash", "hang", "bug", "fine"):
        with_weights(zoo / name, DEPLOY)
    start = time.monotonic()
    summary = run_batch(zoo, out, BatchOptions(rules="exact", jobs=4, timeout=15), worker=misbehaving_worker)
    # the hung worker sleeps 120 s: well under that proves it was stopped, with room for a loaded machine's start-up
    assert time.monotonic() - start < 100
    rows = by_path(summary.results)
    crash = rows["crash/deploy.prototxt"]
    assert crash.status == "crashed"
    assert "SIGABRT" in crash.error and "Check failed: boom (3 vs. 4)" in crash.error
    assert rows["hang/deploy.prototxt"].status == "timeout" and "15 s" in rows["hang/deploy.prototxt"].error
    bug = rows["bug/deploy.prototxt"]
    assert bug.status == "failed" and "internal error" in bug.error and "KeyError" in bug.error
    assert rows["fine/deploy.prototxt"].status == "ok"
    for name in ("crash", "hang", "bug"):
        assert not (out / name).exists() or not list((out / name).iterdir()), name
    assert leftovers(out) == []
    assert len(summary.failed) == 3


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_batch_exit_codes(tmp_path: Path) -> None:
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    with_weights(zoo / "good", DEPLOY)
    write(zoo / "bad" / "deploy.prototxt", "layer {")
    runner = CliRunner()
    result = runner.invoke(main, ["batch", str(zoo), str(out), "--jobs", "2", "--rules", "exact"])
    assert result.exit_code == 0, result.output
    assert "[1/2]" in result.stderr and "[2/2]" in result.stderr
    assert "2 found: 1 failed, 1 ok" in result.stdout
    result = runner.invoke(main, ["batch", str(zoo), str(out), "--strict", "--rules", "exact"])
    assert result.exit_code == 1 and "1 model(s) failed (--strict)" in result.stderr
    assert "ok (done earlier)" in result.stderr
    (zoo / "bad" / "deploy.prototxt").unlink()
    result = runner.invoke(main, ["batch", str(zoo), str(out), "--strict", "--rules", "exact", "--force"])
    assert result.exit_code == 0 and "[1/1] ok good/deploy.prototxt" in result.stderr  # --force: redone
    result = runner.invoke(main, ["batch", str(tmp_path / "nowhere"), str(out)])
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: ") and "not a folder" in result.stderr
    result = runner.invoke(main, ["batch", str(zoo), str(zoo)])
    assert result.exit_code == 2 and "must not be the zoo folder" in result.stderr
    result = runner.invoke(main, ["batch", str(zoo), str(out), "--rules", "nope"])
    assert result.exit_code == 2 and "unknown rule or group 'nope'" in result.stderr


def test_ctrl_c_leaves_whole_outputs_or_none(tmp_path: Path) -> None:
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    for i in range(8):
        generated_model(zoo / f"m{i}", "deploy", seed=10 + i)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # a shell that runs the suite in the background starts it with SIGINT ignored, and children inherit that:
    # the child puts Python's own Ctrl-C handler back before it runs the CLI
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = ['deeprebirth', *sys.argv[1:]]; runpy.run_module('deeprebirth.cli', run_name='__main__')")
    child = subprocess.Popen([sys.executable, "-c", launcher, "batch", str(zoo), str(out), "--jobs", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stderr is not None
    first = child.stderr.readline()  # the first model finished; others are being written now
    assert first.startswith("[1/8]"), first
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted; no output was left half-written" in err
    assert leftovers(out) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    statuses = {m["prototxt"]: m["status"] for m in summary["models"]}
    assert "interrupted" in statuses.values()
    for i in range(8):
        files = sorted(p.name for p in (out / f"m{i}").iterdir()) if (out / f"m{i}").exists() else []
        if statuses[f"m{i}/deploy.prototxt"] == "ok":
            assert files == ["deploy.batch.json", "deploy.caffemodel", "deploy.prototxt", "deploy.report.json"]
            load_model(out / f"m{i}" / "deploy.prototxt", out / f"m{i}" / "deploy.caffemodel")
        else:
            assert files == [], (i, files)
    # the next run finishes the job and keeps what was done
    rows = run_batch(zoo, out, BatchOptions(jobs=2)).results
    assert all(r.status == "ok" for r in rows)
    assert sum(r.cached for r in rows) == sum(s == "ok" for s in statuses.values()) >= 1


def test_cli_batch_takes_every_rewrite_option_and_preset(tmp_path: Path) -> None:
    """batch passes every rewrite option to each model: --widen and the Tucker preset change what is written, the
    same as rewrite with those options writes."""
    from nets import tiny_inception

    from deeprebirth.api import preset_options, rewrite_files

    zoo = tmp_path / "zoo"
    with_weights(zoo / "inception", tiny_inception())
    runner = CliRunner()
    outs = {}
    for label, args in (("default", []), ("3x3", ["--widen", "3x3", "--preset", "deeprebirth+tucker"])):
        outs[label] = tmp_path / label
        result = runner.invoke(main, ["batch", str(zoo), str(outs[label]), "--jobs", "1", *args])
        assert result.exit_code == 0 and "1 ok" in result.stdout, result.output
    report = json.loads((outs["3x3"] / "inception" / "deploy.report.json").read_text())
    assert "decompose_conv_tucker" in report["rules"]
    assert any("widen=3x3" in change["summary"] for change in report["changes"])
    summary = json.loads((outs["3x3"] / "summary.json").read_text())
    assert summary["options"]["widen"] == "3x3" and summary["options"]["rules"] == "all,tucker"
    direct = tmp_path / "direct"
    direct.mkdir()
    rewrite_files(zoo / "inception" / "deploy.prototxt", direct / "deploy.prototxt",
                  zoo / "inception" / "deploy.caffemodel", direct / "deploy.caffemodel",
                  options=preset_options("deeprebirth+tucker", widen="3x3"))
    for name in ("deploy.prototxt", "deploy.caffemodel"):
        assert (direct / name).read_bytes() == (outs["3x3"] / "inception" / name).read_bytes()
        assert (direct / name).read_bytes() != (outs["default"] / "inception" / name).read_bytes()
    result = runner.invoke(main, ["batch", str(zoo), str(tmp_path / "bad"), "--widen", "4x4"])
    assert result.exit_code == 2 and "'4x4' is not one of" in result.stderr
    with pytest.raises(DeepRebirthError, match="unknown widen mode '4x4' .known: 3x3, 5x5, balanced"):
        run_batch(zoo, tmp_path / "bad", BatchOptions(widen="4x4"))
