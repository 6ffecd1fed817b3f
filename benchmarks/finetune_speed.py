"""Fine-tuning updates per minute, before/after the original's outputs are cached, side by side in one run.

Before: the original runs inside the train net as a frozen copy at every iteration (``cache_teacher=False``, how
fine-tuning worked until issue 16). After: its logits are computed once per (image, view) and fed in
(``deeprebirth.finetune.teacher_cache``), and decoded images are kept. Same slim net, data, batch, rate, budget.

Nets: the Fashion-MNIST example's net (random weights), the BVLC GoogLeNet (random weights) and the real open_nsfw
ResNet-50, each slimmed by ``rewrite`` with the default rules. Data: ``--images`` random images at the net's input
size (the speed does not depend on what they show), random mirror (2 views per image), mimic mode, ``--epochs`` of
them, a fixed rate (no search) and no held-out data (no evaluations): the phase's time is its training. Rounds
alternate before/after; the ratio is the median of the rounds' ratios.

    .venv/bin/python benchmarks/finetune_speed.py [--nets fashion_mnist,bvlc_googlenet,open_nsfw] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
from golden.record import prepare

from deeprebirth.api import rewrite_files
from deeprebirth.data import Transform
from deeprebirth.evaluate import NetIO
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.model import load_model
from deeprebirth.train import SolverOptions

SETTINGS = {  # images, batch, epochs: a few minutes per net on 2 cores
    "fashion_mnist": (512, 32, 6),
    "bvlc_googlenet": (48, 8, 6),
    "open_nsfw": (48, 8, 6),
}


def slim_case(net: str, folder: Path, images: int) -> dict[str, str]:
    proto, model = prepare(net, folder)
    slim = {"slim": str(folder / f"{net}_slim.prototxt"), "slim_weights": str(folder / f"{net}_slim.caffemodel"),
            "report": str(folder / f"{net}_slim.json")}
    rewrite_files(proto, slim["slim"], model, slim["slim_weights"], slim["report"])
    io = NetIO.of(load_model(proto), proto)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, *io.size, io.channels), dtype=np.uint8)
    data = folder / f"{net}_data.npz"
    np.savez(data, x=x)
    return {"original": proto, "original_weights": model, "data": str(data), **slim}


def run(case: dict[str, str], folder: Path, tag: str, batch: int, epochs: int, cache: bool) -> dict[str, float]:
    options = FinetuneOptions(mode="mimic", budget=f"{epochs}ep", batch=batch, holdout=0.0,
                              transform=Transform(scale=1 / 255, mirror=True), cache_teacher=cache,
                              solver=SolverOptions("adam", lr=1e-4), patience=0, work_dir=folder / tag)
    result = finetune_files(case["original"], case["original_weights"], case["slim"], case["slim_weights"],
                            case["report"], case["data"], folder / f"{tag}.caffemodel", options)
    step = result.steps[-1]
    return {"updates": step.iterations, "seconds": step.seconds, "per_minute": 60 * step.iterations / step.seconds,
            "images_per_second": step.iterations * batch / step.seconds,
            "reuse": step.teacher_reuse if step.teacher_reuse is not None else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=",".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_speed.md")
    args = parser.parse_args()
    rows = []
    raw: dict[str, list[dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="deeprebirth-ftspeed-") as tmp:
        for net in args.nets.split(","):
            images, batch, epochs = SETTINGS[net]
            folder = Path(tmp) / net
            folder.mkdir()
            case = slim_case(net, folder, images)
            raw[net] = []
            for k in range(args.rounds):
                measured = {}
                for name, cache in (("before", False), ("after", True)):
                    started = time.perf_counter()
                    measured[name] = run(case, folder, f"{name}{k}", batch, epochs, cache)
                    print(f"[{net}] round {k + 1}/{args.rounds} {name}: {measured[name]['per_minute']:.1f} updates/min "
                          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
                raw[net].append(measured)
            ratios = [r["after"]["per_minute"] / r["before"]["per_minute"] for r in raw[net]]
            before = statistics.median(r["before"]["per_minute"] for r in raw[net])
            after = statistics.median(r["after"]["per_minute"] for r in raw[net])
            reuse = raw[net][-1]["after"]["reuse"]
            rows.append(f"| {net} | {images} x {epochs} epochs, batch {batch} | {before:.1f} | {after:.1f} | "
                        f"{statistics.median(ratios):.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} | {reuse:.0%} |")
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    text = "\n".join([
        "# Fine-tuning updates per minute: the original's outputs cached (after) or run in the train net (before)",
        "",
        (f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}; "
         f"`benchmarks/finetune_speed.py --rounds {args.rounds}`; mimic mode, Adam 1e-4, random mirror, no held-out "
         "data."),
        "",
        ("| net | data | before (updates/min) | after (updates/min) | after / before (median) | per round | "
         "original's outputs reused |"),
        "|---|---|---|---|---|---|---|",
        *rows, ""])
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
