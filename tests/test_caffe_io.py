"""Reading and writing Caffe files: round trips on every real prototxt, legacy forms, and agreement with Caffe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, run_caffe, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.io import caffe_io
from deeprebirth.ir.model import load_model, save_model

FIXTURES = Path(__file__).parent / "fixtures"


def zoo_prototxts(model_zoo: Path) -> list[Path]:
    return sorted(p for p in model_zoo.glob("*/*.prototxt") if "solver" not in p.name)


def roundtrip(path: str | Path, phase: str, tmp_path: Path) -> tuple[pb.NetParameter, pb.NetParameter]:
    graph = load_model(path, phase=phase)
    out = tmp_path / "roundtrip.prototxt"
    save_model(graph, out)
    again = load_model(out, phase=phase)
    return graph.to_net(), again.to_net()


def test_roundtrip_every_model_zoo_prototxt(model_zoo: Path, tmp_path: Path) -> None:
    paths = zoo_prototxts(model_zoo)
    assert len(paths) >= 9
    for path in paths:
        for phase in ("TEST", "TRAIN"):
            first, second = roundtrip(path, phase, tmp_path)
            assert first == second, f"{path} ({phase})"
            assert len(first.layer) > 5


def test_roundtrip_real_models(assets: dict[str, str], tmp_path: Path) -> None:
    for proto, model in (("open_nsfw.prototxt", "open_nsfw.caffemodel"), ("ssd_face.prototxt", "ssd_face.caffemodel")):
        graph = load_model(assets[proto], assets[model])
        save_model(graph, tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
        again = load_model(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
        assert graph.to_net() == again.to_net()
        for layer in graph.layers():
            other = again.layer(layer.name)
            assert (layer.blobs is None) == (other.blobs is None)
            for a, b in zip(layer.blobs or [], other.blobs or []):
                assert a.shape == b.shape and np.array_equal(a, b), layer.name


def test_caffemodel_with_training_layers_matches_by_name(assets: dict[str, str]) -> None:
    weights = caffe_io.read_weights(assets["open_nsfw.caffemodel"])
    graph = load_model(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"])
    learnable = [layer for layer in graph.layers() if layer.blobs]
    assert len(learnable) == 53 * 3 + 1  # conv, BN, Scale per block, one classifier
    assert set(weights) >= {layer.name for layer in learnable}
    bn = graph.layer("bn_1")
    assert bn.blobs is not None and float(bn.blobs[2][0]) == pytest.approx(999.98, rel=1e-4)


def test_legacy_4d_blob_shapes_are_reshaped(tmp_path: Path) -> None:
    graph = graph_from_text("""
        input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 4 kernel_size: 3 } }
        layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
    """)
    net = graph.to_net()
    for layer in net.layer:  # write every blob in the pre-2015 num/channels/height/width form
        for array in graph.layer(layer.name).blobs or []:
            blob = layer.blobs.add()
            dims = (1,) * (4 - array.ndim) + array.shape
            blob.num, blob.channels, blob.height, blob.width = dims
            blob.data.extend(array.ravel().tolist())
    legacy = tmp_path / "legacy.caffemodel"
    legacy.write_bytes(net.SerializeToString())
    (tmp_path / "net.prototxt").write_text(caffe_io.format_prototxt(graph.to_net()))
    loaded = load_model(tmp_path / "net.prototxt", legacy)
    for name in ("conv", "fc"):
        for ours, original in zip(loaded.layer(name).blobs or [], graph.layer(name).blobs or []):
            assert ours.shape == original.shape and np.array_equal(ours, original)
    # Caffe accepts the legacy file as well, and computes the same thing
    feed = input_feed(graph)
    a = run_caffe(str(tmp_path / "net.prototxt"), str(legacy), feed, ["fc"])
    proto, model = save(loaded, tmp_path, "modern")
    b = run_caffe(proto, model, feed, ["fc"])
    assert np.array_equal(a["fc"], b["fc"])


def test_caffemodel_written_by_us_loads_in_caffe_bit_exact(assets: dict[str, str], tmp_path: Path) -> None:
    import caffe  # noqa: F401  (pycaffe's own caffe_pb2 is loaded next to ours)
    from caffe.proto import caffe_pb2 as their_pb

    graph = load_model(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"])
    _, model = save(graph, tmp_path, "nsfw")
    theirs = their_pb.NetParameter()
    theirs.ParseFromString(Path(model).read_bytes())
    by_name = {layer.name: layer for layer in theirs.layer}
    conv = graph.layer("conv_1")
    assert conv.blobs is not None
    blob = by_name["conv_1"].blobs[0]
    assert tuple(blob.shape.dim) == conv.blobs[0].shape
    assert np.array_equal(np.asarray(blob.data, dtype=np.float32).reshape(conv.blobs[0].shape), conv.blobs[0])


def test_schema_coexists_with_pycaffe_in_one_process() -> None:
    import caffe  # noqa: F401
    from caffe.proto import caffe_pb2 as their_pb

    assert pb.NetParameter.DESCRIPTOR.full_name == "deeprebirth_caffe.NetParameter"
    assert their_pb.NetParameter.DESCRIPTOR.full_name == "caffe.NetParameter"
    ours = pb.NetParameter(name="x")
    ours.layer.add(name="conv", type="Convolution").convolution_param.num_output = 7
    theirs = their_pb.NetParameter()
    theirs.ParseFromString(ours.SerializeToString())
    assert theirs.layer[0].convolution_param.num_output == 7
    # BVLC's round_mode, not the fork's ceil_mode, is field 13 of our PoolingParameter
    assert pb.PoolingParameter.DESCRIPTOR.fields_by_number[13].name == "round_mode"
