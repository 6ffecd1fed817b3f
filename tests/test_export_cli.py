"""`deeprebirth export` as a user meets it: formats, --check against real Caffe in ONNX Runtime / MNN / ncnn,
exit codes (0 ok, 1 check failed, 2 bad input or a runtime package missing), one-line errors, no partial output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import tiny_inception

from deeprebirth.cli import main
from deeprebirth.export import runtimes


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save(graph_from_text(tiny_inception(), seed=4), tmp_path_factory.mktemp("net"), "tiny")


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("to, out, files", [
    (None, "net.onnx", ["net.onnx"]),
    ("mnn", "net.mnn", ["net.mnn"]),
    ("ncnn", "net", ["net.param", "net.bin"]),
])
def test_export_and_check_in_each_runtime(to: str | None, out: str, files: list[str], model: tuple[str, str],
                                          photos: list[str], tmp_path: Path) -> None:
    args = ["export", *model, str(tmp_path / out), "--check", "2", "--images", photos[0]]
    code, stdout, err = run(*args, *(["--to", to] if to else []))
    assert code == 0, err
    assert "check PASSED on 3 inputs" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    if to == "ncnn":  # the Caffe blob names, not pnnx's in0/out0
        param = (tmp_path / "net.param").read_text()
        assert "Input data 0 1 data" in param and " prob " in param and "out0" not in param


def test_check_beyond_tolerance_exits_1(model: tuple[str, str], tmp_path: Path) -> None:
    code, stdout, err = run("export", *model, str(tmp_path / "net.mnn"), "--check", "1", "--tolerance", "1e-12")
    assert code == 1, err
    assert "check FAILED" in stdout


def test_unsupported_layer_named_no_output(tmp_path: Path) -> None:
    text = tiny_inception(extra='layer { name: "best" type: "ArgMax" bottom: "inception_3/output" top: "best" }\n')
    proto, weights = save(graph_from_text(text, seed=1), tmp_path, "argmax")
    code, _, err = run("export", proto, weights, str(tmp_path / "out.onnx"))
    assert_one_line_error(code, err, "layer 'best'", "ArgMax", "ONNX")
    assert not (tmp_path / "out.onnx").exists()
    code, _, err = run("export", proto, weights, str(tmp_path / "out"), "--to", "ncnn")
    assert_one_line_error(code, err, "layer 'best'", "ArgMax")
    assert not list(tmp_path.glob("out*"))


def test_missing_runtime_package_is_one_line(model: tuple[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("_tools", "ncnn") else real(name, *a))
    code, _, err = run("export", *model, str(tmp_path / "net.mnn"))
    assert_one_line_error(code, err, "MNN package is not installed", "deeprebirth[runtimes]")
    code, _, err = run("export", *model, str(tmp_path / "net.param"), "--check", "1")
    assert_one_line_error(code, err, "ncnn package is not installed")
    assert not list(tmp_path.iterdir())


def test_bad_requests(model: tuple[str, str], tmp_path: Path) -> None:
    code, _, err = run("export", *model, str(tmp_path / "net.tflite"))
    assert_one_line_error(code, err, "--to")
    code, _, err = run("export", *model, str(tmp_path / "n.param"), "--batch", "2")
    assert_one_line_error(code, err, "export with batch size 1 (--batch)")
    code, _, err = run("export", *model, model[1].replace(".caffemodel", ".onnx"), "--outputs", "nope")
    assert_one_line_error(code, err, "no blob named 'nope'")
    code, _, err = run("export", model[0], model[0], str(tmp_path / "x.onnx"))
    assert code == 2 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("runtime", ["onnxruntime", "mnn", "ncnn", "opencv"])
def test_profile_in_a_runtime_interleaved(runtime: str, model: tuple[str, str], tmp_path: Path) -> None:
    proto, weights = model
    report = tmp_path / "times.json"
    code, out, err = run("profile", proto, "--weights", weights, "--compare", proto, "--runtime", runtime,
                         "--rounds", "3", "--warmup", "1", "--json", str(report))
    assert code == 0, err
    assert f"speed-up before/after in {runtime}" in out
    payload = json.loads(report.read_text())
    assert payload["runtime"] == runtime and payload["threads"] == 1
    assert [len(net["times_ms"]) for net in payload["nets"]] == [3, 3]
    assert all(t > 0 for net in payload["nets"] for t in net["times_ms"])


def test_profile_runtime_without_weights_and_refusals(model: tuple[str, str], tmp_path: Path) -> None:
    code, out, err = run("profile", model[0], "--runtime", "onnxruntime", "--rounds", "1", "--warmup", "0")
    assert code == 0, err
    assert "random weights" in out
    code, _, err = run("profile", model[0], "--runtime", "mnn", "--plot", str(tmp_path / "p.png"))
    assert_one_line_error(code, err, "--plot needs --runtime caffe")


def test_model_the_runtime_refuses_is_one_line_and_no_output(model: tuple[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed\nsecond line")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    for out in ("net.onnx", "net.mnn"):  # MNN: the check's ONNX Runtime is not involved, so this one passes
        code, _, err = run("export", *model, str(tmp_path / out), "--check", "1")
        if out == "net.onnx":
            assert_one_line_error(code, err, "ONNX Runtime refused the model", "INVALID_GRAPH", "net.onnx")
            assert not list(tmp_path.iterdir())  # made and checked in a staging folder: nothing left behind
        else:
            assert code == 0, err
            assert [p.name for p in tmp_path.iterdir()] == ["net.mnn"]


def shadow_onnxruntime(folder: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``onnxruntime`` found before the real one by the timing worker (a spawned child: it starts with the
    parent's sys.path)."""
    (folder / "onnxruntime").mkdir(parents=True)
    (folder / "onnxruntime" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))


@pytest.mark.parametrize("body, message", [
    ("raise ImportError(\"No module named 'onnxruntime'\")\n", "onnxruntime package is not installed"),
    (("class SessionOptions:\n    pass\n\n\ndef InferenceSession(*args, **kwargs):\n"
      "    raise RuntimeError('INVALID_GRAPH : Load model failed')\n"), "ONNX Runtime refused the model"),
])
@pytest.mark.parametrize("compare", [False, True])
def test_profile_in_a_runtime_missing_or_refusing(body: str, message: str, compare: bool, model: tuple[str, str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shadow_onnxruntime(tmp_path / "shadow", body, monkeypatch)
    report = tmp_path / "times.json"
    args = ["profile", model[0], "--weights", model[1], "--runtime", "onnxruntime", "--rounds", "1",
            "--json", str(report), *(["--compare", model[0]] if compare else [])]
    code, out, err = run(*args)
    assert_one_line_error(code, err, message)
    assert not report.exists() and "ms" not in out  # no partial output, no numbers
