"""Held-out metrics of a phase's student against the original, on a fixed set of images.

Metrics, from a TEST-phase copy of the student that shares the train net's weights and the original net run beside
it: top-1 (with labels), top-1 agreement with the original, the distillation loss at the phase's temperature, the
relative squared error of the logits ("error at the output") and at the blobs the phase compares.

Besides the means, every evaluation keeps a **per-image search score** (``Evaluator.scores``), on one scale for
every loss the search may try: ``(1 - w) · CE + w · KL₁`` with labels, ``KL₁`` without (KL₁: the distillation loss
at T = 1, whose minimum is the original's top-1 itself), or the per-image relative error at the compared blob for a
layer-wise step that does not reach the logits. Candidates evaluated on the same images are then compared image by
image (``deeprebirth.finetune.search``), which removes most of the held-out sampling noise from the comparison.
Losses are compared on per-image top-1 misses instead (``Evaluator.misses``: of the label, or of the original's
top-1 without labels): a smooth score such as KL₁ is itself one of the losses and would favour it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from deeprebirth.caffe.evaluate import set_input
from deeprebirth.finetune.losses import distillation_losses, softmax
from deeprebirth.finetune.phase_types import PhaseData, PhaseSpec


class Evaluator:
    """Held-out metrics on ``indices``. The original's outputs are computed once (kept within the cache)."""

    def __init__(self, spec: PhaseSpec, data: PhaseData, indices: np.ndarray) -> None:
        self.spec, self.data, self.indices = spec, data, indices
        assert data.val is not None
        self.val = data.val
        self.labels = self.val.labels(indices) if self.val.data.labels is not None else None
        blobs = [spec.teacher_logits] + [original for _, original in spec.compare.values()]
        self.teacher_blobs = list(dict.fromkeys(blobs))
        self.chunks = [indices[i:i + data.batch] for i in range(0, len(indices), data.batch)]
        self.cached: list[dict[str, np.ndarray]] | None = None
        self.cache_ok = True
        self.teacher_seconds = 0.0  # spent running the original (once, while its outputs fit the cache)
        self.scores = np.zeros(len(indices))  # the last evaluation's per-image search scores
        self.misses = np.zeros(len(indices))  # ... and top-1 misses (of the label, else of the original's top-1)
        self.values = np.zeros(len(indices))  # ... and what ``score`` averages, per image (checkpoints compare them)

    def _teacher(self, k: int, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.cached is not None and k < len(self.cached):
            return self.cached[k]
        started = time.monotonic()
        out = self.data.teacher.outputs(x, self.teacher_blobs)
        self.teacher_seconds += time.monotonic() - started
        if self.cache_ok:
            self.cached = self.cached or []
            self.cached.append(out)
            size = sum(a.nbytes for chunk in self.cached for a in chunk.values())
            if size > self.data.cache_bytes:
                self.cached, self.cache_ok = None, False
        return out

    def __call__(self, net: Any) -> dict[str, float]:
        spec = self.spec
        logits, teacher_logits = [], []
        per_image: dict[str, list[np.ndarray]] = {name: [] for name in spec.compare}  # squared error per image
        sums = {name: np.zeros(2) for name in spec.compare}  # sum and sum of squares of the target
        counts = dict.fromkeys(spec.compare, 0)
        for k, chunk in enumerate(self.chunks):
            x = self.val.batch(chunk)
            set_input(net, self.data.input, x)
            net.forward()
            target = self._teacher(k, x)
            if spec.logits is not None:
                logits.append(np.array(net.blobs[spec.logits].data, dtype=np.float64).reshape(len(chunk), -1))
            teacher_logits.append(target[spec.teacher_logits].astype(np.float64).reshape(len(chunk), -1))
            for name, (blob, original) in spec.compare.items():
                a = np.asarray(net.blobs[blob].data, dtype=np.float64).reshape(len(chunk), -1)
                b = target[original].astype(np.float64).reshape(len(chunk), -1)
                per_image[name].append(np.sum((a - b) ** 2, axis=1))
                sums[name] += (float(np.sum(b)), float(np.sum(b * b)))
                counts[name] += b.size
        metrics: dict[str, float] = {}
        errors: dict[str, np.ndarray] = {}
        for name, (total, squares) in sums.items():
            mean = total / counts[name]
            elements = counts[name] / len(self.indices)
            errors[name] = np.concatenate(per_image[name]) / elements / max(squares / counts[name] - mean ** 2, 1e-12)
            metrics[f"{name}_error"] = float(np.mean(errors[name]))
        scores = errors.get(spec.objective)
        if spec.logits is not None:
            z, t = np.concatenate(logits), np.concatenate(teacher_logits)
            kd = distillation_losses(z, t, spec.temperature)
            metrics["kd"] = float(np.mean(kd))
            kl1 = distillation_losses(z, t, 1.0)
            metrics["kd1"] = float(np.mean(kl1))
            metrics["agreement"] = float(np.mean(z.argmax(1) == t.argmax(1)))
            self.misses = (z.argmax(1) != t.argmax(1)).astype(np.float64)
            metrics["output_error"] = float(np.mean((z - t) ** 2) / max(float(np.var(t)), 1e-12))
            if spec.objective in ("label", "kd"):
                scores = kl1
            if self.labels is not None:
                metrics["accuracy"] = float(np.mean(z.argmax(1) == self.labels))
                self.misses = (z.argmax(1) != self.labels).astype(np.float64)
                ce = -np.log(softmax(z)[np.arange(len(z)), self.labels] + 1e-12)
                metrics["ce"] = float(np.mean(ce))
                if spec.objective == "label":
                    scores = (1 - spec.kd_weight) * ce + spec.kd_weight * kl1
        self.scores = np.nan_to_num(scores if scores is not None else np.zeros(len(self.indices)), nan=np.inf)
        if spec.objective == "label" and self.labels is not None:
            values = self.misses
        elif spec.objective in ("label", "kd") and spec.logits is not None:
            values = kd
        else:
            values = errors.get(spec.objective, np.zeros(len(self.indices)))
        self.values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=np.inf)
        metrics["search_score"] = float(np.mean(self.scores))
        metrics["loss"] = self.loss(metrics)
        return metrics

    def loss(self, metrics: dict[str, float]) -> float:
        """The phase's objective on held-out data (lower is better)."""
        spec = self.spec
        if spec.objective == "label" and "ce" in metrics:
            return (1 - spec.kd_weight) * metrics["ce"] + spec.kd_weight * metrics["kd"]
        if spec.objective in ("label", "kd") and "kd" in metrics:
            return metrics["kd"]
        return metrics.get(f"{spec.objective}_error", float("nan"))

    def score(self, metrics: dict[str, float]) -> float:
        """What picks the kept checkpoint (lower is better): top-1 where labels train, else the objective (measured
        the same way whichever loss trained); ``values`` holds it per image."""
        if self.spec.objective == "label" and "accuracy" in metrics:
            return -metrics["accuracy"] + 1e-6 * metrics["loss"]
        return metrics["loss"]
