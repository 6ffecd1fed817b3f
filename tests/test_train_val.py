"""train_val in -> train_val out: both phases' layers kept in place, the rules fire as on the deploy net (data-layer
shapes from --input-shape or the LMDB), and real Caffe loads and runs the output in TRAIN and TEST phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from nets import squeezenet_v10

from deeprebirth import caffe_pb2 as pb
from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io

ZOO = (("bvlc_googlenet", 224), ("bvlc_alexnet", 227), ("bvlc_reference_caffenet", 227))
SMALL_FIRES = ((4, 8), (4, 8), (6, 12), (6, 12), (8, 16), (8, 16), (8, 16), (8, 16))

# Runs in a child process: a Caffe that cannot open a data source aborts its whole process.
RUN_BOTH_PHASES = """
import json, os, sys
os.environ["GLOG_minloglevel"] = "2"
import caffe
caffe.set_mode_cpu()
out = {}
for phase in ("TRAIN", "TEST"):
    net = caffe.Net(sys.argv[1], getattr(caffe, phase))
    result = net.forward()
    out[phase] = {name: float(value.reshape(-1)[0]) for name, value in result.items()}
    del net  # Caffe shares one reader thread per (layer name, source): a live TRAIN net would starve the TEST one
print(json.dumps(out))
"""


def write_lmdb(folder: Path, count: int, shape: tuple[int, int, int], seed: int = 0, classes: int = 10) -> str:
    """An LMDB of ``count`` raw uint8 Datums of ``shape`` (C, H, W), as convert_imageset writes them."""
    import lmdb

    rng = np.random.default_rng(seed)
    env = lmdb.open(str(folder), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i in range(count):
            datum = pb.Datum(channels=shape[0], height=shape[1], width=shape[2], label=int(i % classes),
                             data=rng.integers(0, 256, shape, dtype=np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return str(folder)


def run_in_caffe(prototxt: Path) -> dict[str, dict[str, float]]:
    done = subprocess.run([sys.executable, "-c", RUN_BOTH_PHASES, str(prototxt)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def point_data_layers_at(prototxt: Path, source: str, out: Path) -> None:
    """The written train_val with every data layer reading ``source``, one image a batch, mean values only."""
    net = caffe_io.read_prototxt(prototxt)
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = source
            layer.data_param.batch_size = 1
            if layer.transform_param.HasField("mean_file"):
                layer.transform_param.ClearField("mean_file")
                layer.transform_param.mean_value.extend([104, 117, 123])
    caffe_io.write_prototxt(out, net)


def phase_layers(net: pb.NetParameter) -> list[tuple[str, str, str]]:
    """(name, type, text of include/exclude, transform and data settings) of every phase-specific layer."""
    rows = []
    for layer in net.layer:
        if layer.include or layer.exclude:
            settings = pb.LayerParameter()
            settings.include.extend(layer.include)
            settings.exclude.extend(layer.exclude)
            settings.transform_param.CopyFrom(layer.transform_param)
            settings.data_param.CopyFrom(layer.data_param)
            rows.append((layer.name, layer.type, str(settings)))
    return rows


def summaries(report: object, skip: tuple[str, ...] = ("eliminate_dropout",)) -> list[tuple[str, str]]:
    return sorted((c.rule, c.summary) for c in report.changes if c.rule not in skip)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("name, size", ZOO)
def test_zoo_train_val_keeps_both_phases_and_fires_as_the_deploy_net(model_zoo: Path, tmp_path: Path, name: str,
                                                                     size: int) -> None:
    folder = model_zoo / name
    deploy = rewrite_files(folder / "deploy.prototxt", tmp_path / "deploy.prototxt").report
    out = tmp_path / "train_val.prototxt"
    options = RewriteOptions(input_shapes={"data": (10, 3, size, size)})
    report = rewrite_files(folder / "train_val.prototxt", out, options=options).report
    assert summaries(report) == summaries(deploy) and summaries(report)
    assert report.relearn == deploy.relearn and not [w for w in report.warnings if "shapes of" in w]
    assert not [c for c in report.changes if c.rule == "eliminate_dropout"]  # kept for training
    original, written = caffe_io.read_prototxt(folder / "train_val.prototxt"), caffe_io.read_prototxt(out)
    assert phase_layers(written) == phase_layers(original)
    losses = [(layer.name, list(layer.loss_weight)) for layer in original.layer if "Loss" in layer.type]
    assert [(layer.name, list(layer.loss_weight)) for layer in written.layer if "Loss" in layer.type] == losses
    assert len(losses) == (3 if name == "bvlc_googlenet" else 1)
    assert [layer.name for layer in written.layer[:2]] == ["data", "data"]  # TRAIN then TEST, where they were

    lmdb_path = write_lmdb(tmp_path / "lmdb", 2, (3, size + 8, size + 8))
    point_data_layers_at(out, lmdb_path, tmp_path / "runnable.prototxt")
    results = run_in_caffe(tmp_path / "runnable.prototxt")
    loss_tops = {layer.top[0] for layer in original.layer if "Loss" in layer.type}
    accuracy_tops = {layer.top[0] for layer in original.layer if layer.type == "Accuracy"}
    assert set(results["TRAIN"]) == loss_tops and set(results["TEST"]) == loss_tops | accuracy_tops
    assert all(np.isfinite(v) for phase in results.values() for v in phase.values())


def squeezenet_files(tmp_path: Path, with_lmdb: bool) -> Path:
    prefix = tmp_path / "sq"
    if with_lmdb:
        for suffix in ("train", "val"):
            write_lmdb(Path(f"{prefix}_{suffix}"), 6, (3, 72, 72))
    path = tmp_path / "train_val.prototxt"
    path.write_text(squeezenet_v10(size=64, classes=10, fires=SMALL_FIRES, conv1=16, train_val=str(prefix)))
    return path


def test_squeezenet_train_val_with_shapes_from_its_lmdb(tmp_path: Path) -> None:
    deploy_path = tmp_path / "deploy.prototxt"
    deploy_path.write_text(squeezenet_v10(size=64, classes=10, fires=SMALL_FIRES, conv1=16, batch=2))
    deploy = rewrite_files(deploy_path, tmp_path / "deploy_out.prototxt").report
    train_val = squeezenet_files(tmp_path, with_lmdb=True)
    out = tmp_path / "out.prototxt"
    report = rewrite_files(train_val, out, report_path=tmp_path / "report.json").report
    assert not [w for w in report.warnings if "shapes of" in w]
    assert summaries(report) == summaries(deploy)
    rules = {c.rule for c in report.changes}
    assert {"merge_pooling_into_conv", "merge_pooling_into_widened_branch_convs"} <= rules
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["relearn"] == deploy.relearn and "fire4/expand1x1_merge" in saved["relearn"]
    written = caffe_io.read_prototxt(out)
    assert phase_layers(written) == phase_layers(caffe_io.read_prototxt(train_val))
    assert [layer.name for layer in written.layer][-3:] == ["loss", "accuracy", "accuracy_top5"]
    results = run_in_caffe(out)  # the net's own LMDBs, as written
    assert set(results["TRAIN"]) == {"loss"} and set(results["TEST"]) == {"accuracy", "accuracy_top5"}
    assert np.isfinite(results["TRAIN"]["loss"]) and 0 <= results["TEST"]["accuracy"] <= 1


def test_the_train_phase_view(tmp_path: Path) -> None:
    train_val = squeezenet_files(tmp_path, with_lmdb=True)
    out = tmp_path / "out.prototxt"
    report = rewrite_files(train_val, out, options=RewriteOptions(phase="TRAIN")).report
    assert report.before.output_shapes == {"loss": []}  # the rules saw the TRAIN graph
    assert "merge_pooling_into_widened_branch_convs" in {c.rule for c in report.changes}
    written = caffe_io.read_prototxt(out)
    assert phase_layers(written) == phase_layers(caffe_io.read_prototxt(train_val))


def test_without_a_shape_one_line_says_which_and_how(tmp_path: Path) -> None:
    train_val = squeezenet_files(tmp_path, with_lmdb=False)
    result = CliRunner().invoke(main, ["rewrite", str(train_val), str(tmp_path / "out.prototxt")])
    assert result.exit_code == 0, result.stderr
    [line] = [w for w in result.stderr.splitlines() if "shapes of" in w]
    assert line.startswith("warning: shapes of Data layer 'data' unknown (its LMDB ")
    assert "does not exist here): give the input shape data:N,C,H,W" in line
    assert "Dropout kept for training (drop9)" in result.stderr
    result = CliRunner().invoke(main, ["rewrite", str(train_val), str(tmp_path / "out2.prototxt"),
                                       "--input-shape", "data:2,3,64,64", "--rules", "all,eliminate_dropout"])
    assert result.exit_code == 0 and "shapes of" not in result.stderr and "Dropout" not in result.stderr
    assert "merged Pooling 'pool4'" in result.stdout
    assert "Dropout" not in {layer.type for layer in caffe_io.read_prototxt(tmp_path / "out2.prototxt").layer}


@pytest.mark.parametrize("value, needle", [("data:2,3,x,64", "expected BLOB:N,C,H,W"), ("2,3,64,64", "expected"),
                                           ("data:0,3,64,64", "positive"), ("image:2,3,64,64", "'image'")])
def test_bad_input_shapes_are_one_line_errors(tmp_path: Path, value: str, needle: str) -> None:
    train_val = squeezenet_files(tmp_path, with_lmdb=False)
    result = CliRunner().invoke(main, ["rewrite", str(train_val), str(tmp_path / "out.prototxt"),
                                       "--input-shape", value])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr


def test_data_layer_shapes_from_an_encoded_lmdb_and_a_crop(tmp_path: Path) -> None:
    import cv2
    import lmdb

    image = np.zeros((40, 50, 3), dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "enc"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", pb.Datum(encoded=True, data=cv2.imencode(".png", image)[1].tobytes()).SerializeToString())
    env.close()
    param = pb.LayerParameter(name="d", type="Data", top=["data", "label"])
    param.data_param.source, param.data_param.batch_size = "enc", 5
    assert "is a LevelDB" in caffe_io.data_layer_shapes(param, {}, tmp_path)[1]  # Caffe's default backend
    param.data_param.backend = pb.DataParameter.LMDB
    assert caffe_io.data_layer_shapes(param, {}, tmp_path) == ([(5, 3, 40, 50), (5,)], "")
    param.transform_param.crop_size = 32
    assert caffe_io.data_layer_shapes(param, {}, tmp_path)[0] == [(5, 3, 32, 32), (5,)]
    param.transform_param.crop_size = 45
    assert "larger than its images" in caffe_io.data_layer_shapes(param, {}, tmp_path)[1]
    assert caffe_io.data_layer_shapes(param, {"data": (1, 3, 8, 8)}, None)[0] == [(1, 3, 8, 8), (1,)]
    with pytest.raises(DeepRebirthError):
        caffe_io.parse_input_shape("data:")


def test_a_blob_the_other_phase_reads_is_not_merged_away(tmp_path: Path) -> None:
    text = squeezenet_v10(size=64, classes=10, fires=SMALL_FIRES, conv1=16, train_val=str(tmp_path / "none"))
    text = text.replace('layer { name: "pool1"', 'layer { name: "watch" type: "Silence" bottom: "conv1" '
                        'include { phase: TRAIN } }\nlayer { name: "pool1"', 1)
    (tmp_path / "tv.prototxt").write_text(text)
    report = rewrite_files(tmp_path / "tv.prototxt", tmp_path / "out.prototxt",
                           options=RewriteOptions(input_shapes={"data": (2, 3, 64, 64)})).report
    assert "merge_pooling_into_conv" not in {c.rule for c in report.changes}
    assert any(s.layer == "pool1" for s in report.skipped["merge_pooling_into_conv"])
    written = [layer.name for layer in caffe_io.read_prototxt(tmp_path / "out.prototxt").layer]
    assert written.index("conv1") < written.index("watch") < written.index("pool1")
