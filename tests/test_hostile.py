"""Hostile input: a prototxt is data, never instructions. Rewriting never opens the paths a net names (data sources,
mean files, HDF5 output) and never imports a Python layer's module; absurd sizes and weights give clear one-line
errors; layer types the tool does not know pass through untouched, with a warning that names them."""

from __future__ import annotations

import builtins
import importlib.abc
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.batch import BatchOptions, FoundModel, ModelTask, rewrite_model
from deeprebirth.cli import main
from deeprebirth.io import caffe_io

PROBE = "deeprebirth_hostile_probe"

NET = """name: "hostile"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
"""


def hostile_layers(folder: Path) -> tuple[str, list[str]]:
    """Layers that name files (a FIFO, which would block whoever opened it, and paths that do not exist) and a
    Python module; all in the TEST phase, so they survive the phase filter."""
    fifo = folder / "source.fifo"
    os.mkfifo(fifo)
    paths = [str(fifo), str(folder / "mean.binaryproto"), str(folder / "images.txt"), str(folder / "h5list.txt"),
             str(folder / "windows.txt"), str(folder / "written_by_caffe.h5")]
    text = f"""
layer {{ name: "lmdb" type: "Data" top: "d1" top: "l1" include {{ phase: TEST }}
        transform_param {{ mean_file: "{paths[1]}" }} data_param {{ source: "{paths[0]}" batch_size: 1 backend: LMDB }} }}
layer {{ name: "images" type: "ImageData" top: "d2" top: "l2" image_data_param {{ source: "{paths[2]}" }} }}
layer {{ name: "h5" type: "HDF5Data" top: "d3" hdf5_data_param {{ source: "{paths[3]}" batch_size: 1 }} }}
layer {{ name: "windows" type: "WindowData" top: "d4" top: "l4" window_data_param {{ source: "{paths[4]}" }} }}
layer {{ name: "h5out" type: "HDF5Output" bottom: "fc" bottom: "fc" hdf5_output_param {{ file_name: "{paths[5]}" }} }}
layer {{ name: "py" type: "Python" bottom: "fc" top: "py" python_param {{ module: "{PROBE}" layer: "Probe" }} }}
"""
    return text, paths


class Recorder(importlib.abc.MetaPathFinder):
    """Records every path opened and every module import attempted while active; opening a forbidden path fails
    at once (instead of blocking on the FIFO)."""

    def __init__(self, forbidden: Sequence[str]) -> None:
        self.forbidden = {os.path.realpath(p) for p in forbidden}
        self.opened: list[str] = []
        self.imports: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        self.imports.append(fullname)  # and let the real finders answer

    def wrap(self, original: Any) -> Any:
        def recording(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, bytes, os.PathLike)):
                name = os.path.realpath(os.fsdecode(file))
                self.opened.append(name)
                if name in self.forbidden:
                    raise AssertionError(f"opened a path named inside the prototxt: {name}")
            return original(file, *args, **kwargs)

        return recording


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    probe_dir = tmp_path / "modules"
    probe_dir.mkdir()
    marker = tmp_path / "imported.txt"
    (probe_dir / f"{PROBE}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Probe: pass\n")
    monkeypatch.syspath_prepend(str(probe_dir))
    rec = Recorder([])
    monkeypatch.setattr(builtins, "open", rec.wrap(builtins.open))
    monkeypatch.setattr(io, "open", rec.wrap(io.open))
    monkeypatch.setattr(os, "open", rec.wrap(os.open))
    sys.meta_path.insert(0, rec)
    try:
        yield rec
    finally:
        sys.meta_path.remove(rec)
    assert PROBE not in sys.modules and not marker.exists()


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_rewrite_never_opens_paths_or_imports_modules_named_in_the_net(tmp_path: Path, recorder: Recorder) -> None:
    layers, paths = hostile_layers(tmp_path)
    recorder.forbidden = {os.path.realpath(p) for p in paths}
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET + layers)
    graph = graph_from_text(NET, seed=1)
    _, weights = save(graph, tmp_path, "weights")
    recorder.opened.clear()
    out = tmp_path / "out.prototxt"
    result = cli("rewrite", str(proto), str(out), "--weights", weights, "--out-weights", str(tmp_path / "o.caffemodel"),
                 "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    result = cli("inspect", str(proto), "--weights", weights)
    assert result.exit_code == 0, result.output
    # the batch worker's own code path (the worker process runs exactly this function)
    task = ModelTask(FoundModel("net.prototxt", "weights.caffemodel", "deploy"), str(tmp_path), str(tmp_path),
                     str(tmp_path / "staging"), BatchOptions(check=2))
    (tmp_path / "staging").mkdir()
    row = rewrite_model(task)
    assert row.status == "ok" and row.check.startswith("skipped: layers Caffe would have to read files or run code")
    opened = set(recorder.opened)
    assert opened, "the recorder saw nothing: is it wired in?"
    assert not opened & recorder.forbidden
    assert all(not name.startswith(str(tmp_path / "modules")) for name in opened)
    assert PROBE not in recorder.imports
    # the layers themselves are kept as written
    written = {layer.name: layer for layer in caffe_io.read_prototxt(out).layer}
    assert written["lmdb"].data_param.source == paths[0]
    assert written["py"].python_param.module == PROBE


def test_check_refuses_to_run_nets_that_name_files_or_modules(tmp_path: Path, recorder: Recorder) -> None:
    # --check runs the net in real Caffe, which would open those files and import that module: refused up front
    text = NET + f'layer {{ name: "py" type: "Python" bottom: "fc" top: "py" python_param {{ module: "{PROBE}" }} }}\n'
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    _, weights = save(graph_from_text(NET, seed=1), tmp_path, "weights")
    result = cli("rewrite", str(proto), str(tmp_path / "o.prototxt"), "--weights", weights, "--out-weights",
                 str(tmp_path / "o.caffemodel"), "--check", "1")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "checking would make Caffe open files or import code named in the net: 'py' (Python)" in result.stderr
    assert result.stderr.rstrip().endswith("(--check)")


def test_unknown_layer_types_pass_through_untouched_with_a_warning(tmp_path: Path) -> None:
    custom = ('layer { name: "mine" type: "MyFancyLayer" bottom: "fc" top: "fancy" '
              'python_param { param_str: "{\\"k\\": 3}" } }\n'
              'layer { name: "mine2" type: "MyFancyLayer" bottom: "fancy" top: "fancy2" }\n'
              'layer { name: "other" type: "Upsample" bottom: "fancy2" top: "up" }\n')
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET + custom)
    graph = graph_from_text(NET, seed=1)
    net = graph.to_net()
    net.layer.add(name="mine", type="MyFancyLayer")  # the unknown layer has weights of its own
    mine = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    caffe_io.write_caffemodel(tmp_path / "w.caffemodel", net, {**graph.weights(), "mine": mine})
    out, out_weights = tmp_path / "out.prototxt", tmp_path / "out.caffemodel"
    result = cli("rewrite", str(proto), str(out), "--weights", str(tmp_path / "w.caffemodel"), "--out-weights",
                 str(out_weights), "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: layer types this tool does not know, passed through untouched: "
                             "MyFancyLayer ('mine', 'mine2'); Upsample ('other')\n")
    assert "fuse_batchnorm_into_conv" in result.stdout  # the known part is still rewritten
    before = {layer.name: layer for layer in caffe_io.read_prototxt(proto).layer}
    after = {layer.name: layer for layer in caffe_io.read_prototxt(out).layer}
    for name in ("mine", "mine2", "other"):
        assert after[name] == before[name]
    assert np.array_equal(caffe_io.read_weights(out_weights)["mine"][0], np.arange(6).reshape(2, 3))
    assert json.loads((tmp_path / "report.json").read_text())["warnings"] == [result.stderr[len("warning: "):-1]]


# ---------------------------------------------------------------------------------------------------------------
# absurd settings and weights: one clear line each, exit 2, no output


@pytest.mark.parametrize("old,new,needles", [
    ("dim: 1 dim: 3 dim: 8 dim: 8", "dim: 100000 dim: 100000 dim: 1000 dim: 8", ("'data'", "blob size limit")),
    ("dim: 1 dim: 3 dim: 8 dim: 8", "dim: 1 dim: -3 dim: 8 dim: 8", ("'data'", "non-positive")),
    ("dim: 1 dim: 3 dim: 8 dim: 8", "dim: 1 dim: 3 dim: 0 dim: 8", ("'data'", "non-positive")),
    ("num_output: 4 kernel_size: 3", "num_output: 0 kernel_size: 3", ("'conv'", "num_output must be positive")),
    ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 0", ("'conv'", "kernel, stride and dilation")),
    ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 3 stride: 0", ("'conv'", "must be positive")),
    ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 3 group: 1000000",
     ("'conv'", "group 1000000 does not divide channels 3")),
    ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 3 group: 0", ("'conv'", "group 0 does not divide")),
    ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 3 dilation: 100", ("'conv'", "non-positive")),
    ("num_output: 4 kernel_size: 3", "num_output: 4000000000 kernel_size: 3", ("'conv'", "blob size limit")),
    ("num_output: 3 }", "num_output: 4294967295 }", ("'fc'", "blob size limit")),
    ("num_output: 3 }", "num_output: 3 axis: 9 }", ("'fc'", "axis 9 out of range")),
    ('top: "fc" inner', 'top: "fc" top: "fc2" inner', ("'fc'", "InnerProduct produces 1 tops, 2 listed")),
])
def test_absurd_settings_give_one_clear_error(old: str, new: str, needles: tuple[str, ...], tmp_path: Path) -> None:
    assert old in NET
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET.replace(old, new))
    result = cli("rewrite", str(proto), str(tmp_path / "out.prototxt"))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {proto}: layer ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


def weights_with(tmp_path: Path, change: Any) -> str:
    graph = graph_from_text(NET, seed=1)
    change(graph)
    net = graph.to_net()
    path = tmp_path / "w.caffemodel"
    caffe_io.write_caffemodel(path, net, {layer.name: list(layer.blobs) for layer in graph.layers() if layer.blobs})
    return str(path)


def _set(name: str, blobs: Any) -> Any:
    def change(graph: Any) -> None:
        graph.layer(name).blobs = blobs(graph.layer(name).blobs)
    return change


@pytest.mark.parametrize("change,needles", [
    (_set("conv", lambda b: [np.where(np.arange(b[0].size).reshape(b[0].shape) == 5, np.nan, b[0]), b[1]]),
     ("w.caffemodel", "layer 'conv'", "weight blob 0 holds NaN or Inf values")),
    (_set("fc", lambda b: [b[0], np.full_like(b[1], np.inf)]), ("layer 'fc'", "weight blob 1 holds NaN or Inf")),
    (_set("bn", lambda b: b[:2]), ("layer 'bn'", "expected 3 weight blobs, found 2")),
    (_set("conv", lambda b: [*b, b[1]]), ("layer 'conv'", "expected 2 weight blobs, found 3")),
    (_set("fc", lambda b: [b[0][:, :5], b[1]]), ("layer 'fc'", "weight blob 0 has shape (3, 5), expected (3, 144)")),
])
def test_bad_weights_give_one_clear_error(change: Any, needles: tuple[str, ...], tmp_path: Path) -> None:
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET)
    weights = weights_with(tmp_path, change)
    result = cli("rewrite", str(proto), str(tmp_path / "o.prototxt"), "--weights", weights, "--out-weights",
                 str(tmp_path / "o.caffemodel"))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "o.prototxt").exists() and not (tmp_path / "o.caffemodel").exists()


def test_module_probe_is_importable_outside_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The import probe works (so its silence above means something): importing it does write the marker."""
    (tmp_path / f"{PROBE}.py").write_text(f"open({str(tmp_path / 'imported.txt')!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module: ModuleType = __import__(PROBE)
    try:
        assert (tmp_path / "imported.txt").exists()
    finally:
        sys.modules.pop(module.__name__, None)
