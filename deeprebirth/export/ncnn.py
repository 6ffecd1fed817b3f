"""ONNX -> ncnn with pnnx (ncnn's converter), run as its standalone binary.

pnnx is installed ``pip install --no-deps pnnx``: its Python entry point imports torch, the binary inside the package
does not. It converts in a scratch folder (it writes seven files next to its input); the ``.ncnn.param/.bin`` pair
is then renamed ``OUT.param/OUT.bin`` with the blob names pnnx invents (``in0``, ``out0``) replaced by the Caffe
input and output names, so an app feeds ``data`` and reads ``prob`` as in Caffe. Weights stay fp32 (``fp16=0``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deeprebirth.aliases import Shape
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import ncnn_files
from deeprebirth.io import caffe_io


def pnnx_binary() -> Path:
    spec = importlib.util.find_spec("pnnx")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        binary = Path(folder) / "pnnx"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    raise DeepRebirthError("the pnnx package is not installed (its binary converts ONNX to ncnn): "
                           "pip install --no-deps pnnx")


def onnx_to_ncnn(model_bytes: bytes, out: str | os.PathLike[str], inputs: dict[str, Shape],
                 outputs: Sequence[str]) -> tuple[str, str]:
    """Convert a serialized ONNX model to the ncnn pair ``OUT.param``/``OUT.bin``; returns their paths."""
    binary = pnnx_binary()
    if any(shape[0] != 1 for shape in inputs.values()):
        raise DeepRebirthError("ncnn runs one image at a time: export with batch size 1", options=("batch",))
    bad = [name for name in (*inputs, *outputs) if not name or any(c.isspace() for c in name)]
    if bad:
        raise DeepRebirthError(f"blob name {bad[0]!r} cannot be an ncnn blob name (it holds white space)")
    param, weights = ncnn_files(out)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-pnnx-") as tmp:
        source = Path(tmp) / "model.onnx"
        source.write_bytes(model_bytes)
        shapes = ",".join("[" + ",".join(map(str, shape)) + "]" for shape in inputs.values())
        done = subprocess.run([str(binary), source.name, f"inputshape={shapes}", "fp16=0"], cwd=tmp,
                              capture_output=True, text=True, check=False)
        made_param, made_bin = Path(tmp) / "model.ncnn.param", Path(tmp) / "model.ncnn.bin"
        if done.returncode != 0 or not made_param.is_file() or not made_bin.is_file():
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise DeepRebirthError(f"pnnx could not convert the model to ncnn: {why}")
        names = {f"in{i}": name for i, name in enumerate(inputs)} | {f"out{i}": name for i, name in enumerate(outputs)}
        text = rename_blobs(made_param.read_text(), names)
        caffe_io.atomic_write_bytes(weights, made_bin.read_bytes())
        caffe_io.atomic_write_bytes(param, text)
    return param, weights


def rename_blobs(param: str, names: dict[str, str]) -> str:
    """Replace whole blob-name tokens of an ncnn .param text (layer lines: type, name, counts, bottoms, tops)."""
    lines = param.splitlines()
    out = lines[:2]
    for line in lines[2:]:
        tokens = line.split()
        if len(tokens) < 4:
            out.append(line)
            continue
        blobs = int(tokens[2]) + int(tokens[3])
        head = [tokens[0], names.get(tokens[1], tokens[1]) if tokens[0] == "Input" else tokens[1], *tokens[2:4]]
        out.append(" ".join(head + [names.get(t, t) for t in tokens[4:4 + blobs]] + tokens[4 + blobs:]))
    return "\n".join(out) + "\n"
