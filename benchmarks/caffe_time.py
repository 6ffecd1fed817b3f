"""`caffe time` against `deeprebirth profile`: BVLC GoogLeNet (random weights) and its slimmed copy
(`deeprebirth rewrite`, all default rules), both tools on both nets, 1 OpenBLAS thread, batch 1, side by side in one
run: Caffe's own tool and the project's profiler should agree on how much faster the slim net is.

`caffe time` uses the batch the prototxt gives (GoogLeNet's deploy says 10), so batch-1 copies are timed. It runs
forward and backward passes; its "Average Forward pass" is compared. Rounds alternate original and slim for each
tool; medians are reported.

    .venv/bin/python benchmarks/caffe_time.py [--rounds 3] [--iterations 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.measure.profile import profile_net

CAFFE = Path(os.environ.get("DEEPREBIRTH_CAFFE", Path(sys.executable).parent / "caffe"))
FORWARD = re.compile(r"Average Forward pass: ([0-9.]+) ms")


def log(message: str) -> None:
    print(f"[caffe_time] {message}", file=sys.stderr, flush=True)


def googlenet() -> Path:
    zoo = json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
    return Path(zoo["model_zoo"]) / "bvlc_googlenet" / "deploy.prototxt"


def batch_one(prototxt: str, weights: str, out: Path) -> tuple[str, str]:
    graph = load_model(prototxt, weights)
    set_batch(graph, 1)
    paths = (str(out.with_suffix(".prototxt")), str(out.with_suffix(".caffemodel")))
    save_model(graph, *paths)
    return paths


def caffe_time(prototxt: str, weights: str, iterations: int) -> float:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", GLOG_minloglevel="0", GLOG_logtostderr="1")
    done = subprocess.run([str(CAFFE), "time", "-model", prototxt, "-weights", weights, "-iterations",
                           str(iterations)], capture_output=True, text=True, env=env, check=True)
    found = FORWARD.search(done.stderr)
    if found is None:
        raise SystemExit(f"no 'Average Forward pass' in the output of caffe time:\n{done.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per tool (medians reported)")
    parser.add_argument("--iterations", type=int, default=20, help="caffe time -iterations; profile rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeprebirth-caffe-time-") as tmp:
        folder = Path(tmp)
        graph = load_model(googlenet())
        random_weights(graph, seed=0)
        original = (str(folder / "original.prototxt"), str(folder / "original.caffemodel"))
        save_model(graph, *original)
        slim = (str(folder / "slim.prototxt"), str(folder / "slim.caffemodel"))
        log("deeprebirth rewrite (all default rules)")
        subprocess.run([sys.executable, "-c", "from deeprebirth.cli import main; main()", "rewrite", original[0],
                        slim[0], "--weights", original[1], "--out-weights", slim[1]], check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        nets = {"original": batch_one(*original, folder / "original_b1"), "slim": batch_one(*slim, folder / "slim_b1")}
        times: dict[tuple[str, str], list[float]] = {}
        for k in range(args.rounds):
            for name, (proto, weights) in nets.items():
                times.setdefault(("caffe time", name), []).append(caffe_time(proto, weights, args.iterations))
                profile = profile_net(proto, weights, batch=1, threads=1, rounds=args.iterations, warmup=2)
                times.setdefault(("deeprebirth profile", name), []).append(profile.forward_ms)
            log(f"round {k + 1}/{args.rounds} done")
    # each round times the two nets back to back: its ratio is the least disturbed by other load on the machine
    print("| tool (1 thread, batch 1, forward) | original (ms) | slim (ms) | original / slim (median of rounds) "
          "| per round |")
    print("|---|---|---|---|---|")
    for tool in ("caffe time", "deeprebirth profile"):
        a, b = times[(tool, "original")], times[(tool, "slim")]
        ratios = [x / y for x, y in zip(a, b)]
        print(f"| `{tool}` | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
              f"{statistics.median(ratios):.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} |")
    print(f"\n{args.rounds} rounds, `caffe time -iterations {args.iterations}`, profile {args.iterations} rounds; "
          f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
