"""Does slimming pay on the runtimes apps ship? BVLC GoogLeNet original vs slimmed (``rewrite`` defaults) vs
slimmed+Tucker (all rules + Tucker ``speedup:2``) vs ``rewrite --runtime mnn --min-gain 1`` (only the lossy merges
that pay on MNN), and open_nsfw original vs its exact folds, on every runtime: real Caffe, OpenCV dnn, ONNX Runtime,
MNN and ncnn; 1 thread, batch 1, random weights for GoogLeNet (real ones for open_nsfw).

Latency: per runtime, all nets of a model loaded in one worker and run in interleaved rounds (A B C D A B C D ...),
medians of process CPU time (1 thread: on this shared machine the CPU clock is the steadier measure of latency).
Agreement: each exported model against real Caffe on 5 real photos + 2 random inputs (``export --check``): the worst
``max|a-b| / max|a|`` on the logits and the number of photos whose top-1 changed.

    .venv/bin/python benchmarks/runtimes.py [--rounds 15] [--out benchmarks/results/runtimes.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.export.api import ExportOptions, export_files
from deeprebirth.io.caffe_io import atomic_write_bytes, set_batch
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model, save_model
from deeprebirth.ir.shapes import layer_costs
from deeprebirth.measure.latency import latency

RUNTIMES = ("caffe", "opencv", "onnxruntime", "mnn", "ncnn")
EXPORTS = {"onnxruntime": "onnx", "mnn": "mnn", "ncnn": "ncnn"}


def log(message: str) -> None:
    print(f"[runtimes] {message}", file=sys.stderr, flush=True)


def assets() -> dict[str, str]:
    return json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))


def photos(folder: Path) -> list[str]:
    import cv2
    from skimage import data

    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        image = getattr(data, name)()
        image = image[..., None].repeat(3, axis=2) if image.ndim == 2 else image
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), image[..., :3][..., ::-1])
        paths.append(str(path))
    return paths


def googlenet_variants(folder: Path) -> dict[str, tuple[str, str]]:
    zoo = Path(assets()["model_zoo"])
    graph = load_model(zoo / "bvlc_googlenet" / "deploy.prototxt")
    set_batch(graph, 1)
    random_weights(graph, seed=3)
    original = str(folder / "original.prototxt"), str(folder / "original.caffemodel")
    save_model(graph, *original)
    nets = {"original": original}
    for label, options in (("slimmed", RewriteOptions()),
                           ("slimmed+Tucker", RewriteOptions(rules="all,tucker", rank_method="speedup:2")),
                           ("slimmed for MNN", RewriteOptions(runtime="mnn", min_gain=1.0, runtime_rounds=8))):
        stem = label.replace("+", "_").replace(" ", "_")
        out = str(folder / f"{stem}.prototxt"), str(folder / f"{stem}.caffemodel")
        started = time.perf_counter()
        result = rewrite_files(original[0], out[0], original[1], out[1], options=options)
        lossy = sum(not c.exact for c in result.report.changes)
        log(f"{label}: {lossy} lossy merges ({time.perf_counter() - started:.0f} s)")
        nets[label] = out
    return nets


def nsfw_variants(folder: Path) -> dict[str, tuple[str, str]]:
    found = assets()
    original = found["open_nsfw.prototxt"], found["open_nsfw.caffemodel"]
    folded = str(folder / "nsfw_folded.prototxt"), str(folder / "nsfw_folded.caffemodel")
    rewrite_files(original[0], folded[0], original[1], folded[1], options=RewriteOptions(rules="exact"))
    return {"original": original, "exact folds": folded}


def logits(prototxt: str) -> list[str]:
    from deeprebirth.caffe.compare import compared_blobs

    return compared_blobs(load_model(prototxt))


def agreement(nets: dict[str, tuple[str, str]], images: list[str], folder: Path) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    for label, (proto, weights) in nets.items():
        rows[label] = {}
        for runtime, fmt in EXPORTS.items():
            out = folder / f"check_{len(rows)}_{fmt}{'' if fmt == 'ncnn' else '.' + fmt}"
            result = export_files(proto, weights, out, ExportOptions(to=fmt, batch=1, outputs=logits(proto), check=2,
                                                                     images=images, tolerance=1.0))
            check = result.check
            assert check is not None
            first = check.diffs[0]
            rows[label][runtime] = f"{first.max_rel:.1e}, {check.predictions_changed} changed"
    return rows


def timings(nets: dict[str, tuple[str, str]], rounds: int) -> dict[str, list[float]]:
    medians: dict[str, list[float]] = {}
    for runtime in RUNTIMES:
        started = time.perf_counter()
        times = latency(list(nets.values()), runtime, batch=1, threads=1, rounds=rounds, warmup=3, clock="cpu")
        medians[runtime] = [statistics.median(t) for t in times]
        log(f"{runtime}: {', '.join(f'{m:.1f}' for m in medians[runtime])} ms ({time.perf_counter() - started:.0f} s)")
    return medians


def table(title: str, labels: list[str], medians: dict[str, list[float]]) -> list[str]:
    head = ["runtime (1 thread, batch 1, CPU ms)", *labels, *(f"{labels[0]} / {label}" for label in labels[1:])]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for runtime, values in medians.items():
        ratios = [f"{values[0] / v:.2f}x" for v in values[1:]]
        lines.append("| " + " | ".join([runtime, *(f"{v:.1f}" for v in values), *ratios]) + " |")
    return lines + [""]


def plot(labels: list[str], medians: dict[str, list[float]], path: Path) -> None:
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    runtimes = list(medians)
    x = np.arange(len(runtimes))
    width = 0.8 / (len(labels) - 1)
    for k, label in enumerate(labels[1:]):
        values = [medians[r][0] / medians[r][k + 1] for r in runtimes]
        bars = ax.bar(x + (k - (len(labels) - 2) / 2) * width, values, width, label=f"original / {label}")
        ax.bar_label(bars, fmt="%.2fx", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, runtimes)
    ax.set_ylabel("speed-up over the original (median latency ratio)")
    ax.set_title("BVLC GoogLeNet, 1 thread, batch 1: speed-up of the slimmed nets per runtime")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtimes.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeprebirth-bench-") as tmp:
        folder = Path(tmp)
        images = photos(folder)
        google = googlenet_variants(folder)
        nsfw = nsfw_variants(folder)
        macs = {label: sum(c.macs for c in layer_costs(load_model(p))) / 1e9 for label, (p, _) in google.items()}
        lossy = {label: sum(1 for layer in load_model(p).layers() if layer.name.endswith("_merge"))
                 for label, (p, _) in google.items()}
        google_ms, nsfw_ms = timings(google, args.rounds), timings(nsfw, args.rounds)
        google_ok, nsfw_ok = agreement(google, images, folder), agreement(nsfw, images, folder)
    labels = list(google)
    lines = ["# Runtimes: does slimming pay where apps run the model?", "",
             (f"`benchmarks/runtimes.py --rounds {args.rounds}`: {args.rounds} interleaved rounds after 3 warm-up, "
             "medians of process CPU time, 1 thread, batch 1, this shared 2-core x86 machine. MNN `precision: high`, "
             "ncnn fp16 off, ORT default graph optimizations, OpenCV fusion on."), ""]
    lines += table("BVLC GoogLeNet (random weights)", labels, google_ms)
    lines += ["GoogLeNet MACs: " + ", ".join(f"{label} {macs[label]:.2f} G" for label in labels)
              + "; `_merge` layers (re-learned): " + ", ".join(f"{label} {lossy[label]}" for label in labels), ""]
    lines += table("open_nsfw (ResNet-50-1by2, real weights): exact folds only", list(nsfw), nsfw_ms)
    lines += [("**Agreement with real Caffe** (worst max|a-b|/max|a| on the logits over 5 photos + 2 random inputs, "
              "and how many top-1 predictions changed)"), "",
              "| net | " + " | ".join(EXPORTS) + " |", "|---|" + "---|" * len(EXPORTS)]
    for model, rows in (("GoogLeNet", google_ok), ("open_nsfw", nsfw_ok)):
        for label, row in rows.items():
            lines.append(f"| {model} {label} | " + " | ".join(row[r] for r in EXPORTS) + " |")
    lines.append("")
    out = Path(args.out)
    atomic_write_bytes(out, "\n".join(lines))
    plot(labels, google_ms, out.with_suffix(".png"))
    atomic_write_bytes(out.with_suffix(".json"), json.dumps({"googlenet_ms": google_ms, "nsfw_ms": nsfw_ms,
                                                            "labels": labels, "macs_g": macs}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
