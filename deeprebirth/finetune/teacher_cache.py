"""The original net's outputs, computed once per (image, view) and reused: an iteration then runs only the student.

Distillation needs the original's logits for exactly the augmented image the student sees. Training batches draw
each image in one of a finite set of fixed views (``data.Batches.view_batch``: mirror x a bank of crops), so the
logits of an (image, view) pair never change: the first time a pair comes up the original runs on it, afterwards
its logits come from memory. Logits are small (classes x 4 bytes), so even 1,000 classes x 8 views x 10,000 images
fit in a few hundred MB; past ``cache_bytes`` new pairs are computed every time (nothing is evicted).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TeacherCache:
    """``logits(indices, views, x)``: the original's ``blob`` for each image of batch ``x``."""

    def __init__(self, teacher: Any, blob: str, cache_bytes: float) -> None:
        self.teacher, self.blob, self.cache_bytes = teacher, blob, cache_bytes
        self.stored: dict[tuple[int, int], np.ndarray] = {}
        self.stored_bytes = 0
        self.computed = 0  # images the original ran on
        self.reused = 0  # images served from memory

    def logits(self, indices: np.ndarray, views: np.ndarray, x: np.ndarray) -> np.ndarray:
        keys = list(zip(np.asarray(indices).tolist(), np.asarray(views).tolist()))
        fresh: dict[tuple[int, int], int] = {}  # key -> its first position in the batch
        for k, key in enumerate(keys):
            if key not in self.stored and key not in fresh:
                fresh[key] = k
        computed: dict[tuple[int, int], np.ndarray] = {}
        if fresh:
            rows = list(fresh.values())
            out = self.teacher.outputs(x[rows], [self.blob])[self.blob]
            self.computed += len(rows)
            for key, row in zip(fresh, out):
                computed[key] = row
                if self.stored_bytes + row.nbytes <= self.cache_bytes:
                    self.stored[key] = row
                    self.stored_bytes += row.nbytes
        self.reused += len(keys) - len(fresh)
        return np.stack([self.stored[key] if key in self.stored else computed[key] for key in keys])
