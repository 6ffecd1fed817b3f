"""Blends of two training images in mimic mode (``--mixup``, issue 16): when, what a blend is, and a run with them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deeprebirth.caffe.data import Batches, DataSet, Transform
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.options import check_options
from deeprebirth.finetune.teacher_cache import BLEND_SHARE, choose_blends, passes_bought
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.finetune.trainer import blend_views


def test_blends_are_asked_for_and_only_without_labels() -> None:
    assert passes_bought(Budget.parse("13ep"), 900, 0.01, 32) == 13
    assert passes_bought(Budget.parse("4000it"), 888, 0.01, 32) == pytest.approx(4000 * 32 / 888)
    assert choose_blends("on") == (BLEND_SHARE, "50% of each batch blends two images")
    assert choose_blends("off") == (0.0, "")
    assert FinetuneOptions().mixup == "off"
    with pytest.raises(DeepRebirthError, match="--mixup on needs --mode mimic"):
        check_options(FinetuneOptions(mode="label", mixup="on"))  # a blend has no label


def test_a_blend_is_a_fixed_mix_of_two_training_views() -> None:
    rng = np.random.default_rng(3)
    photos = DataSet("memory", 3, (10, 10), np.zeros(6, dtype=np.int64),
                     array=rng.integers(0, 255, (6, 3, 10, 10)).astype(np.float32))
    train = Batches(photos, Transform(crop=8, mirror=True), (8, 8), bank_seed=5)
    pool = np.array([1, 2, 4])  # the training images (held-out ones are never blended in)
    indices, blends = np.array([1, 1, 2, 4]), np.array([0, 0, 3, 7])
    x = blend_views(train, pool, 0, indices, blends)
    assert x.shape == (4, 3, 8, 8) and np.array_equal(x[0], x[1])  # the same (image, blend): the same input
    assert np.array_equal(x, blend_views(train, pool, 0, indices, blends))
    assert not np.array_equal(x, blend_views(train, pool, 1, indices, blends))  # another seed, other blends
    # each blend is s * (a view of its image) + (1 - s) * (a view of a training image), s in [0, 1]
    every = [(j, v) for j in pool for v in range(train.views)]
    views = train.view_batch([j for j, _ in every], [v for _, v in every]).reshape(len(every), -1)
    own = {int(i): views[[k for k, (j, _) in enumerate(every) if j == i]] for i in pool}
    for row, i in zip(x.reshape(4, -1), indices):
        found = False
        for a in own[int(i)]:
            d = views - a  # row - a = (1 - s) (b - a) for some view b
            share = np.clip(np.einsum("kp,p->k", d, row - a) / np.maximum(np.einsum("kp,kp->k", d, d), 1e-9), 0, 1)
            residual = np.abs(a + share[:, None] * d - row).max(axis=1)
            found = found or bool(residual.min() < 1e-3)
        assert found


def test_a_run_with_blends_caches_the_originals_outputs_on_them(finetune_nets: dict[str, str],
                                                               tmp_path: Path) -> None:
    options = FinetuneOptions(budget="60ep", batch=16, transform=Transform(scale=1 / 255, mirror=True),
                              holdout=0.25, mode="mimic", solver=SolverOptions("adam", lr=1e-3), hints="off",
                              mixup="on")
    paths = [finetune_nets[k] for k in ("original", "original_weights", "slim", "slim_weights", "report", "data")]
    blended = finetune_files(*paths, tmp_path / "blended.caffemodel", options)
    assert blended.views_rule == "50% of each batch blends two images"  # no random crop: no bank to describe
    plain = finetune_files(*paths, tmp_path / "plain.caffemodel", replace(options, mixup="off"))
    assert "blends" not in plain.views_rule
    # 72 training images x 2 views: the plain run's original sees at most 144 inputs; blends add up to 144 more
    reuse_blended, reuse_plain = blended.steps[-1].teacher_reuse, plain.steps[-1].teacher_reuse
    assert reuse_blended is not None and reuse_plain is not None
    drawn = blended.steps[-1].iterations * 16
    assert 144 / drawn < 1 - reuse_blended <= 288 / drawn + 1e-9 and 1 - reuse_plain <= 144 / drawn + 1e-9


def test_blends_reach_an_original_that_runs_inside_the_train_net(finetune_nets: dict[str, str],
                                                                 tmp_path: Path) -> None:
    """With hints the original runs inside the train net on the same input blob: it sees the blends too."""
    options = FinetuneOptions(budget="3ep", batch=16, transform=Transform(scale=1 / 255, mirror=True), holdout=0.25,
                              mode="mimic", solver=SolverOptions("adam", lr=1e-3), hints="on", mixup="on", patience=0)
    paths = [finetune_nets[k] for k in ("original", "original_weights", "slim", "slim_weights", "report", "data")]
    blended = finetune_files(*paths, tmp_path / "blended.caffemodel", options)
    plain = finetune_files(*paths, tmp_path / "plain.caffemodel", replace(options, mixup="off"))
    assert blended.steps[-1].teacher_reuse is None and blended.steps[-1].loss.endswith("hints")
    assert "blends two images" in blended.views_rule
    # the same seed, data, solver and start: only the blends can make the training losses differ
    assert blended.steps[-1].loss_start != pytest.approx(plain.steps[-1].loss_start, rel=1e-6)
