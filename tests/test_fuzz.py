"""Mutation fuzzing of prototxt text and caffemodel bytes (a CI-sized run of benchmarks/fuzz.py), and one regression
test per crash the fuzzer and the property tests found.

The contract, checked by ``fuzzing.harness.run_case`` through the real CLI: every input ends in outputs that load again, or
in exit code 2 with one ``error: ...`` line and no output file; never a traceback, exit 3, a hang or a stray file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from fuzzing.harness import fuzz, run_case
from fuzzing.mutators import Case
from helpers import graph_from_text, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.io import caffemodel
from deeprebirth.rewrite import rewrite, select_rules

GOOD = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
"""


def test_mutated_prototxts_and_caffemodels_end_in_a_result_or_one_clean_error(tmp_path: Path) -> None:
    stats = fuzz(400, tmp_path, seed=2024, seeds=6)
    crashes = "\n".join(f"{outcome.detail}  <- {case.mutations}" for case, outcome in stats.crash_cases)
    assert stats.crashes == 0, crashes
    assert stats.cases == 400 and stats.ok > 20 and stats.errors > 200  # the fuzz reaches both ends
    assert len(stats.error_kinds) > 20  # and many different checks


# ---------------------------------------------------------------------------------------------------------------
# regressions: each was a traceback (or a silent bad output) before its fix


def case_error(tmp_path: Path, prototxt: str | bytes, caffemodel: bytes | None = None) -> str:
    """Run one input through the CLI; it must end in one clean error line, which is returned."""
    data = prototxt.encode() if isinstance(prototxt, str) else prototxt
    outcome = run_case(Case(data, caffemodel, [], 0), tmp_path / "case")
    assert outcome.kind == "error", outcome
    return outcome.message


def good_caffemodel(tmp_path: Path) -> bytes:
    return Path(save(graph_from_text(GOOD, seed=1), tmp_path, "good")[1]).read_bytes()


def test_a_top_listed_twice_in_one_layer(tmp_path: Path) -> None:
    # graph.py: KeyError while naming the "earlier producer" of a top this same layer had just listed
    text = GOOD.replace('top: "data" input_param', 'top: "data" top: "data" input_param')
    assert "layer 'data': top blob 'data' listed twice" in case_error(tmp_path, text)


def test_packed_floats_that_are_not_whole_floats(tmp_path: Path) -> None:
    # caffemodel._decode_blob: numpy's ValueError from frombuffer on 3 bytes of "float" data
    k, v = caffemodel._key, caffemodel._encode_varint
    blob = k(5, 2) + v(3) + b"\x00\x00\x80"
    layer = k(1, 2) + v(4) + b"conv" + k(7, 2) + v(len(blob)) + blob
    model = k(100, 2) + v(len(layer)) + layer
    assert "not a valid caffemodel (packed float data of 3 bytes)" in case_error(tmp_path, GOOD, model)


def test_a_blob_dim_beyond_int64(tmp_path: Path) -> None:
    # caffemodel._decode_blob: np.prod(..., dtype=int64) overflowed on a corrupt dim of 2**64 - 1
    k, v = caffemodel._key, caffemodel._encode_varint
    dims = v(2**64 - 1) + v(2)
    blob = k(7, 2) + v(len(dims) + 2) + k(1, 2) + v(len(dims)) + dims + k(5, 2) + v(8) + b"\x00" * 8
    layer = k(1, 2) + v(4) + b"conv" + k(7, 2) + v(len(blob)) + blob
    model = k(100, 2) + v(len(layer)) + layer
    assert "does not match its 2 values" in case_error(tmp_path, GOOD, model)


def test_a_net_without_layers(tmp_path: Path) -> None:
    # written as a caffemodel without layers, which nothing (deeprebirth included) could read back
    assert "the net has no layers" in case_error(tmp_path, 'name: "random"\n', good_caffemodel(tmp_path))


def test_weights_inside_the_prototxt_with_a_wrong_shape(tmp_path: Path) -> None:
    # graph.py / caffe_io.blob_to_array: numpy's ValueError from reshape
    text = GOOD.replace('layer { name: "fc"', 'layer { blobs { shape { dim: 2 } data: 1 } name: "fc"')
    message = case_error(tmp_path, text)
    assert "layer 'fc': weights inside the prototxt: blob shape (2,) does not match its 1 values" in message


def test_doubles_beyond_float32_range(tmp_path: Path) -> None:
    # numpy's RuntimeWarning (a second stderr line) when casting 1e300 to float32; now Inf, reported by layer
    net = pb.NetParameter()
    net.ParseFromString(good_caffemodel(tmp_path))
    blob = next(layer for layer in net.layer if layer.name == "fc").blobs[1]
    blob.double_data.extend([1e300] + list(blob.data)[1:])
    blob.ClearField("data")
    message = case_error(tmp_path, GOOD, net.SerializeToString())
    assert "layer 'fc': weight blob 1 holds NaN or Inf values" in message


def test_a_fold_that_overflows(tmp_path: Path) -> None:
    # BatchNorm variance below -eps: sqrt of a negative number gave a RuntimeWarning and NaN weights were written
    graph = graph_from_text(GOOD, seed=1)
    bn = graph.layer("bn")
    assert bn.blobs is not None
    bn.blobs = [bn.blobs[0], np.full_like(bn.blobs[1], -5.0), bn.blobs[2]]
    model = Path(save(graph, tmp_path, "m")[1]).read_bytes()
    message = case_error(tmp_path, GOOD, model)
    assert "layer 'conv': fuse_batchnorm_into_conv would give weight blob 0 NaN or Inf values" in message


def test_errors_stay_one_line_whatever_the_file_holds(tmp_path: Path) -> None:
    # a parse error quoting a token that spans lines, and a layer name with a newline in it
    text = GOOD.replace('name: "fc"', 'name: "f\\nc"').replace('bottom: "conv" top: "fc"', 'bottom: "nowhere"')
    assert "layer 'f\\nc'" in case_error(tmp_path, text)
    assert "layer 'f\\u2028c'" in case_error(tmp_path, text.replace("\\n", "\u2028"))


# ---------------------------------------------------------------------------------------------------------------
# found by the property tests in eliminate_dropout: a Dropout whose output is a net output is kept when its input
# cannot take over the output's name


DROPOUT_ON_SHARED_BLOB = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "out" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "r" }
"""
DROPOUT_ON_INPUT = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "out" }
"""


def test_eliminate_dropout_keeps_a_net_output_whose_input_has_other_readers() -> None:
    graph = graph_from_text(DROPOUT_ON_SHARED_BLOB)
    report = rewrite(graph, select_rules("exact"))
    assert report.after is not None and report.after.output_shapes == report.before.output_shapes


def test_eliminate_dropout_keeps_the_input_name() -> None:
    graph = graph_from_text(DROPOUT_ON_INPUT)
    rewrite(graph, select_rules("exact"))
    assert [graph.caffe_name(b) for b in graph.inputs()] == ["data"]


def test_a_second_top_on_a_one_top_layer(tmp_path: Path) -> None:
    # shapes.py accepted a Scale with two tops (Caffe: exactly one); fuse_scale_into_conv then removed it while its
    # second top was still read: exit 3, "internal error"
    text = GOOD.replace('layer { name: "fc" type: "InnerProduct" bottom: "conv"',
                        'layer { name: "scale" type: "Scale" bottom: "conv" top: "extra" top: "s" }\n'
                        'layer { name: "fc" type: "InnerProduct" bottom: "s"')
    graph = graph_from_text(GOOD, seed=1)
    model = Path(save(graph, tmp_path, "m")[1]).read_bytes()
    assert "layer 'scale': Scale: takes one top, 2 given" in case_error(tmp_path, text, model)
    two_tops = GOOD.replace('top: "conv" convolution_param', 'top: "conv" top: "conv2" convolution_param')
    assert "layer 'conv': Convolution: 1 bottoms of shapes" in case_error(tmp_path, two_tops, model)


def test_a_signalling_nan_among_doubles(tmp_path: Path) -> None:
    # numpy's "invalid value encountered in cast" RuntimeWarning (a second stderr line) for a signalling NaN in
    # double_data (found by seed 22 of benchmarks/fuzz.py); now it is a NaN like any other, reported by layer
    net = pb.NetParameter()
    net.ParseFromString(good_caffemodel(tmp_path))
    fc = next(layer for layer in net.layer if layer.name == "fc")
    del fc.blobs[1:]
    k, v = caffemodel._key, caffemodel._encode_varint
    doubles = struct.pack("<d", 0.5) + (0x7FF320000000BF71).to_bytes(8, "little") + struct.pack("<d", 0.25)
    shape = k(1, 2) + v(1) + v(3)
    blob = k(7, 2) + v(len(shape)) + shape + k(8, 2) + v(len(doubles)) + doubles
    model = net.SerializeToString()
    layer_bytes = fc.SerializeToString() + k(7, 2) + v(len(blob)) + blob  # fc's bias blob, written by hand
    model += k(100, 2) + v(len(layer_bytes)) + layer_bytes  # a second "fc" entry: the last one wins by name
    assert "layer 'fc': weight blob 1 holds NaN or Inf values" in case_error(tmp_path, GOOD, model)
