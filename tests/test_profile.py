"""deeprebirth.measure.profile and `deeprebirth profile`: per-layer timing of small nets in real Caffe, in a worker process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.caffe.isolation import fatal_line
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.classify import type_class
from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.measure.profile import (
    NetProfile,
    interleaved_latency,
    plot_by_type,
    profile_net,
    run_worker,
)

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
FAST = {"rounds": 2, "warmup": 1}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save(graph_from_text(NET, seed=3), tmp_path_factory.mktemp("profile"), "small")


@pytest.fixture(scope="module")
def profiled(model: tuple[str, str]) -> NetProfile:
    return profile_net(*model, **FAST)


def test_one_timing_per_layer(profiled: NetProfile) -> None:
    assert [t.name for t in profiled.layers] == ["data", "conv1", "relu1", "pool1", "norm1", "fc", "prob"]
    assert [t.type for t in profiled.layers][:2] == ["Input", "Convolution"]
    assert all(t.ms >= 0 for t in profiled.layers)
    assert profiled.forward_ms > 0 and len(profiled.forward_times_ms) == FAST["rounds"]
    assert profiled.blas_threads == 1 and profiled.input_shapes == {"data": [2, 3, 16, 16]}


def test_type_sums_and_shares(profiled: NetProfile) -> None:
    rows = profiled.by_type()
    assert sum(r.ms for r in rows) == pytest.approx(profiled.total_ms, rel=1e-9, abs=1e-9)
    assert sum(r.share for r in rows) == pytest.approx(1.0, abs=1e-6)
    assert sum(r.layers for r in rows) == len(profiled.layers)
    assert 0.0 <= profiled.non_tensor_share <= 1.0
    tensor, non_tensor = profiled.class_ms("tensor"), profiled.class_ms("non-tensor")
    assert profiled.non_tensor_share == pytest.approx(non_tensor / (tensor + non_tensor))
    assert [type_class(t) for t in ("Convolution", "InnerProduct", "Pooling", "Input")] == \
        ["tensor", "tensor", "non-tensor", "other"]


def test_memory_counts_in_place_once(profiled: NetProfile) -> None:
    # tops: data 2x3x16x16, conv1 (ReLU in place) 2x8x16x16, pool1 and norm1 2x8x8x8, fc and prob 2x5
    assert profiled.blob_bytes == 4 * (2 * 3 * 256 + 2 * 8 * 256 + 2 * 2 * 8 * 64 + 2 * 2 * 5)
    assert profiled.param_bytes == 4 * (8 * 3 * 9 + 8 + 5 * 512 + 5)
    assert profiled.peak_rss_bytes >= profiled.base_rss_bytes > 0


def test_peak_rss_is_the_workers_own(model: tuple[str, str]) -> None:
    """A big caller must not leak into the worker's peak (ru_maxrss would: exec keeps the parent's mark)."""
    ballast = np.ones(384 * 2**20 // 8)  # 384 MiB, touched
    found = profile_net(*model, **FAST)
    assert ballast[-1] == 1.0
    assert found.peak_rss_bytes < 256 * 2**20


def test_batch_reshapes_and_memory_scales(model: tuple[str, str]) -> None:
    one = profile_net(model[0], model[1], batch=1, **FAST)
    eight = profile_net(model[0], model[1], batch=8, **FAST)
    assert one.input_shapes["data"] == [1, 3, 16, 16] and eight.input_shapes["data"] == [8, 3, 16, 16]
    assert one.batch == 1 and eight.batch == 8
    assert eight.blob_bytes == 8 * one.blob_bytes
    assert eight.param_bytes == one.param_bytes


def test_threads_reach_openblas(model: tuple[str, str]) -> None:
    two = profile_net(*model, threads=2, **FAST)
    assert two.threads == 2
    assert two.blas_threads == min(2, os.cpu_count() or 1)


def test_cpu_clock(model: tuple[str, str]) -> None:
    found = profile_net(*model, clock="cpu", **FAST)
    assert found.clock == "cpu" and found.forward_ms > 0 and len(found.layers) == 7
    with pytest.raises(DeepRebirthError, match="unknown clock"):
        profile_net(*model, clock="sundial", **FAST)


def test_random_weights_without_caffemodel(model: tuple[str, str]) -> None:
    found = profile_net(model[0], None, **FAST)
    assert found.weights is None and len(found.layers) == 7


def test_set_batch_changes_shapes() -> None:
    graph = graph_from_text(NET)
    set_batch(graph, 5)
    assert infer_shapes(graph)["data"] == (5, 3, 16, 16)


def test_json_round_trip(profiled: NetProfile) -> None:
    again = NetProfile.from_json(json.loads(json.dumps(profiled.to_json())))
    assert again == profiled


def test_interleaved_latency(model: tuple[str, str]) -> None:
    times = interleaved_latency([model, model], rounds=3, warmup=1)
    assert len(times) == 2 and all(len(t) == 3 and min(t) > 0 for t in times)
    cv = interleaved_latency([model], runtime="opencv", fusion=False, rounds=2, warmup=1)
    assert len(cv[0]) == 2


def test_caffe_abort_becomes_one_line_error(model: tuple[str, str], tmp_path: Path) -> None:
    other = save(graph_from_text(NET.replace("num_output: 8", "num_output: 6"), seed=1), tmp_path, "other")
    request = {"job": "profile", "nets": [[model[0], other[1]]], "batch": None, "rounds": 1, "warmup": 0, "seed": 0}
    with pytest.raises(DeepRebirthError, match="Caffe aborted while running small.prototxt: .*conv1"):
        run_worker(request, threads=1)


def test_fatal_line() -> None:
    """The last glog fatal line: the one right before the abort (an earlier one was survived)."""
    log = "W1119 noise\nF1119 12:00:00.1 42 net.cpp:765] Check failed: shape mismatch\n*** Check failure stack ***"
    assert fatal_line(log) == "Check failed: shape mismatch"
    assert fatal_line("F1119 1 2 a.cpp:1] earlier\n" + log) == "Check failed: shape mismatch"
    assert fatal_line("a\nlast words\n") == "last words"


def test_plot_side_by_side(profiled: NetProfile, tmp_path: Path) -> None:
    path = tmp_path / "types.png"
    plot_by_type([profiled, profiled], ["before", "after"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# the command


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_profile(model: tuple[str, str], tmp_path: Path) -> None:
    plot, report = tmp_path / "p.png", tmp_path / "p.json"
    code, out, err = run("profile", model[0], "--weights", model[1], "--rounds", "2", "--batch", "3",
                         "--plot", str(plot), "--json", str(report))
    assert code == 0, err
    assert "non-tensor" in out and "Convolution" in out and "3x3x16x16" in out
    assert plot.exists() and json.loads(report.read_text())[0]["batch"] == 3


def test_cli_profile_compare(model: tuple[str, str]) -> None:
    code, out, err = run("profile", model[0], "--weights", model[1], "--rounds", "2", "--compare", model[0],
                         "--compare-weights", model[1])
    assert code == 0, err
    assert "before/after" in out and "peak RSS" in out


@pytest.mark.parametrize("args, needle", [
    (["missing.prototxt"], "no such file"),
    (["{model}", "--compare-weights", "{weights}"], "--compare-weights needs --compare"),
    (["{model}", "--weights", "{model}"], "not a valid caffemodel"),
])
def test_cli_profile_bad_input(model: tuple[str, str], args: list[str], needle: str) -> None:
    args = [a.format(model=model[0], weights=model[1]) for a in args]
    code, _, err = run("profile", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
