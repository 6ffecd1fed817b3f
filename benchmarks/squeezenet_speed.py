"""What merge_pooling_into_widened_branch_convs buys on SqueezeNet v1.0, in real Caffe, side by side in one run:
the original net, the net slimmed without the new rule (``--skip merge_pooling_into_widened_branch_convs``: only
conv1 + pool1 merge, pool4 and pool8 stay, as before the rule existed) and the net slimmed with every rule (pool4 and
pool8 go into the fire modules' expand convs). Forward time at 1 OpenBLAS thread, batch 1 and 10 (wall and process
CPU time, rounds interleaved A B C A B C ... in one worker process), Caffe blob + parameter memory and process peak
RSS (one process per net), MACs and parameters.

The net is SqueezeNet v1.0's layout (``tests/nets.py: squeezenet_v10``, 227x227, 1000 classes) with random weights:
speed and memory only, the merged layers would need fine-tuning.

    .venv/bin/python benchmarks/squeezenet_speed.py [--quick] [--rounds 10] [--out benchmarks/results/squeezenet_speed.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nets import squeezenet_v10
from slim_speed import markdown, ratio  # the slim GoogLeNet benchmark's table helpers

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.io.caffe_io import atomic_write_bytes, set_batch
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import layer_costs
from deeprebirth.measure.profile import interleaved_latency, profile_net

NEW_RULE = "merge_pooling_into_widened_branch_convs"
LABELS = ("original", "slimmed without the new rule", "slimmed (all rules)")


def log(message: str) -> None:
    print(f"[squeezenet_speed] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 10, quick 3)")
    parser.add_argument("--batches", default="1,10", help="batch sizes, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "squeezenet_speed.md"))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="deeprebirth-squeezenet-") as tmp:
        folder = Path(tmp)
        (folder / "original.prototxt").write_text(squeezenet_v10())
        graph = load_model(folder / "original.prototxt")
        random_weights(graph, seed=0)
        nets = [(str(folder / f"{stem}.prototxt"), str(folder / f"{stem}.caffemodel"))
                for stem in ("original", "without", "slimmed")]
        save_model(graph, *nets[0])
        without = rewrite_files(nets[0][0], nets[1][0], nets[0][1], nets[1][1],
                                options=RewriteOptions(skip=[NEW_RULE])).report
        slimmed = rewrite_files(nets[0][0], nets[2][0], nets[0][1], nets[2][1], options=RewriteOptions()).report
        rules = [", ".join(f"{r} x{n}" for r, n in Counter(c.rule for c in rep.changes).items())
                 for rep in (without, slimmed)]
        log(f"without the new rule: {rules[0]}; all rules: {rules[1]}")
        rows: list[list[object]] = []

        def three(label: str, setting: str, values: Sequence[float], show: Callable[[float], str]) -> None:
            rows.append([label, setting, *(show(v) for v in values), ratio(values[0], values[1]),
                         ratio(values[0], values[2]), ratio(values[1], values[2])])

        for clock in ("wall", "cpu"):
            for b in batches:
                log(f"Caffe forward, 1 thread, batch {b}, {clock} clock, {rounds} interleaved rounds")
                times = interleaved_latency(nets, batch=b, threads=1, rounds=rounds, warmup=warmup, clock=clock)
                three(f"Caffe forward, {'CPU time' if clock == 'cpu' else 'wall'} (ms)", f"1 thread, batch {b}",
                      [statistics.median(t) for t in times], lambda v: f"{v:.1f}")
        for b in batches:
            log(f"memory, batch {b} (each net in its own process)")
            profiles = [profile_net(*net, batch=b, threads=1, rounds=1, warmup=0, clock="cpu") for net in nets]
            three("Caffe blobs + params (MiB)", f"batch {b}", [p.memory_bytes for p in profiles],
                  lambda v: f"{v / 2**20:.1f}")
            three("process peak RSS (MiB)", f"batch {b}", [p.peak_rss_bytes for p in profiles],
                  lambda v: f"{v / 2**20:.1f}")
        costs = []
        for prototxt, _ in nets:
            g = load_model(prototxt)
            set_batch(g, 1)
            costs.append(layer_costs(g))
        three("MACs (G)", "batch 1", [sum(c.macs for c in cost) for cost in costs], lambda v: f"{v / 1e9:.3f}")
        three("parameters (M)", "", [sum(c.params for c in cost) for cost in costs], lambda v: f"{v / 1e6:.3f}")
        three("Pooling layers", "", [sum(c.type == "Pooling" for c in cost) for cost in costs], lambda v: f"{v:.0f}")

    text = "\n".join([
        "# SqueezeNet v1.0: what merge_pooling_into_widened_branch_convs buys",
        "",
        (f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, load average at the start: {load}; "
         f"{rounds} timed rounds after {warmup} warm-up, medians, rounds interleaved in one process. Random weights."),
        f"Without the new rule: {rules[0]}. All rules: {rules[1]}.",
        f"Layers to re-learn with all rules: {', '.join(slimmed.relearn)}.",
        "",
        markdown(["measure", "setting", *LABELS, "original / without", "original / all rules",
                  "without / all rules (the new rule)"], rows),
        "",
    ])
    atomic_write_bytes(out, text)
    print(text)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
