"""finetune --export: the plan as plain Caffe files, run by the real `caffe train` on the CPU.

The net is the Fashion-MNIST example's (examples/fashion_mnist/net.py, a GoogLeNet in miniature) with random weights,
slimmed by every rule; the images are random 28x28 grayscale ones labelled by the original. The `caffe` binary is
the venv's (DEEPREBIRTH_CAFFE overrides it); it must load `-weights` (scripts/build_caffe.sh rebuilds the fork's
tool, whose `train` ignored them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.api import rewrite_files
from deeprebirth.caffe.data import Transform, open_data, split_holdout, write_lmdb
from deeprebirth.caffe.runtime import forward, open_net
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune import FinetuneOptions, Progress, finetune_files
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.context import held_out_share
from deeprebirth.finetune.export import export_plan
from deeprebirth.finetune.losses import softmax
from deeprebirth.finetune.settings import EXPORT_BUDGET, FINETUNE_OPTIONS, finetune_options
from deeprebirth.finetune.train import SOLVER_TYPES, SolverOptions
from deeprebirth.io import caffe_io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist"))
from net import prototxt as fashion_prototxt

CAFFE = Path(os.environ.get("DEEPREBIRTH_CAFFE", Path(sys.executable).parent / "caffe"))
IMAGES = 480
LOSS_LINE = re.compile(r"Iteration (\d+), loss = (\S+)")


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("export")
    proto, model = save(graph_from_text(fashion_prototxt(), seed=1), folder, "original")
    paths = {"original": proto, "original_weights": model, "slim": str(folder / "slim.prototxt"),
             "slim_weights": str(folder / "slim.caffemodel"), "report": str(folder / "report.json")}
    rewrite_files(proto, paths["slim"], model, paths["slim_weights"], paths["report"])
    x = np.random.default_rng(0).integers(0, 256, (IMAGES, 28, 28), dtype=np.uint8)
    logits = forward(open_net(proto, model), {"data": x[:, None].astype(np.float32) / 255}, ["prob"])["prob"]
    np.savez(folder / "data.npz", x=x, y=logits.argmax(axis=1))
    paths["data"] = str(folder / "data.npz")
    return paths


def options(**changes: object) -> FinetuneOptions:
    """No shuffling, no mirror, a fixed rate: the in-process run and Caffe see the same batches in the same order."""
    base = FinetuneOptions(budget="300it", batch=16, transform=Transform(scale=1 / 255), holdout=0.1, shuffle=False,
                           solver=SolverOptions("sgd", lr=0.01), patience=0, val_limit=48)
    return replace(base, **changes)  # type: ignore[arg-type]


def export(nets: dict[str, str], folder: Path, opts: FinetuneOptions, **kwargs: object):  # type: ignore[no-untyped-def]
    return export_plan(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"],
                       nets["report"], nets["data"], folder, opts, **kwargs)  # type: ignore[arg-type]


def caffe(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0", OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([str(CAFFE), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def losses(log: str, iterations: int) -> list[float]:
    """Caffe's loss at each displayed iteration (the weighted sum of the loss tops, before that iteration's update;
    the line for ``iterations`` is a forward pass after the last update)."""
    found: dict[int, float] = {}
    for iteration, value in LOSS_LINE.findall(log):
        found.setdefault(int(iteration), float(value))
    return [found[i] for i in sorted(found) if i < iterations]


def test_caffe_train_loads_the_weights_it_is_given(nets: dict[str, str], tmp_path: Path) -> None:
    """With base_lr 0 the snapshot after one iteration is exactly what -weights loaded (the fork ignored them)."""
    plan = export(nets, tmp_path / "plan", options(budget="1it", schedule="whole"))
    solver = (tmp_path / "plan" / "step_1" / "solver.prototxt")
    solver.write_text(solver.read_text().replace("base_lr: 0.01", "base_lr: 0"))
    caffe("train", "-solver", "step_1/solver.prototxt", "-weights", plan.steps[0].weights, cwd=tmp_path / "plan")
    after = caffe_io.read_weights(tmp_path / "plan" / plan.steps[0].snapshot)
    given = caffe_io.read_weights(nets["slim_weights"])
    assert given and all(np.array_equal(np.asarray(after[name][0]), np.asarray(blobs[0]))
                         for name, blobs in given.items())


def test_export_writes_each_phase_as_caffe_files(nets: dict[str, str], tmp_path: Path) -> None:
    plan = export(nets, tmp_path / "plan", options(schedule="layerwise", budget="2ep", shuffle=True))
    folder = tmp_path / "plan"
    held = round(IMAGES * held_out_share(0.1, IMAGES))  # small data holds out more than a tenth
    epoch = (IMAGES - held) // 16
    steps = json.loads((folder / "plan.json").read_text())["steps"]
    assert len(steps) == len(plan.steps) >= 4 and plan.steps[-1].name == "whole net"
    assert sum(s.iterations for s in plan.steps) == pytest.approx(2 * epoch, abs=len(steps))  # the in-process shares
    assert plan.steps[-1].iterations == epoch  # the whole-net phase gets half
    assert os.access(folder / "run.sh", os.X_OK) and (folder / "deploy.prototxt").is_file()
    stored = open_data(folder / "train_lmdb", channels=1, input_size=(28, 28))
    train, _ = split_holdout(IMAGES, held_out_share(0.1, IMAGES), 0)  # the in-process run's training images
    source = np.load(nets["data"])
    key = np.lexsort(stored.array.reshape(len(stored), -1).T)  # type: ignore[union-attr]
    expected = source["x"][train][:, None].astype(np.float32)
    assert len(stored) == len(train) and not np.array_equal(stored.array, expected)  # shuffled once, with --seed
    assert np.array_equal(stored.array[key], expected[np.lexsort(expected.reshape(len(train), -1).T)])  # type: ignore[index]
    assert np.array_equal(np.sort(stored.labels), np.sort(source["y"][train]))  # type: ignore[arg-type]
    original = caffe_io.read_weights(nets["original_weights"])
    for step in plan.steps:
        net = caffe_io.read_prototxt(folder / f"step_{step.index}" / "train_val.prototxt")
        data = net.layer[0]
        assert data.type == "Data" and list(data.top) == ["data", "label"]
        assert data.data_param.source == "train_lmdb" and data.data_param.batch_size == 16
        assert not [layer.name for layer in net.layer if layer.type == "Input"]
        teacher = [layer for layer in net.layer if layer.name.startswith("teacher/")]
        assert teacher and all(p.lr_mult == 0 for layer in teacher for p in layer.param)
        dropout = [(layer.name, list(layer.bottom)) for layer in net.layer if layer.type == "Dropout"]
        assert dropout == [("drop", ["gap"])]  # the student trains with the original's; the teacher runs without
        init = caffe_io.read_weights(folder / f"step_{step.index}" / "init.caffemodel")
        for layer in teacher:  # the frozen teacher's weights are the original's
            if layer.name in init:
                assert np.array_equal(init[layer.name][0], original[layer.name[len("teacher/"):]][0])
        solver = (folder / f"step_{step.index}" / "solver.prototxt").read_text()
        assert f"max_iter: {step.iterations}" in solver and 'lr_policy: "poly"' in solver
        assert "random_seed: 0" in solver and "base_lr: 0.01" in solver
    run = (folder / "run.sh").read_text()
    assert f"-weights {plan.steps[0].snapshot},step_2/init.caffemodel" in run and '"$@"' in run


def test_export_refuses_what_a_plain_solver_cannot_do(nets: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(DeepRebirthError, match="a time budget cannot be exported"):
        export(nets, tmp_path / "plan", options(budget="10m"))
    with pytest.raises(DeepRebirthError, match="--mixup on blends images in-process"):
        export(nets, tmp_path / "plan", options(mode="mimic", mixup="on"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DeepRebirthError, match="not empty"):
        export(nets, tmp_path / "full", options())
    assert not (tmp_path / "plan").exists() and not list(tmp_path.glob(".plan.*"))  # nothing half-written left


@pytest.mark.parametrize("solver, mode, rate", [("adam", "label", 3e-4), ("adam", "mimic", 1e-3),
                                                ("sgd", "mimic", 0.01)])
def test_an_exported_solver_without_a_rate_gets_the_searchs_reference(nets: dict[str, str], tmp_path: Path,
                                                                       solver: str, mode: str, rate: float) -> None:
    """No search runs in a plain ``caffe train``: the reference the search would start from, at its batch and loss
    (search.reference_rate), with Adam's own reference without labels."""
    plan = export(nets, tmp_path / "plan", options(mode=mode, solver=SolverOptions(solver, lr=None)))
    for step in plan.steps:
        text = (tmp_path / "plan" / f"step_{step.index}" / "solver.prototxt").read_text()
        assert f"base_lr: {rate:g}\n" in text and f'type: "{SOLVER_TYPES[solver]}"' in text, text


@pytest.mark.parametrize("mode", ["label", "mimic"])
def test_exported_step_trains_in_caffe_as_it_does_in_process(nets: dict[str, str], tmp_path: Path,
                                                              mode: str) -> None:
    """The whole-net phase: `caffe train` on the exported files gives the in-process run's losses, iteration for
    iteration (same seed, same data order), and over 200 iterations the loss falls. Without the original's Dropout:
    its masks come from Caffe's one random stream, which the two train nets' set-ups draw from differently (the
    exported one embeds the original, with fillers), so with it the losses agree only on average."""
    opts = options(mode=mode, schedule="whole", budget="200it", dropout="off")
    seen: list[float] = []

    def progress(event: Progress) -> None:
        if event.event == "iteration" and event.loss is not None:
            seen.append(event.loss)

    finetune_files(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"], nets["report"],
                   nets["data"], tmp_path / "inproc.caffemodel", opts, progress=progress)
    plan = export(nets, tmp_path / "plan", opts, display=1)
    log = caffe("train", "-solver", "step_1/solver.prototxt", "-weights", plan.steps[0].weights, cwd=tmp_path / "plan")
    caffe_losses = losses(log, 200)
    assert len(caffe_losses) == len(seen) == 200
    first = np.array(caffe_losses[:10]), np.array(seen[:10])
    assert np.max(np.abs(first[0] - first[1]) / np.abs(first[1])) < 1e-4, first  # float32, same kernels
    # the distillation loss is a cross-entropy to the teacher's soft targets: its floor is their entropy
    x = np.load(nets["data"])["x"][:, None].astype(np.float32) / 255
    p = softmax(forward(open_net(nets["original"], nets["original_weights"]), {"data": x}, ["fc"])["fc"],
                opts.temperature)
    kd_weight = opts.kd_weight if mode == "label" else 1.0
    floor = kd_weight * opts.temperature ** 2 * float(np.mean(-np.sum(p * np.log(p), axis=1)))
    start, end = np.mean(caffe_losses[:20]) - floor, np.mean(caffe_losses[-20:]) - floor
    assert end < 0.75 * start, (floor, start, end)  # measured: label 0.46 -> 0.26 (the labels have a floor too)


def test_run_sh_end_to_end_matches_the_in_process_result(nets: dict[str, str], tmp_path: Path) -> None:
    """The paper's schedule in mimic mode, each step's loss a EuclideanLoss on the merged blob, then the whole net:
    run.sh chains every `caffe train` and writes a deploy caffemodel that agrees with the original about as well
    as the in-process run's."""
    opts = options(mode="mimic", schedule="layerwise", mimic_at="local", budget="240it")
    plan = export(nets, tmp_path / "plan", opts)
    euclidean = caffe_io.read_prototxt(tmp_path / "plan" / "step_1" / "train_val.prototxt")
    assert [layer.type for layer in euclidean.layer if layer.name.startswith("loss_")] == ["EuclideanLoss"]
    env = dict(os.environ, CAFFE=str(CAFFE), PYTHON=sys.executable, OPENBLAS_NUM_THREADS="1", GLOG_minloglevel="0")
    done = subprocess.run([str(tmp_path / "plan" / "run.sh")], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"caffe.cpp:\d+\] Optimization Done", done.stderr)) == len(plan.steps)
    final = tmp_path / "plan" / "final.caffemodel"
    assert set(caffe_io.read_weights(final)) == set(caffe_io.read_weights(nets["slim_weights"]))

    inproc = tmp_path / "inproc.caffemodel"
    finetune_files(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"], nets["report"],
                   nets["data"], inproc, opts)
    x = np.load(nets["data"])["x"][:, None].astype(np.float32) / 255
    teacher = forward(open_net(nets["original"], nets["original_weights"]), {"data": x}, ["fc"])["fc"]

    def error(weights: str | Path) -> float:
        logits = forward(open_net(nets["slim"], weights), {"data": x}, ["fc"])["fc"]
        return float(np.mean((logits - teacher) ** 2) / np.var(teacher))

    before, exported, in_process = error(nets["slim_weights"]), error(final), error(inproc)
    assert exported < 0.5 * before, (before, exported)
    # measured: 0.561 before, 0.00621 after run.sh, 0.00632 after the in-process run (which keeps its best checkpoint)
    assert exported < 1.25 * in_process and in_process < 1.25 * exported, (exported, in_process)


def test_train_val_data_layer_is_used(nets: dict[str, str], tmp_path: Path) -> None:
    """--train-val: the user's TRAIN Data layer (its LMDB, its transform) feeds the step; the batch is the run's."""
    data = open_data(nets["data"], channels=1, input_size=(28, 28))
    write_lmdb(data, np.arange(64), tmp_path / "user_lmdb")
    train_val = tmp_path / "train_val.prototxt"
    train_val.write_text('layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }\n'
                         '  transform_param { scale: 0.00390625 } data_param { source: "user_lmdb" batch_size: 64 '
                         'backend: LMDB } }\n'
                         'layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }\n'
                         '  data_param { source: "test_lmdb" batch_size: 100 backend: LMDB } }\n')
    plan = export(nets, tmp_path / "plan", options(budget="20it", schedule="whole"), train_val=train_val)
    net = caffe_io.read_prototxt(tmp_path / "plan" / "step_1" / "train_val.prototxt")
    assert net.layer[0].name == "mnist" and net.layer[0].data_param.source == str(tmp_path / "user_lmdb")
    assert net.layer[0].data_param.batch_size == 16 and net.layer[0].transform_param.scale == pytest.approx(1 / 256)
    assert not (tmp_path / "plan" / "train_lmdb").exists() and plan.images is None
    log = caffe("train", "-solver", "step_1/solver.prototxt", "-weights", plan.steps[0].weights, cwd=tmp_path / "plan")
    assert "Optimization Done" in log


def test_cli_export_and_its_one_line_errors(nets: dict[str, str], tmp_path: Path) -> None:
    args = ["finetune", nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"], "--report",
            nets["report"], "--data", nets["data"], "--scale", str(1 / 255)]
    result = CliRunner().invoke(main, [*args, "--export", str(tmp_path / "plan"), "--budget", "1ep"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "run.sh" in result.stdout and "sgd at 0.01" in result.stdout
    assert (tmp_path / "plan" / "step_1" / "init.caffemodel").is_file()
    result = CliRunner().invoke(main, [*args, "--export", str(tmp_path / "plan2")])  # no --budget: an exportable one
    assert result.exit_code == 0, result.output
    assert f"budget {EXPORT_BUDGET} (--export's default" in result.stdout
    assert json.loads((tmp_path / "plan2" / "plan.json").read_text())["budget"] == EXPORT_BUDGET
    result = CliRunner().invoke(main, [*args, "--export", str(tmp_path / "plan3"), "--budget", "10m"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "time budget cannot be exported" in result.stderr
    result = CliRunner().invoke(main, [*args, "--train-val", nets["report"], "--out", str(tmp_path / "o.caffemodel")])
    assert result.exit_code == 2 and "--train-val needs --export" in result.stderr
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--out is required" in result.stderr
    layer = caffe_io.read_prototxt(tmp_path / "plan" / "step_1" / "train_val.prototxt").layer[0]
    assert layer.type == "Data" and layer.include[0].phase == pb.TRAIN and layer.transform_param.mirror


DEFAULTS = {option.name: option.default for option in FINETUNE_OPTIONS}  # the settings as the CLI passes them


def test_without_a_budget_finetune_trains_for_its_default_and_exports_for_an_exportable_one() -> None:
    assert finetune_options({**DEFAULTS}).budget == FinetuneOptions().budget
    exported = finetune_options({**DEFAULTS}, export=True).budget
    assert exported == EXPORT_BUDGET and not Budget.parse(exported).timed
    assert finetune_options({**DEFAULTS, "budget": "3000it"}, export=True).budget == "3000it"
