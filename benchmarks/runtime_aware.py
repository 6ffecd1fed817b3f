"""Does `rewrite --runtime R --min-gain P` keep the speed of the default rewrite with fewer lossy merges?

BVLC GoogLeNet (random weights, batch 1): the original, the default rewrite and the runtime-aware rewrite for each
runtime R (MNN, ONNX Runtime), all timed on R in one worker, interleaved (A B C A B C ...), 1 thread, process CPU
time. Reported per net: median and inter-quartile range over the rounds; per round, the ratio default / aware (same
round, so drift of this shared machine cancels), its median and IQR; and how many lossy merges each rewrite applied
(the ones fine-tuning must re-learn), with the merges the aware rewrite left out and what they measured in its plan.

    .venv/bin/python benchmarks/runtime_aware.py [--rounds 40] [--min-gain 1,2] [--runtimes mnn,onnxruntime]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.io.caffe_io import atomic_write_bytes, set_batch
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.measure.latency import latency

NAMES = {"mnn": "MNN", "onnxruntime": "ONNX Runtime"}


def log(message: str) -> None:
    print(f"[runtime_aware] {message}", file=sys.stderr, flush=True)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def rewrite(original: tuple[str, str], folder: Path, stem: str, options: RewriteOptions) -> dict[str, Any]:
    out = str(folder / f"{stem}.prototxt"), str(folder / f"{stem}.caffemodel")
    started = time.perf_counter()
    report = rewrite_files(original[0], out[0], original[1], out[1], options=options).report
    lossy = [c for c in report.changes if not c.exact]
    notes = [re.match(r"not applied: (\S+) at '([^']+)' saves (-?[\d.]+)%", w) for w in report.warnings]
    left_out = [f"{m[1]} at {m[2]} ({m[3]}%)" for m in notes if m]
    noise = [float(m[1]) for m in (re.search(r"noise floor ([\d.]+)%", w) for w in report.warnings) if m]
    seconds = time.perf_counter() - started
    log(f"{stem}: {len(lossy)} lossy merges, {len(left_out)} left out ({seconds:.0f} s)")
    return {"net": out, "lossy": len(lossy), "left_out": left_out, "seconds": seconds, "noise": noise[0] if noise else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--min-gain", default="1,2", help="one aware rewrite per value (percent)")
    parser.add_argument("--plan-rounds", type=int, default=10, help="rounds of the runtime plan inside rewrite")
    parser.add_argument("--runtimes", default="mnn,onnxruntime")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_aware.md"))
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    gains = [float(g) for g in args.min_gain.split(",") if g.strip()]
    zoo = Path(json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
               ["model_zoo"])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="deeprebirth-aware-") as tmp:
        folder = Path(tmp)
        graph = load_model(zoo / "bvlc_googlenet" / "deploy.prototxt")
        set_batch(graph, 1)  # BVLC's deploy declares batch 10
        random_weights(graph, seed=3)
        original = str(folder / "original.prototxt"), str(folder / "original.caffemodel")
        save_model(graph, *original)
        default = rewrite(original, folder, "default", RewriteOptions())
        for runtime in runtimes:
            aware = [rewrite(original, folder, f"aware_{runtime}_{gain:g}", RewriteOptions(
                runtime=runtime, min_gain=gain, runtime_rounds=args.plan_rounds)) for gain in gains]
            started = time.perf_counter()
            times = latency([original, default["net"], *(a["net"] for a in aware)], runtime, batch=1, threads=1,
                            rounds=args.rounds, warmup=3, clock="cpu")
            log(f"{runtime}: timed {args.rounds} rounds ({time.perf_counter() - started:.0f} s)")
            results[runtime] = {"times_ms": times, "gains": gains,
                                "ratio_default_over_aware": [[d / a for d, a in zip(times[1], t)] for t in times[2:]],
                                "lossy": [0, default["lossy"], *(a["lossy"] for a in aware)],
                                "left_out": [a["left_out"] for a in aware],
                                "rewrite_seconds": [a["seconds"] for a in aware],
                                "plan_noise_pct": [a["noise"] for a in aware]}
    lines = ["# Runtime-aware rewrite vs the default rewrite", "",
             (f"`benchmarks/runtime_aware.py --rounds {args.rounds} --min-gain {args.min_gain} --plan-rounds "
              f"{args.plan_rounds}`: BVLC GoogLeNet "
              f"(random weights), batch 1, 1 thread, {args.rounds} interleaved rounds after 3 warm-up, process CPU "
              f"time, this shared 2-core machine; the aware rewrite's own plan timed every candidate merge "
              f"{args.plan_rounds} rounds."), ""]
    lines += ["| runtime | net | lossy merges | median ms | IQR ms | original / net |", "|---|---|---|---|---|---|"]
    for runtime, found in results.items():
        times, lossy = found["times_ms"], found["lossy"]
        base = statistics.median(times[0])
        labels = ["original", "default rewrite", *(f"`--runtime {runtime} --min-gain {g:g}`" for g in gains)]
        for label, values, count in zip(labels, times, lossy):
            q1, q2, q3 = quartiles(values)
            lines.append(f"| {NAMES.get(runtime, runtime)} | {label} | {count} | {q2:.1f} | {q1:.1f}–{q3:.1f} | "
                         f"{base / q2:.2f}x |")
    lines += ["", "Per round, default / aware (same round; > 1: the aware net is faster):", ""]
    for runtime, found in results.items():
        for gain, ratios, left_out, seconds, noise in zip(found["gains"], found["ratio_default_over_aware"],
                                                          found["left_out"], found["rewrite_seconds"],
                                                          found["plan_noise_pct"]):
            q1, q2, q3 = quartiles(ratios)
            lines.append(f"- {NAMES.get(runtime, runtime)}, `--min-gain {gain:g}`: median {q2:.3f}, IQR "
                         f"{q1:.3f}–{q3:.3f}; its plan's noise floor {noise}%; {len(left_out)} lossy merges left out"
                         + (": " + "; ".join(left_out) if left_out else "") + f" (the aware rewrite took {seconds:.0f} s)")
    lines.append("")
    out = Path(args.out)
    atomic_write_bytes(out, "\n".join(lines))
    atomic_write_bytes(out.with_suffix(".json"), json.dumps({"rounds": args.rounds, "min_gain": gains,
                                                            "results": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
