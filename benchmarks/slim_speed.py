"""Original vs slimmed vs slimmed+Tucker BVLC GoogLeNet, side by side in one run: forward latency in real Caffe
(1 and 2 OpenBLAS threads, batch 1 and 10) and in OpenCV dnn (fusion on and off), Caffe blob + parameter memory and
process peak RSS (each net in its own process), MACs, and the per-layer-type profile before/after (PNG).

The slimmed net is ``deeprebirth.api.rewrite_files`` with the default options (all rules) on random weights: its
speed and memory are what matter here, not its accuracy (lossy merges would need fine-tuning). The slimmed+Tucker
net is the ``deeprebirth+tucker`` preset (all rules, then decompose_conv_tucker) with ``--tucker-ranks`` (default
speedup:3: VBMF, the preset's own rank method, reads ranks off trained kernels and finds none in random ones).
Latency rounds are interleaved (A B C A B C ... in one worker process per setting) and medians reported.

    .venv/bin/python benchmarks/slim_speed.py [--quick] [--rounds 10] [--out benchmarks/results/slim_speed.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeprebirth.api import RewriteOptions, preset_options, rewrite_files
from deeprebirth.io.caffe_io import atomic_write_bytes, set_batch
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import LayerCost, layer_costs
from deeprebirth.measure.profile import (
    NetProfile,
    interleaved_latency,
    plot_by_type,
    profile_net,
)


def log(message: str) -> None:
    print(f"[slim_speed] {message}", file=sys.stderr, flush=True)


def googlenet() -> Path:
    zoo = json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
    return Path(zoo["model_zoo"]) / "bvlc_googlenet" / "deploy.prototxt"


def batch_one_costs(prototxt: str) -> list[LayerCost]:
    """Per-layer costs at batch 1 (the deploy prototxt says batch 10)."""
    graph = load_model(prototxt)
    set_batch(graph, 1)
    return layer_costs(graph)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def count(value: float) -> str:
    return f"{value / 1e9:.3f} G" if value >= 1e9 else f"{value / 1e6:.2f} M"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, for CI-sized runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 10, quick 3)")
    parser.add_argument("--threads", default="1,2", help="OpenBLAS / OpenCV thread counts, comma-separated")
    parser.add_argument("--batches", default="1,10", help="batch sizes, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slim_speed.md"))
    parser.add_argument("--plot", default=None, help="per-type profile PNG (default: next to --out)")
    parser.add_argument("--tucker-ranks", default="speedup:3",
                        help="rank method of the slimmed+Tucker net (vbmf needs trained weights)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_name(out.stem + "_profile.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="deeprebirth-slim-") as tmp:
        folder = Path(tmp)
        log("building GoogLeNet with random weights and rewriting it (all rules)")
        graph = load_model(googlenet())
        random_weights(graph, seed=0)
        original = (str(folder / "original.prototxt"), str(folder / "original.caffemodel"))
        slimmed = (str(folder / "slimmed.prototxt"), str(folder / "slimmed.caffemodel"))
        tucker = (str(folder / "tucker.prototxt"), str(folder / "tucker.caffemodel"))
        save_model(graph, *original)
        result = rewrite_files(original[0], slimmed[0], original[1], slimmed[1], options=RewriteOptions())
        report = result.report
        by_rule = Counter(change.rule for change in report.changes)
        log(f"{len(report.changes)} changes: {dict(by_rule)}")
        log(f"slimmed+Tucker: preset deeprebirth+tucker, rank method {args.tucker_ranks}")
        tucker_report = rewrite_files(original[0], tucker[0], original[1], tucker[1], options=preset_options(
            "deeprebirth+tucker", rank_method=args.tucker_ranks)).report
        decomposed = sum(change.rule == "decompose_conv_tucker" for change in tucker_report.changes)
        nets = [original, slimmed, tucker]
        costs = [batch_one_costs(p) for p, _ in nets]

        rows: list[list[object]] = []
        for t in threads:
            for b in batches:
                log(f"Caffe latency, {t} thread(s), batch {b}, {rounds} interleaved rounds")
                a_ms, s_ms, t_ms = (statistics.median(x) for x in interleaved_latency(
                    nets, batch=b, threads=t, rounds=rounds, warmup=warmup))
                rows.append(["Caffe forward (ms)", f"{t} thread(s), batch {b}", f"{a_ms:.1f}", f"{s_ms:.1f}",
                             f"{t_ms:.1f}", ratio(a_ms, s_ms), ratio(a_ms, t_ms)])
        for b in batches:  # CPU time: still the 1-thread latency while other processes share the cores
            log(f"Caffe CPU time, 1 thread, batch {b}, {rounds} interleaved rounds")
            a_ms, s_ms, t_ms = (statistics.median(x) for x in interleaved_latency(
                nets, batch=b, threads=1, rounds=rounds, warmup=warmup, clock="cpu"))
            rows.append(["Caffe forward, CPU time (ms)", f"1 thread, batch {b}", f"{a_ms:.1f}", f"{s_ms:.1f}",
                         f"{t_ms:.1f}", ratio(a_ms, s_ms), ratio(a_ms, t_ms)])
        for fusion in (True, False):
            for t in threads:
                for b in batches:
                    log(f"OpenCV latency, fusion {'on' if fusion else 'off'}, {t} thread(s), batch {b}")
                    a_ms, s_ms, t_ms = (statistics.median(x) for x in interleaved_latency(
                        nets, runtime="opencv", fusion=fusion, batch=b, threads=t, rounds=rounds, warmup=warmup))
                    rows.append([f"OpenCV forward (ms), fusion {'on' if fusion else 'off'}",
                                 f"{t} thread(s), batch {b}", f"{a_ms:.1f}", f"{s_ms:.1f}", f"{t_ms:.1f}",
                                 ratio(a_ms, s_ms), ratio(a_ms, t_ms)])
        profiles: dict[int, tuple[NetProfile, NetProfile, NetProfile]] = {}
        for b in batches:
            log(f"per-layer profile and memory, 1 thread, batch {b} (each net in its own process)")
            a, s, k = (profile_net(*net, batch=b, threads=1, rounds=rounds, warmup=warmup, clock="cpu")
                       for net in nets)
            profiles[b] = (a, s, k)

        def three(label: str, setting: str, values: Sequence[float], show: Callable[[float], str]) -> None:
            rows.append([label, setting, *(show(v) for v in values), ratio(values[0], values[1]),
                         ratio(values[0], values[2])])

        for b, trio in profiles.items():
            three("Caffe blobs + params (MiB)", f"batch {b}", [p.memory_bytes for p in trio], mib)
        for b, trio in profiles.items():
            three("process peak RSS (MiB)", f"batch {b}", [p.peak_rss_bytes for p in trio], mib)
        for b, trio in profiles.items():
            rows.append(["non-tensor share of Caffe CPU time", f"1 thread, batch {b}",
                         *(f"{100 * p.non_tensor_share:.1f}%" for p in trio), "", ""])
        three("MACs", "batch 1", [sum(c.macs for c in cost) for cost in costs], count)
        three("parameters", "", [sum(c.params for c in cost) for cost in costs], count)
        three("layers", "", [len(cost) for cost in costs], lambda n: f"{n:.0f}")

        first = min(profiles)
        trio = profiles[first]
        plot_by_type(list(trio), ["original", "slimmed", "slimmed+Tucker"], plot,
                     title=f"GoogLeNet in Caffe, CPU time per layer type (batch {first}, 1 thread)")
        per = [{t.type: t for t in p.by_type()} for p in trio]
        type_rows = []
        for layer_type in dict.fromkeys(t for p in per for t in p):
            found = [p.get(layer_type) for p in per]
            type_rows.append([layer_type, *(t.layers if t else 0 for t in found),
                              *(f"{t.ms:.2f}" if t else "0" for t in found)])
        type_rows.append(["total (sum of per-layer medians)", *(len(p.layers) for p in trio),
                          *(f"{p.total_ms:.2f}" for p in trio)])

    rules = ", ".join(f"{rule} x{n}" for rule, n in by_rule.items()) or "none fired"
    relearn = list(dict.fromkeys(report.relearn))
    text = "\n".join([
        "# Slimmed and slimmed+Tucker vs original BVLC GoogLeNet",
        "",
        (f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; {rounds} timed rounds "
         f"after {warmup} warm-up, medians; latency rounds interleaved (original, slimmed, original, ...) in one "
         "process per setting."),
        (f"Rewrite: `deeprebirth.api.rewrite_files` with default options (all rules) on random weights: {rules}. "
         f"Layers to re-learn: {len(relearn)}{' (' + ', '.join(relearn) + ')' if relearn else ''}."),
        (f"Slimmed+Tucker: the `deeprebirth+tucker` preset with rank method `{args.tucker_ranks}` on the same random "
         f"weights: the slimming above, then {decomposed} convolutions Tucker-2 decomposed (decompose_conv_tucker)."),
        ("Ratios are original/slimmed and original/slimmed+Tucker (above 1: faster or smaller). Memory and the "
         "per-type profile come from one process per net (1 thread). Latency is wall time; the CPU-time rows and "
         "the per-type profile use process CPU time, which stays the 1-thread latency while other processes share "
         f"the cores (load average at the start: {load}). Weights are random: speed and memory only."),
        "",
        markdown(["measure", "setting", "original", "slimmed", "slimmed+Tucker", "original/slimmed",
                  "original/slimmed+Tucker"], rows),
        "",
        f"Caffe CPU time per layer type (ms, batch {first}, 1 thread); plot: `{plot.name}`",
        "",
        markdown(["type", "layers (original)", "layers (slimmed)", "layers (slimmed+Tucker)", "original", "slimmed",
                  "slimmed+Tucker"], type_rows),
        "",
    ])
    atomic_write_bytes(out, text)
    print(text)
    log(f"wrote {out} and {plot} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
