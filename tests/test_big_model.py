"""A ~550 MB caffemodel (VGG-16 + BatchNorm/Scale, random weights, generated here) rewrites in a child process with
peak memory <= 2.5x the file size, and no protobuf size limit gets in the way (benchmarks/big_model.py measures the
same thing at more length)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_script

from deeprebirth.io import caffe_io


@pytest.mark.slow
def test_a_550_mb_caffemodel_rewrites_within_2_5x_its_size(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert free > 2e9, f"{tmp_path} has {free / 1e9:.1f} GB free; this test writes ~1.2 GB (a 550 MB model, its rewrite)"
    big = load_script("benchmarks/big_model.py")
    proto, model = big.make_big_model(tmp_path)
    size = model.stat().st_size
    assert size > 500e6
    code = ("import sys\nfrom deeprebirth.api import RewriteOptions, rewrite_files\n"
            "rewrite_files(sys.argv[1], sys.argv[3] + '/out.prototxt', sys.argv[2], sys.argv[3] + '/out.caffemodel',"
            " sys.argv[3] + '/report.json', RewriteOptions(rules=sys.argv[4]))\n")
    # peak RSS of a child, by os.wait4 in a tiny launcher (a child forked from pytest itself would count pytest's RSS)
    _, peak_mib, _ = big.measure(code, proto, model, tmp_path, "all")
    assert peak_mib * 2**20 <= 2.5 * size, f"peak RSS {peak_mib:.0f} MiB for a {size / 2**20:.0f} MiB caffemodel"
    out_model, report = tmp_path / "out.caffemodel", tmp_path / "report.json"
    weights = caffe_io.read_weights(out_model)
    assert sum(b.size for blobs in weights.values() for b in blobs) >= 138_000_000
    data = json.loads(report.read_text())
    assert data["after"]["layers_by_type"].get("BatchNorm", 0) == 0
    assert any("512 MiB" in warning for warning in data["warnings"])
