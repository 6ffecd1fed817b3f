"""The original net's outputs, computed once per (image, view) and reused: an iteration then runs only the student.

Distillation needs the original's logits for exactly the augmented image the student sees. Training batches draw
each image in one of a finite set of fixed views (``data.Batches.view_batch``: mirror x a bank of crops), so the
logits of an (image, view) pair never change: the first time a pair comes up the original runs on it, afterwards
its logits come from memory. Logits are small (classes x 4 bytes), so even 1,000 classes x 8 views x 10,000 images
fit in a few hundred MB; past ``cache_bytes`` new pairs are computed every time (nothing is evicted).

How many views: ``choose_crop_bank`` weighs the reuse against showing the student the same few crops too often.
With ``--mixup on`` an image also has as many fixed blends with other training images (``choose_blends``), keyed
past its views.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from deeprebirth.caffe.data import CROP_BANK, Batches
from deeprebirth.finetune.budget import EVAL_SHARE, Budget
from deeprebirth.finetune.search import SEARCH_SHARE
from deeprebirth.finetune.teacher_process import ProcessLost, TeacherProcess, blas_threads, spare_cores

READS_PER_VIEW = 4  # a fixed training view is read about this often before the crop bank grows instead
BLEND_SHARE = 0.5  # of each training batch, with ``--mixup on``


class TeacherCache:
    """``logits(indices, views, x)``: the original's ``blob`` for each image of batch ``x``. With a ``process``
    (``teacher_process.TeacherProcess``), ``prefetch`` hands the next batch's new views to it ahead of time."""

    def __init__(self, teacher: Any, blob: str, cache_bytes: float, process: TeacherProcess | None = None) -> None:
        self.teacher, self.blob, self.cache_bytes, self.process = teacher, blob, cache_bytes, process
        self.stored: dict[tuple[int, int], np.ndarray] = {}
        self.stored_bytes = 0
        self.pending: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (ticket, row of its request)
        self.computed = 0  # images the original ran on
        self.reused = 0  # images served from memory

    def ahead(self) -> AbstractContextManager[None]:
        """Around a phase that reads the cache: with the second process running, the student keeps every core but
        its one (Caffe's BLAS threads)."""
        return blas_threads(spare_cores()) if self.process is not None else nullcontext()

    def _fresh(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """The batch's keys the original has not run on yet -> their first position in the batch."""
        fresh: dict[tuple[int, int], int] = {}
        for k, key in enumerate(keys):
            if key not in self.stored and key not in self.pending and key not in fresh:
                fresh[key] = k
        return fresh

    def _keep(self, key: tuple[int, int], row: np.ndarray, computed: dict[tuple[int, int], np.ndarray]) -> None:
        computed[key] = row
        if self.stored_bytes + row.nbytes <= self.cache_bytes:
            self.stored[key] = row
            self.stored_bytes += row.nbytes

    def prefetch(self, indices: np.ndarray, views: np.ndarray, x: np.ndarray) -> None:
        """Start the original on the views of the coming batch that ``logits`` would have to compute, as the one
        batch it would compute them in."""
        if self.process is None or not self.process.alive:
            return
        fresh = self._fresh(list(zip(np.asarray(indices).tolist(), np.asarray(views).tolist())))
        if not fresh:
            return
        rows = list(fresh.values())
        try:
            ticket = self.process.submit(x[rows])
        except ProcessLost:  # computed here from now on
            self._recompute_pending()
            return
        self.computed += len(rows)
        for position, key in enumerate(fresh):
            self.pending[key] = (ticket, position)

    def logits(self, indices: np.ndarray, views: np.ndarray, x: np.ndarray) -> np.ndarray:
        keys = list(zip(np.asarray(indices).tolist(), np.asarray(views).tolist()))
        computed: dict[tuple[int, int], np.ndarray] = {}
        self._take_pending(keys, computed)
        delivered = sum(1 for key in set(keys) if key in computed)  # by the second process, counted when asked
        fresh = self._fresh(keys)
        if fresh:
            rows = list(fresh.values())
            out = self.teacher.outputs(x[rows], [self.blob])[self.blob]
            self.computed += len(rows)
            for key, row in zip(fresh, out):
                self._keep(key, row, computed)
        self.reused += len(keys) - len(fresh) - delivered
        return np.stack([self.stored[key] if key in self.stored else computed[key] for key in keys])

    def _take_pending(self, keys: list[tuple[int, int]], computed: dict[tuple[int, int], np.ndarray]) -> None:
        """Move the second process's results for ``keys`` (and whatever else its requests carried) into memory."""
        tickets = sorted({self.pending[key][0] for key in keys if key in self.pending})
        for ticket in tickets:
            assert self.process is not None  # pending results imply a process (``_recompute_pending``)
            try:
                out = self.process.result(ticket)
            except ProcessLost:
                self._recompute_pending()
                return
            for key, (owner, row) in list(self.pending.items()):
                if owner == ticket:
                    del self.pending[key]
                    self._keep(key, out[row], computed)

    def _recompute_pending(self) -> None:
        """The second process is gone: what it was asked for is computed in-process when it comes up."""
        self.computed -= len(self.pending)
        self.pending.clear()
        self.process = None


def training_seconds_per_image(student: float, original: float, ahead: bool = False) -> float:
    """A training iteration's seconds per image once views repeat: the student's forward and backward (about
    three forwards) and the original's forward for the share of views not yet cached (``1 / READS_PER_VIEW``);
    ``ahead``: that forward runs in a second process meanwhile (``teacher_process``), so the slower of the two."""
    if ahead:
        return max(3 * student, original / READS_PER_VIEW)
    return 3 * student + original / READS_PER_VIEW


def choose_crop_bank(train: Batches, budget: Budget, images: int, seconds_per_training_image: float,
                     batch: int) -> tuple[int, str]:
    """How many crops per image the training views draw from, and the rule's words. A bank of a few crops lets the
    original's outputs be computed once per view and reused, but over many passes the student then sees each fixed
    view again and again and learns those views rather than the images (docs/decisions/crop-bank.md). So
    the bank grows with the passes the budget buys (its iterations x batch / images; for time, the training part of
    the budget over ``seconds_per_training_image``) until each view is read about ``READS_PER_VIEW`` times:
    ``ceil(passes / (mirrors x READS_PER_VIEW))`` crops, at least ``CROP_BANK``, at most every crop position."""
    if not train.random_crop:
        return 1, ""
    mirrors = 2 if train.transform.mirror else 1
    passes = passes_bought(budget, images, seconds_per_training_image, batch)
    wanted = max(CROP_BANK, math.ceil(passes / (mirrors * READS_PER_VIEW)))
    crops = min(wanted, train.crop_positions)
    reads = passes / (mirrors * crops)
    return crops, (f"{crops} of {train.crop_positions} crop positions per image{' x mirror' if mirrors == 2 else ''}"
                   f": about {passes:.0f} passes over {images} images, each view read about {reads:.1f} times")


def passes_bought(budget: Budget, images: int, seconds_per_training_image: float, batch: int) -> float:
    """Passes over the training images the budget buys: epochs as given, iterations x batch / images, or the
    training part of a time budget over ``seconds_per_training_image``."""
    if budget.timed:
        return budget.amount * (1 - SEARCH_SHARE - EVAL_SHARE) / (seconds_per_training_image * max(images, 1))
    if budget.unit == "ep":
        return budget.amount
    return budget.amount * batch / max(images, 1)


def choose_blends(setting: str) -> tuple[float, str]:
    """``--mixup``: the share of each training batch that blends two images (``trainer.blend_views``), and the
    words for the report. Without labels the student learns the original only on the training images; over many
    passes it learns those few, and a blend shows it the original between them (the original's output on a blend is
    not a mix of its outputs on the two). Measured: closer to the original's outputs, not better top-1 against
    labels (docs/decisions/blends.md), so it is asked for, not automatic."""
    if setting != "on":
        return 0.0, ""
    return BLEND_SHARE, f"{BLEND_SHARE:.0%} of each batch blends two images"
