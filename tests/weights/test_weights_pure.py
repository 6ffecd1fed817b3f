"""deeprebirth.weights stays pure weight math: importing it loads no graph, protobuf or Caffe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_importing_the_weights_package_loads_no_graph_protobuf_or_caffe() -> None:
    modules = sorted(p.stem for p in (Path(__file__).parents[2] / "deeprebirth" / "weights").glob("[a-z]*.py"))
    code = (f"import importlib, json, sys; [importlib.import_module('deeprebirth.weights.' + m) for m in {modules}]; "
            "print(json.dumps(sorted(m for m in sys.modules if m in ('caffe', 'scipy', 'networkx', 'google.protobuf', "
            "'deeprebirth.ir.graph', 'deeprebirth.caffe_pb2', 'deeprebirth.ir.shapes'))))")
    out = subprocess.check_output([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
    assert len(modules) == 6 and json.loads(out) == []
