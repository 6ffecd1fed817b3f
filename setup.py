"""Packaging. The one thing beyond setup.cfg: compile proto/caffe.proto into deeprebirth/caffe_pb2.py."""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "caffe.proto"
GENERATED = HERE / "deeprebirth" / "caffe_pb2.py"


def compile_proto() -> None:
    """Regenerate the schema module when it is missing or older than the .proto (needs Debian's protoc)."""
    if GENERATED.exists() and GENERATED.stat().st_mtime >= PROTO.stat().st_mtime:
        return
    protoc = shutil.which("protoc")
    if protoc is None:
        raise SystemExit("protoc not found: install Debian's protobuf-compiler (make install does)")
    subprocess.run([protoc, f"-I{PROTO.parent}", f"--python_out={GENERATED.parent}", f"--pyi_out={GENERATED.parent}",
                    PROTO.name],
                   cwd=PROTO.parent, check=True)


compile_proto()
setup()
