"""Peak memory and time of rewriting a ~550 MB caffemodel (VGG-16 with BatchNorm + Scale after every conv, random
weights, generated here: nothing is committed), side by side with a plain protobuf parse + serialize of the same
file. Each measurement runs in its own child process; peak RSS is the kernel's accounting of that child (os.wait4,
from a tiny launcher process: see ``LAUNCHER``).

    .venv/bin/python benchmarks/big_model.py [--rules all] [--caffe] [--out benchmarks/results/big_model.md]

--caffe also loads the rewritten pair in pycaffe and runs one forward pass (Caffe's own protobuf reader on it).
Exits 1 if deeprebirth's peak RSS exceeds 2.5x the caffemodel's size.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 2.5  # peak RSS / file size

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_bn_prototxt(size: int = 224, classes: int = 1000) -> str:
    """VGG-16 (configuration D) with BatchNorm + Scale + ReLU in place after every convolution: 138 M weights."""
    lines = ['name: "VGG16_BN"',
             (f'layer {{ name: "data" type: "Input" top: "data" '
              f'input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}')]
    bottom = "data"
    for b, block in enumerate(VGG16_BLOCKS, 1):
        for c, channels in enumerate(block, 1):
            name = f"conv{b}_{c}"
            lines += [(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                       f'convolution_param {{ num_output: {channels} pad: 1 kernel_size: 3 }} }}'),
                      f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}',
                      (f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}" '
                       f'scale_param {{ bias_term: true }} }}'),
                      f'layer {{ name: "relu{b}_{c}" type: "ReLU" bottom: "{name}" top: "{name}" }}']
            bottom = name
        lines.append(f'layer {{ name: "pool{b}" type: "Pooling" bottom: "{bottom}" top: "pool{b}" '
                     f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}')
        bottom = f"pool{b}"
    for name, out in (("fc6", 4096), ("fc7", 4096), ("fc8", classes)):
        lines.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                     f'inner_product_param {{ num_output: {out} }} }}')
        if name != "fc8":
            lines += [f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}',
                      (f'layer {{ name: "drop{name[2:]}" type: "Dropout" bottom: "{name}" top: "{name}" '
                       f'dropout_param {{ dropout_ratio: 0.5 }} }}')]
        bottom = name
    lines.append('layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }')
    return "\n".join(lines) + "\n"


def make_big_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write vgg16_bn.prototxt and a caffemodel with random weights (He-normal, float32 straight from the generator;
    BatchNorm statistics with a real scale factor)."""
    from deeprebirth.io import caffe_io
    from deeprebirth.ir.model import load_model
    from deeprebirth.ir.shapes import expected_param_shapes

    proto = folder / "vgg16_bn.prototxt"
    proto.write_text(vgg16_bn_prototxt())
    graph = load_model(proto)
    rng = np.random.default_rng(seed)
    weights: dict[str, list[np.ndarray]] = {}
    for name, shapes in expected_param_shapes(graph).items():
        kind = graph.layer(name).type
        if kind == "BatchNorm":
            c = shapes[0]
            weights[name] = [rng.normal(0, 0.5, c).astype(np.float32) * 999.98,
                             rng.uniform(0.5, 2.0, c).astype(np.float32) * 999.98,
                             np.array([999.98], dtype=np.float32)]
        elif kind == "Scale":
            weights[name] = [rng.uniform(0.5, 1.5, s).astype(np.float32) for s in shapes]
        elif shapes:
            fan_in = float(np.prod(shapes[0][1:]))
            w = rng.standard_normal(shapes[0], dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / fan_in))
            weights[name] = [w] + [np.full(s, 0.01, dtype=np.float32) for s in shapes[1:]]
    model = folder / "vgg16_bn.caffemodel"
    caffe_io.write_caffemodel(model, graph.to_net(), weights)
    return proto, model


DEEPREBIRTH = """
import sys
from deeprebirth.api import RewriteOptions, rewrite_files
result = rewrite_files(sys.argv[1], sys.argv[3] + "/out.prototxt", sys.argv[2], sys.argv[3] + "/out.caffemodel",
                       options=RewriteOptions(rules=sys.argv[4]))
print(len(result.report.changes), "changes")
"""
PROTOBUF = """
import sys
from deeprebirth import caffe_pb2
net = caffe_pb2.NetParameter()
with open(sys.argv[2], "rb") as handle:
    net.ParseFromString(handle.read())
with open(sys.argv[3] + "/plain.caffemodel", "wb") as handle:
    handle.write(net.SerializeToString())
"""
READ_BACK = """
import sys
from deeprebirth.ir.model import load_model
graph = load_model(sys.argv[3] + "/out.prototxt", sys.argv[3] + "/out.caffemodel")
print(sum(b.size for layer in graph.layers() for b in layer.blobs or []), "weights read back")
"""
CAFFE = """
import os, sys
os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np
from deeprebirth.caffe.runtime import forward, open_net
net = open_net(sys.argv[3] + "/out.prototxt", sys.argv[3] + "/out.caffemodel")
out = forward(net, {"data": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}, ["prob"])
print("Caffe forward: prob", out["prob"].shape, "sums to", float(out["prob"].sum()))
"""


# Linux folds the parent's RSS at fork time into the child's ru_maxrss (the copied address space's high-water mark
# survives exec), so a child forked straight from this (big) process would report at least this process's size. A
# tiny launcher process forks the measured child instead and reports os.wait4's figure for it.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as handle:
    json.dump({"status": status, "seconds": time.perf_counter() - start, "maxrss_kib": usage.ru_maxrss}, handle)
"""


def measure(code: str, proto: Path, model: Path, workdir: Path, rules: str = "all",
            may_fail: bool = False) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout, or what went wrong in a child that ``may_fail``) of one child."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        run = subprocess.run([sys.executable, "-c", LAUNCHER, str(result), code, str(proto), str(model),
                              str(workdir), rules], check=False, capture_output=True, text=True)
        measured = json.loads(result.read_text())
    status = measured["status"]
    output = run.stdout.strip()
    if status != 0:
        if not may_fail:
            raise SystemExit(f"benchmark child failed with status {status}:\n{run.stderr}")
        reasons = [re.sub(r"\s+To increase the limit.*", "", line.split("] ", 1)[-1])
                   for line in run.stderr.splitlines() if "rejected" in line or "Check failed" in line]
        output = f"FAILED (status {status}): {' / '.join(reasons)}"
    return measured["seconds"], measured["maxrss_kib"] / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default="all")
    parser.add_argument("--caffe", action="store_true", help="also load the output in pycaffe and run a forward")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "big_model.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeprebirth-big-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        proto, model = make_big_model(folder)
        size_mib = model.stat().st_size / 2**20
        print(f"[big_model] generated {model.name}: {size_mib:.0f} MiB in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
        jobs = [(f"deeprebirth rewrite (--rules {args.rules})", DEEPREBIRTH),
                ("read the output back (load_model)", READ_BACK),
                ("protobuf parse + serialize (upb)", PROTOBUF)]
        if args.caffe:
            jobs.append(("pycaffe loads the output + 1 forward", CAFFE))
        rows, notes, ratio = [], [], 0.0
        for name, code in jobs:
            seconds, rss, output = measure(code, proto, model, folder, args.rules, may_fail=code is CAFFE)
            if code is DEEPREBIRTH:
                ratio = rss / size_mib
                out_mib = (folder / "out.caffemodel").stat().st_size / 2**20
                notes.append(f"rewritten caffemodel: {out_mib:.0f} MiB; {output}")
            elif output:
                notes.append(output)
            print(f"[big_model] {name}: {seconds:.1f} s, {rss:.0f} MiB", file=sys.stderr, flush=True)
            name += " (FAILED: see below)" if output.startswith("FAILED") else ""
            rows.append(f"| {name} | {seconds:.1f} | {rss:.0f} | {rss / size_mib:.2f} |")
    table = "\n".join([
        (f"caffemodel: VGG-16 + BatchNorm/Scale (random weights), {size_mib:.0f} MiB; one child process per job "
        "(time includes Python start-up and imports); limit for deeprebirth: peak RSS <= "
        f"{LIMIT}x the file size"), "",
        "| job | seconds | peak RSS (MiB) | peak RSS / file size |", "|---|---|---|---|", *rows, "",
        *[f"- {note}" for note in notes]])
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    sys.exit(0 if ratio <= LIMIT else 1)


if __name__ == "__main__":
    main()
