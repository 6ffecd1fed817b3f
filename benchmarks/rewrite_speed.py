"""Rewrite time and peak memory for a ~240 MB caffemodel (AlexNet, random weights), side by side with a plain
protobuf parse + serialize of the same file, in one run. Each measurement runs in its own process (peak RSS from
the kernel's accounting of that child); rounds are interleaved and medians reported.

    .venv/bin/python benchmarks/rewrite_speed.py [--rounds 3] [--out benchmarks/results/rewrite_speed.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEEPREBIRTH = """
import sys
from deeprebirth.api import RewriteOptions, rewrite_files
rewrite_files(sys.argv[1], sys.argv[3] + "/out.prototxt", sys.argv[2], sys.argv[3] + "/out.caffemodel",
              options=RewriteOptions(rules="all"))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
PROTOBUF = """
import sys
from deeprebirth import caffe_pb2
net = caffe_pb2.NetParameter()
net.ParseFromString(open(sys.argv[2], "rb").read())
open(sys.argv[3] + "/plain.caffemodel", "wb").write(net.SerializeToString())
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def measure(code: str, proto: str, model: str, workdir: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process. The peak is the child's own VmHWM: its ru_maxrss would
    include the parent's memory at fork time (this parent holds the generated weights)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, proto, model, workdir], check=True, capture_output=True,
                         text=True).stdout
    elapsed = time.perf_counter() - start
    return elapsed, int(out.split()[-1]) / 1024


def make_model(folder: Path) -> tuple[str, str]:
    from deeprebirth.ir.initializers import random_weights
    from deeprebirth.ir.model import load_model, save_model

    zoo = json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
    graph = load_model(Path(zoo["model_zoo"]) / "bvlc_alexnet" / "deploy.prototxt")
    random_weights(graph, seed=0)
    proto, model = folder / "alexnet.prototxt", folder / "alexnet.caffemodel"
    save_model(graph, proto, model)
    return str(proto), str(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rewrite_speed.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeprebirth-bench-") as tmp:
        print("[rewrite_speed] generating AlexNet with random weights", file=sys.stderr, flush=True)
        proto, model = make_model(Path(tmp))
        size_mb = os.path.getsize(model) / 2**20
        results: dict[str, list[tuple[float, float]]] = {"deeprebirth rewrite": [], "protobuf parse+serialize": []}
        for i in range(args.rounds):
            for name, code in (("deeprebirth rewrite", DEEPREBIRTH), ("protobuf parse+serialize", PROTOBUF)):
                results[name].append(measure(code, proto, model, tmp))
                print(f"[rewrite_speed] round {i + 1}/{args.rounds} {name}: {results[name][-1][0]:.2f} s, "
                      f"{results[name][-1][1]:.0f} MiB", file=sys.stderr, flush=True)
    rows = []
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        rows.append(f"| {name} | {seconds:.2f} | {rss:.0f} | {rss / size_mb:.2f} |")
    table = "\n".join([
        (f"caffemodel: AlexNet, random weights, {size_mb:.0f} MiB; median of {args.rounds} interleaved rounds, "
         "each in its own process (time includes Python start-up and imports)"),
        "",
        "| job | seconds | peak RSS (MiB) | peak RSS / file size |",
        "|---|---|---|---|",
        *rows,
    ])
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
