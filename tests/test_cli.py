"""The command line as a user meets it: exit codes, one-line errors that name file/layer/problem, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.cli import main

GOOD = """name: "small"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, str]:
    return save(graph_from_text(GOOD, seed=1), tmp_path, "in")


def outputs_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_rewrite_ok_with_check(model: tuple[str, str], tmp_path: Path) -> None:
    proto, weights = model
    code, out, err = run("rewrite", proto, str(tmp_path / "out.prototxt"), "--weights", weights,
                         "--out-weights", str(tmp_path / "out.caffemodel"), "--check", "3",
                         "--report", str(tmp_path / "report.json"))
    assert code == 0, err
    assert "check PASSED on 3 inputs" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["before"]["layers"] == 7 and report["after"]["layers"] == 5
    assert report["check"]["passed"] is True and report["check"]["blobs"][0]["max_rel"] <= 1e-5


def test_rewrite_without_weights_writes_only_the_prototxt(model: tuple[str, str], tmp_path: Path) -> None:
    proto, _ = model
    code, out, err = run("rewrite", proto, str(tmp_path / "out.prototxt"), "--rules", "exact")
    assert code == 0, err
    assert "no weights" in out
    assert outputs_in(tmp_path) == {"in.prototxt", "in.caffemodel", "out.prototxt"}


def test_malformed_prototxt_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  botom: "data"\n}\n')
    code, _, err = run("rewrite", str(bad), str(tmp_path / "out.prototxt"))
    assert_one_line_error(code, err, f"{bad}:5:", "botom")
    assert outputs_in(tmp_path) == {"bad.prototxt"}


def test_binary_file_as_prototxt(model: tuple[str, str], tmp_path: Path) -> None:
    _, weights = model
    code, _, err = run("inspect", weights)
    assert_one_line_error(code, err, weights)


def test_missing_layer_in_caffemodel(model: tuple[str, str], tmp_path: Path) -> None:
    proto, _ = model
    other = save(graph_from_text(GOOD.replace('name: "fc"', 'name: "fc_other"'), seed=1), tmp_path, "other")[1]
    out = tmp_path / "out.prototxt"
    code, _, err = run("rewrite", proto, str(out), "--weights", other, "--out-weights", str(tmp_path / "o.caffemodel"))
    assert_one_line_error(code, err, other, "layer 'fc'", "no weights")
    assert not out.exists()


def test_wrong_blob_shape_in_caffemodel(model: tuple[str, str], tmp_path: Path) -> None:
    proto, _ = model
    other = save(graph_from_text(GOOD.replace("num_output: 3", "num_output: 5"), seed=1), tmp_path, "other")[1]
    code, _, err = run("rewrite", proto, str(tmp_path / "out.prototxt"), "--weights", other)
    assert_one_line_error(code, err, "layer 'fc'", "shape (5, 144)", "expected (3, 144)")
    assert not (tmp_path / "out.prototxt").exists()


def test_wrong_blob_count_in_caffemodel(model: tuple[str, str], tmp_path: Path) -> None:
    proto, _ = model
    other = save(graph_from_text(GOOD.replace("num_output: 3 }", "num_output: 3 bias_term: false }"), seed=1),
                 tmp_path, "other")[1]
    code, _, err = run("inspect", proto, "--weights", other)
    assert_one_line_error(code, err, "layer 'fc'", "expected 2 weight blobs, found 1")


def test_corrupt_caffemodel(model: tuple[str, str], tmp_path: Path) -> None:
    proto, weights = model
    broken = tmp_path / "broken.caffemodel"
    broken.write_bytes(Path(weights).read_bytes()[:-100])
    code, _, err = run("rewrite", proto, str(tmp_path / "out.prototxt"), "--weights", str(broken))
    assert_one_line_error(code, err, str(broken), "not a valid caffemodel")
    assert not (tmp_path / "out.prototxt").exists()


@pytest.mark.parametrize("text,needles", [
    (GOOD.replace('layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"',
                  'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "conv2"'),
     ("layer 'prob'", "bottom blob 'fc' is not produced")),
    (GOOD.replace('top: "fc" inner', 'top: "data" inner'),
     ("layer 'fc'", "top blob 'data' is already produced by layer 'input'")),
    (GOOD.replace('name: "relu"', 'name: "conv"'), ("layer 'conv'", "duplicate layer name")),
    (GOOD.replace("kernel_size: 3", "kernel_size: 30"), ("layer 'conv'", "non-positive")),
    (GOOD.replace('layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }',
                  'layer { name: "bn" type: "BatchNorm" bottom: "fc" top: "fc" }'),
     ("layer 'bn'", "bottom blob 'fc' is not produced by any earlier layer")),  # a cycle in Caffe's order
])
def test_graph_errors_name_the_layer(text: str, needles: tuple[str, ...], tmp_path: Path) -> None:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    code, _, err = run("rewrite", str(path), str(tmp_path / "out.prototxt"))
    assert_one_line_error(code, err, str(path), *needles)
    assert outputs_in(tmp_path) == {"net.prototxt"}


def test_output_equal_to_input_is_refused(model: tuple[str, str], tmp_path: Path) -> None:
    proto, weights = model
    before = Path(proto).read_bytes(), Path(weights).read_bytes()
    code, _, err = run("rewrite", proto, proto)
    assert_one_line_error(code, err, "overwrite an input")
    code, _, err = run("rewrite", proto, str(tmp_path / "o.prototxt"), "--weights", weights, "--out-weights", weights)
    assert_one_line_error(code, err, "overwrite an input")
    assert (Path(proto).read_bytes(), Path(weights).read_bytes()) == before
    assert not (tmp_path / "o.prototxt").exists()


def test_unknown_rule(model: tuple[str, str], tmp_path: Path) -> None:
    code, _, err = run("rewrite", model[0], str(tmp_path / "o.prototxt"), "--rules", "fuse_everything")
    assert_one_line_error(code, err, "unknown rule or group 'fuse_everything'")


def test_library_errors_name_concepts_and_the_cli_adds_its_flags(model: tuple[str, str], tmp_path: Path) -> None:
    from deeprebirth.api import DeepRebirthError, rewrite_files

    with pytest.raises(DeepRebirthError) as raised:
        rewrite_files(model[0], tmp_path / "o.prototxt", out_weights=tmp_path / "o.caffemodel")
    assert "--" not in str(raised.value) and raised.value.options == ("out_weights", "weights")
    code, _, err = run("rewrite", model[0], str(tmp_path / "o.prototxt"), "--out-weights", str(tmp_path / "o.cm"))
    assert_one_line_error(code, err, f"{raised.value} (--out-weights, --weights)")
    code, _, err = run("rewrite", model[0], str(tmp_path / "o.prototxt"), "--skip", "nope")
    assert_one_line_error(code, err, "unknown rule or group 'nope' in the rules to skip (--skip)")
    code, _, err = run("export", *model, str(tmp_path / "net.tflite"))
    assert_one_line_error(code, err, "name the format (onnx, mnn, ncnn) or use .onnx, .mnn, .param (--to)")
    assert not list(tmp_path.glob("o.*"))


def test_missing_input_file(tmp_path: Path) -> None:
    code, _, err = run("rewrite", str(tmp_path / "nope.prototxt"), str(tmp_path / "o.prototxt"))
    assert_one_line_error(code, err, "nope.prototxt", "cannot read")


def test_check_failure_exits_1(model: tuple[str, str], tmp_path: Path) -> None:
    proto, weights = model
    code, out, _ = run("rewrite", proto, str(tmp_path / "out.prototxt"), "--weights", weights,
                       "--out-weights", str(tmp_path / "out.caffemodel"), "--check", "2", "--tolerance", "0")
    # folding changes float rounding, so a zero tolerance must fail the check (and say so)
    assert code == 1
    assert "check FAILED" in out


def test_inspect_lists_rules_and_reasons(model: tuple[str, str]) -> None:
    proto, weights = model
    code, out, err = run("inspect", proto, "--weights", weights)
    assert code == 0, err
    assert "fuse_batchnorm_into_conv: bn + conv" in out
    assert "total: 7 layers" in out
    code, out, _ = run("inspect", proto)
    assert "fuse_batchnorm_into_conv: bn: no weights" in out
