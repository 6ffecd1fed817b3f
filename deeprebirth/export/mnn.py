"""Caffe -> MNN with the MNN wheel's own converter, called the safe way.

MNN's ``mnnconvert`` console script and ``MNN.tools`` pip-install a logging SDK and send telemetry when imported, so
neither is used: the converter's C extension ``_tools`` is called directly, in a child process (a converter crash
or abort cannot take the caller down, and its chatter stays out of our output). The converter reports failure only
in its printout ("Converted Failed!", "These Op Not Support: Caffe::X"), so success means: the file was written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import require_installed
from deeprebirth.io import caffe_io

_CONVERT = ("import sys, _tools; _tools.mnnconvert(['mnnconvert', '-f', 'CAFFE', '--prototxt', sys.argv[1], "
            "'--modelFile', sys.argv[2], '--MNNModel', sys.argv[3], '--bizCode', 'deeprebirth'])")


def caffe_to_mnn(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str],
                 out: str | os.PathLike[str]) -> None:
    """Convert a (prototxt, caffemodel) pair to ``out`` (.mnn), atomically; a refusal is a one-line error."""
    require_installed("_tools", "MNN")
    with tempfile.TemporaryDirectory(prefix="deeprebirth-mnn-") as tmp:
        target = Path(tmp) / "model.mnn"
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(prototxt), str(caffemodel), str(target)],
                              capture_output=True, text=True, check=False)
        if not target.is_file() or target.stat().st_size == 0:
            raise DeepRebirthError(f"MNN's converter refused the model: {_why(done.stdout + done.stderr)}",
                                   file=str(prototxt))
        caffe_io.atomic_write_bytes(out, target.read_bytes())


def _why(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "Not Support" in line or "rror" in line:
            return line.split("] ", 1)[-1].split(": ", 1)[-1] if "Not Support" in line else line
    return lines[-1] if lines else "no message (crashed?)"
