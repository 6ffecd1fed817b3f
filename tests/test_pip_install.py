"""`pip install deeprebirth` on a machine without Caffe, end to end: the wheel is built by `python -m build` with no
protoc on PATH, installed into a fresh venv that cannot import pycaffe, and the commands a new user runs are run
there on real models: rewrite --check (open_nsfw's exact folds, the face detector), export --check, plan, profile.
The checks must really compare outputs in OpenCV dnn (tolerance 1e-4, worst error printed and in the report) and
must fail when one output weight is altered before the comparison. The same venv then runs the check in real Caffe
with the project's pycaffe build put on PYTHONPATH (a user's own Caffe), and finetune refuses without it.

Slow (about 95 s here: two venvs, the build, the installs; pip's own cache of downloaded wheels in ~/.cache/pip
makes every run after the first one offline but for the index lookups) and run by `make test`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # the check's default: max |a - b| / max |a| per compared blob
WORST = re.compile(r"worst relative error ([0-9.e+-]+) \(tolerance ([0-9.e+-]+)\)")

# Moves one weight of the rewritten net's output layer after the rewrite and before the files are written and
# compared: the exact rewrite no longer computes the same function, so the check must fail (exit 1).
ALTER_ONE_WEIGHT = """
import sys
import numpy as np
from deeprebirth import cli, pipeline
LAYER = sys.argv.pop(1)
saved = pipeline.save_model

def save_altered(graph, prototxt, weights=None):
    layer = graph.layer(LAYER)
    altered = np.array(layer.blobs[0], copy=True)
    row = altered.reshape(altered.shape[0], -1)[0]
    row[np.argmax(np.abs(row))] *= 1.5  # the largest weight of the first output, half as large again
    layer.blobs[0] = altered
    saved(graph, prototxt, weights)

pipeline.save_model = save_altered
cli.main()
"""


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _copy_checkout(to: Path) -> None:
    """The working tree as git sees it (tracked files and new ones not ignored): no venv, no generated schema."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)


def _bare_env(venv: Path, tools: Path) -> dict[str, str]:
    """PATH = the venv and a folder of a few shell tools: no protoc, no Caffe, no PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{tools}"
    env["GLOG_minloglevel"] = "2"
    return env


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The wheel built without protoc and installed into a fresh venv without Caffe; returns its env and paths."""
    root = tmp_path_factory.mktemp("pip")
    tools = root / "tools"
    tools.mkdir()
    for tool in ("sh", "bash", "env", "uname"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    source = root / "src"
    _copy_checkout(source)
    assert not (source / "deeprebirth" / "caffe_pb2.py").exists()  # the build must compile the schema itself

    builder = root / "build-venv"
    subprocess.run([sys.executable, "-m", "venv", str(builder)], check=True)
    env = _bare_env(builder, tools)
    assert shutil.which("protoc", path=env["PATH"]) is None
    done = _run([str(builder / "bin" / "python"), "-m", "pip", "install", "--quiet", "build"], env, root)
    assert done.returncode == 0, done.stderr[-2000:]
    done = _run([str(builder / "bin" / "python"), "-m", "build", "--outdir", str(root / "dist"), str(source)], env,
                root, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = list((root / "dist").glob("deeprebirth-*-py3-none-any.whl"))
    sdists = list((root / "dist").glob("deeprebirth-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((root / "dist").iterdir())

    venv = root / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _bare_env(venv, tools)
    python = str(venv / "bin" / "python")
    done = _run([python, "-m", "pip", "install", "--quiet", str(wheels[0]), "onnx>=1.15", "onnxruntime>=1.17"],
                env, root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    no_caffe = _run([python, "-c", "import caffe"], env, root)
    assert no_caffe.returncode != 0 and "No module named 'caffe'" in no_caffe.stderr
    return {"env": env, "python": python, "cli": str(venv / "bin" / "deeprebirth"), "work": root}


def _worst(stdout: str) -> tuple[float, float]:
    found = WORST.search(stdout)
    assert found, stdout[-2000:]
    return float(found[1]), float(found[2])


def test_the_build_needs_no_protoc_and_ships_the_schema(fresh: dict[str, object]) -> None:
    work = Path(str(fresh["work"]))
    import tarfile
    import zipfile

    wheel = next((work / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "deeprebirth/caffe_pb2.py" in names and "deeprebirth/caffe/reference.py" in names
    assert not any(name.endswith(".so") for name in names)  # pure Python
    with tarfile.open(next((work / "dist").glob("*.tar.gz"))) as sdist:
        shipped = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in sdist.getnames() if "/" in n}
    assert {"deeprebirth/caffe_pb2.py", "proto/caffe.proto", "pyproject.toml", "setup.cfg", "setup.py"} <= shipped


def test_rewrite_check_runs_in_opencv_and_fails_on_an_altered_weight(fresh: dict[str, object],
                                                                     assets: dict[str, str],
                                                                     photos: list[str]) -> None:
    env, cli, work = dict(fresh["env"]), str(fresh["cli"]), Path(str(fresh["work"]))  # type: ignore[call-overload]
    def rewrite_args(stem: str) -> list[str]:
        return [assets["open_nsfw.prototxt"], str(work / f"{stem}.prototxt"), "--weights",
                assets["open_nsfw.caffemodel"], "--out-weights", str(work / f"{stem}.caffemodel"), "--rules", "exact",
                "--check", "2", "--images", str(Path(photos[0]).parent)]

    done = _run([cli, "rewrite", *rewrite_args("nsfw"), "--report", str(work / "nsfw.json")], env, work)
    assert done.returncode == 0, done.stderr
    assert "check PASSED on 7 inputs, both nets in OpenCV dnn" in done.stdout  # 2 random + 5 photos
    worst, tolerance = _worst(done.stdout)
    assert tolerance == TOLERANCE and 0 < worst < TOLERANCE  # compared for real: OpenCV's own BN fusion differs a bit
    check = json.loads((work / "nsfw.json").read_text())["check"]
    assert check["reference"] == "opencv" and check["passed"] and check["inputs"] == 7
    assert {b["blob"] for b in check["blobs"]} == {"prob", "fc_nsfw"}

    done = _run([str(fresh["python"]), "-c", ALTER_ONE_WEIGHT, "fc_nsfw", "rewrite", *rewrite_args("altered")], env,
                work)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr
    assert "check FAILED" in done.stdout and "OpenCV dnn" in done.stdout
    assert _worst(done.stdout)[0] > 10 * TOLERANCE

    # the slim net exported to ONNX, checked against OpenCV dnn running the Caffe files
    done = _run([cli, "export", str(work / "nsfw.prototxt"), str(work / "nsfw.caffemodel"), str(work / "nsfw.onnx"),
                 "--check", "2"], env, work)
    assert done.returncode == 0, done.stderr
    assert re.search(r"check PASSED on 2 inputs, OpenCV dnn [0-9.]+ vs onnxruntime", done.stdout), done.stdout
    assert 0 < _worst(done.stdout)[0] < TOLERANCE and (work / "nsfw.onnx").stat().st_size > 1e7


def test_face_detector_plan_profile_without_caffe(fresh: dict[str, object], assets: dict[str, str]) -> None:
    env, cli, work = dict(fresh["env"]), str(fresh["cli"]), Path(str(fresh["work"]))  # type: ignore[call-overload]
    slim = (str(work / "face.prototxt"), str(work / "face.caffemodel"))
    done = _run([cli, "rewrite", assets["ssd_face.prototxt"], slim[0], "--weights", assets["ssd_face.caffemodel"],
                 "--out-weights", slim[1], "--rules", "exact", "--check", "2"], env, work)
    assert done.returncode == 0, done.stderr
    assert "both nets in OpenCV dnn" in done.stdout and _worst(done.stdout)[0] < TOLERANCE

    done = _run([cli, "plan", assets["ssd_face.prototxt"], "--weights", assets["ssd_face.caffemodel"],
                 "--rounds", "2"], env, work)
    assert done.returncode == 0, done.stderr
    assert "per forward in OpenCV dnn" in done.stdout and "fuse_batchnorm_into_conv" in done.stdout

    done = _run([cli, "profile", slim[0], "--weights", slim[1], "--rounds", "2", "--batch", "1"], env, work)
    assert done.returncode == 0, done.stderr
    assert "opencv: " in done.stdout and "Convolution" in done.stdout

    done = _run([cli, "finetune", assets["ssd_face.prototxt"], assets["ssd_face.caffemodel"], *slim, "--report",
                 str(work / "none.json"), "--data", str(work), "--out", str(work / "final.caffemodel")], env, work)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "finetune needs pycaffe" in done.stderr and "make install" in done.stderr
    assert not (work / "final.caffemodel").exists()


def test_a_users_own_pycaffe_on_pythonpath_is_the_reference(fresh: dict[str, object], assets: dict[str, str]) -> None:
    spec = importlib.util.find_spec("caffe")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no pycaffe in this test environment (make install builds it)")
    own = str(Path(next(iter(spec.submodule_search_locations))).parent)  # the folder holding the caffe package
    env, cli, work = dict(fresh["env"]), str(fresh["cli"]), Path(str(fresh["work"]))  # type: ignore[call-overload]
    env["PYTHONPATH"] = own
    done = _run([cli, "rewrite", assets["open_nsfw.prototxt"], str(work / "own.prototxt"), "--weights",
                 assets["open_nsfw.caffemodel"], "--out-weights", str(work / "own.caffemodel"), "--rules", "exact",
                 "--check", "2"], env, work)
    assert done.returncode == 0, done.stderr
    assert "check PASSED on 2 inputs, both nets in real Caffe" in done.stdout
    assert 0 < _worst(done.stdout)[0] < TOLERANCE
