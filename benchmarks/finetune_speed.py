"""Fine-tuning updates per minute, before/after, side by side in one run.

Three settings, the same slim net, data, rate and epochs:

* **before**: the old defaults: the original runs inside the train net as a frozen copy at every iteration
  (``cache_teacher=False``), batch 32;
* **cache**: the original's logits computed once per (image, view) and fed in
  (``deeprebirth.finetune.teacher_cache``), decoded images kept, in this process (``teacher_process=False``);
  still batch 32 (the cache's share alone);
* **ahead**: the same, with the views not cached yet run ahead in a second process on a spare core
  (``deeprebirth.finetune.teacher_process``; Caffe's BLAS in this process on the other cores); batch 32;
* **after**: the defaults: the cache, the second process, and the batch the pace rule (``driver.choose_batch``) picks for a user's
  ``--budget 7m`` on this machine, from the original's forward time measured here.

Nets: the Fashion-MNIST example's net (random weights), the BVLC GoogLeNet (random weights) and the real open_nsfw
ResNet-50, each slimmed by ``rewrite`` with the default rules. Data: ``--images`` random images at the net's input
size (the speed does not depend on what they show), random mirror (2 views per image), mimic mode, 6 epochs of
them, a fixed rate (no search) and no held-out data (no evaluations): the phase's time is its training. Rounds
alternate before/after; the ratio is the median of the rounds' ratios.

Every setting matches the logits only (``hints="off"``): the hints, on by default since 2026-12-06 where updates
are few, need the original's forward pass inside the train net at every iteration, so such a run pays the *before* column's
pace per image at the pace rule's batch (docs/decisions/hints.md weighs that against what a hinted update gains).

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
from deeprebirth.caffe.data import Transform
from deeprebirth.caffe.evaluate import NetIO
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.driver import choose_batch
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.ir.model import load_model

SETTINGS = {  # images, epochs: a few minutes per net on 2 cores
    "fashion_mnist": (1024, 6),
    "bvlc_googlenet": (96, 6),
    "open_nsfw": (96, 6),
}
OLD_BATCH = 32
USER_BUDGET = "7m"


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


def pace_batch(case: dict[str, str], images: int) -> tuple[int, str]:
    """The batch ``finetune --budget 7m`` picks for this net here (the original's forward per image, timed)."""
    import caffe

    net = caffe.Net(case["original"], caffe.TEST, weights=case["original_weights"])
    io = NetIO.of(load_model(case["original"]), case["original"])
    x = np.random.default_rng(1).random((8, io.channels, *io.size), dtype=np.float32)
    net.blobs[io.input].reshape(*x.shape)
    net.reshape()
    net.blobs[io.input].data[...] = x
    net.forward()
    started = time.perf_counter()
    net.forward()
    return choose_batch(None, Budget.parse(USER_BUDGET), images, (time.perf_counter() - started) / len(x))


def run(case: dict[str, str], folder: Path, tag: str, batch: int, epochs: int, cache: bool,
        ahead: bool) -> dict[str, float]:
    options = FinetuneOptions(mode="mimic", budget=f"{epochs}ep", batch=batch, holdout=0.0,
                              transform=Transform(scale=1 / 255, mirror=True), cache_teacher=cache,
                              teacher_process=ahead,
                              solver=SolverOptions("adam", lr=1e-4), patience=0, work_dir=folder / tag, hints="off")
    result = finetune_files(case["original"], case["original_weights"], case["slim"], case["slim_weights"],
                            case["report"], case["data"], folder / f"{tag}.caffemodel", options)
    step = result.steps[-1]
    return {"updates": step.iterations, "seconds": step.seconds, "per_minute": 60 * step.iterations / step.seconds,
            "images_per_second": step.iterations * batch / step.seconds, "batch": batch,
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
            images, epochs = SETTINGS[net]
            folder = Path(tmp) / net
            folder.mkdir()
            case = slim_case(net, folder, images)
            batch, rule = pace_batch(case, images)
            print(f"[{net}] the pace rule's batch for --budget {USER_BUDGET}: {rule}", file=sys.stderr, flush=True)
            raw[net] = []
            for k in range(args.rounds):
                measured = {}
                for name, cache, ahead, size in (("before", False, False, OLD_BATCH),
                                                 ("cache", True, False, OLD_BATCH), ("ahead", True, True, OLD_BATCH),
                                                 ("after", True, True, batch)):
                    started = time.perf_counter()
                    measured[name] = run(case, folder, f"{name}{k}", size, epochs, cache, ahead)
                    print(f"[{net}] round {k + 1}/{args.rounds} {name}: {measured[name]['per_minute']:.1f} updates/min "
                          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
                raw[net].append(measured)
            rounds = raw[net]

            def median(name: str, key: str = "per_minute", rounds: list[dict[str, dict[str, float]]] = rounds) -> float:
                return statistics.median(r[name][key] for r in rounds)

            cache_ratios = [r["cache"]["per_minute"] / r["before"]["per_minute"] for r in raw[net]]
            ahead_ratios = [r["ahead"]["per_minute"] / r["cache"]["per_minute"] for r in raw[net]]
            ratios = [r["after"]["per_minute"] / r["before"]["per_minute"] for r in raw[net]]
            reuse = raw[net][-1]["cache"]["reuse"]
            rows.append(f"| {net} | {images} x {epochs} epochs | {median('before'):.1f} "
                        f"({median('before', 'images_per_second'):.1f}) | {median('cache'):.1f} "
                        f"({median('cache', 'images_per_second'):.1f}) | {statistics.median(cache_ratios):.2f}x | "
                        f"{reuse:.0%} | {median('ahead'):.1f} | {statistics.median(ahead_ratios):.2f}x | {batch} | {median('after'):.1f} | {statistics.median(ratios):.2f}x "
                        f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    text = "\n".join([
        "# Fine-tuning updates per minute: the original's outputs cached, run ahead in a second process, or run in the train net",
        "",
        (f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}; "
         f"`benchmarks/finetune_speed.py --rounds {args.rounds}`; mimic mode, Adam 1e-4, random mirror, no held-out "
         "data; ratios are medians of the rounds' ratios."),
        "",
        ("| net | data | before: updates/min (images/s), batch 32 | cache: updates/min (images/s), batch 32 | "
         "cache / before | original's outputs reused | ahead: updates/min, batch 32 | ahead / cache | "
         "batch for --budget 7m | after: updates/min | after / before (per round) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
