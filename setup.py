"""Packaging. Beyond setup.cfg: compile proto/caffe.proto into deeprebirth/caffe_pb2.py, and require the protobuf
runtime that the generated module needs."""

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "caffe.proto"
GENERATED = HERE / "deeprebirth" / "caffe_pb2.py"
# protoc from 26 on stamps its version into the module, which then refuses an older runtime (and warns under a
# newer major version); older protoc (3.20 and up) writes code that any protobuf from 3.20 on imports
STAMP = re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)")


def protoc_command() -> list[str]:
    """grpcio-tools' protoc (pyproject.toml's build requirement, so the same compiler on every platform) where it
    imports, else a system protoc (a build without isolation, e.g. `pip install --no-build-isolation`)."""
    try:
        import grpc_tools.protoc  # noqa: F401
    except ImportError:
        protoc = shutil.which("protoc")
        if protoc is None:
            raise SystemExit("no protobuf compiler: `pip install grpcio-tools` (pyproject.toml's build requirement) "
                             "or Debian's protobuf-compiler") from None
        return [protoc]
    return [sys.executable, "-m", "grpc_tools.protoc"]


def compile_proto() -> None:
    """Regenerate the schema module when it is missing or older than the .proto (an sdist ships both, newest last)."""
    if GENERATED.exists() and (not PROTO.exists() or GENERATED.stat().st_mtime >= PROTO.stat().st_mtime):
        return
    subprocess.run([*protoc_command(), f"-I{PROTO.parent}", f"--python_out={GENERATED.parent}",
                    f"--pyi_out={GENERATED.parent}", PROTO.name],
                   cwd=PROTO.parent, check=True)


def install_requires() -> list[str]:
    """setup.cfg's requirements, protobuf's floor raised to what the generated module was compiled for."""
    config = configparser.ConfigParser()
    config.read(HERE / "setup.cfg")
    declared = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    stamp = STAMP.search(GENERATED.read_text())
    if stamp is None:
        return declared
    major, minor, patch = (int(part) for part in stamp.groups())
    needed = f"protobuf>={major}.{minor}.{patch},<{major + 1}"
    return [needed if re.match(r"protobuf\b", line) else line for line in declared]


compile_proto()
setup(install_requires=install_requires())
