"""A solver over a phase's train net, fed with augmented batches (``Trainer``), and the nets around it.

Every trainer of a phase reads the training images in the same order and with the same augmentations (its
``start`` says where in that order it begins): the learning-rate probes then differ only in what they are
testing, and a trainer that goes on from a probe reads the images that come next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.data import Batches
from deeprebirth.caffe.runtime import import_caffe
from deeprebirth.finetune.phase_types import PhaseData, PhaseSpec, Weights
from deeprebirth.finetune.train import SolverOptions, load_params, make_solver, relative_steps
from deeprebirth.io import caffe_io


class Trainer:
    """Caffe's solver for ``spec.train_net`` with ``options`` over ``iterations`` (the poly horizon)."""

    def __init__(self, spec: PhaseSpec, data: PhaseData, options: SolverOptions, iterations: int, tag: str,
                 init: Callable[[str], list[np.ndarray]] | None = None, start: int = 0) -> None:
        self.spec, self.data = spec, data
        # Caffe's own seed (Dropout, the fillers) is the run's --seed, as in the phase's exported solver
        self.options, self.tag, self.seed = options, tag, data.seed
        self.train_net = relative_steps(spec.train_net, spec.learned, init or spec.init, options.solver)
        self.solver = make_solver(data.work, tag, self.train_net, options, iterations, self.seed)
        self.net = self.solver.net
        load_params(self.net, init or spec.init)
        rng = np.random.default_rng([data.seed, spec.index])
        self.order = (data.train_indices[rng.permutation(len(data.train_indices))] if data.shuffle
                      else data.train_indices)
        self.views = data.train.views
        self.start = start  # batches of the common order already read (by a probe this one goes on from)
        self.done = 0
        self.upcoming: tuple[int, tuple[np.ndarray, np.ndarray | None, np.ndarray]] | None = None
        self.images_seconds = 0.0  # spent in the student's solver steps

    def _rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.data.seed, self.spec.index, position])

    def _batch(self, position: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Batch ``position`` of the common order: its images, their views (cached teacher: the keys of its outputs;
        a blend is keyed past the views) and the input array."""
        data = self.data
        first = (position * data.batch) % len(self.order)
        idx = np.take(self.order, np.arange(first, first + data.batch), mode="wrap")
        rng = self._rng(position)
        views = None
        if self.spec.teacher_input is not None:
            views = rng.integers(0, self.views, len(idx))
            x = data.train.view_batch(idx, views)
        else:
            x = data.train.batch(idx, rng)
        mixed = round(data.mixup * len(idx))  # 0 in label mode (``options.check_options``)
        if mixed:  # an original inside the train net sees the blends too
            blends = rng.integers(0, self.views, mixed)
            x[:mixed] = blend_views(data.train, data.train_indices, data.seed, idx[:mixed], blends)
            if views is not None:
                views[:mixed] = blends + self.views
        return idx, views, x

    def step(self) -> float:
        data, spec = self.data, self.spec
        position = self.start + self.done
        upcoming, self.upcoming = self.upcoming, None
        idx, views, x = upcoming[1] if upcoming is not None and upcoming[0] == position else self._batch(position)
        if views is not None:
            teacher = data.cache.logits(idx, views, x)
            self.net.blobs[spec.teacher_input].data[...] = teacher.reshape(self.net.blobs[spec.teacher_input].shape)
            if data.cache.process is not None:  # the second process runs the original on the next batch meanwhile
                self.upcoming = (position + 1, self._batch(position + 1))
                data.cache.prefetch(*self.upcoming[1])
        self.net.blobs[data.input].data[...] = x
        if spec.labels:
            self.net.blobs["label"].data[...] = data.train.labels(idx).astype(np.float32)
        started = time.monotonic()
        self.solver.step(1)
        self.images_seconds += time.monotonic() - started
        self.done += 1
        return sum(float(self.net.blobs[top].data) * w for top, w in spec.losses.items())

    def read(self) -> Weights:
        return {name: [np.array(b.data, dtype=np.float32) for b in self.net.params[name]]
                for name in self.spec.learned if name in self.net.params}

    def replan(self, iterations: int) -> None:
        """Go on towards a new horizon of ``iterations``. Caffe fixes ``max_iter`` when a solver is made, so the
        solver is snapshotted and restored into one with the new horizon: the iteration count, the momentum (Adam's
        moments too) and the weights carry over, and the poly rate goes on decaying to 0 at the new end."""
        work = self.data.work
        self.solver.snapshot()
        done = self.solver.iter
        state, model = (work / f"{self.tag}_iter_{done}.{suffix}" for suffix in ("solverstate", "caffemodel"))
        self.solver = make_solver(work, self.tag, self.train_net, self.options, iterations, self.seed)
        self.solver.restore(str(state))
        self.net = self.solver.net
        state.unlink()
        model.unlink()


def blend_views(train: Batches, pool: np.ndarray, seed: int, indices: np.ndarray, blends: np.ndarray) -> np.ndarray:
    """Blend ``b`` of image ``i`` (``b`` below ``train.views``): one of its views mixed with a view of a partner
    image from ``pool`` in a share drawn uniformly from [0, 1], all fixed by (``seed``, ``i``, ``b``), so that the
    original's outputs on a blend can be cached like a view's."""
    images = np.asarray(indices).tolist()
    picks = [np.random.default_rng([seed, 11, i, b]) for i, b in zip(images, np.asarray(blends).tolist())]
    partners = [int(pool[pick.integers(len(pool))]) for pick in picks]
    views = np.array([pick.integers(0, train.views, 2) for pick in picks]).reshape(-1, 2)
    shares = np.array([pick.uniform() for pick in picks], dtype=np.float32).reshape(-1, 1, 1, 1)
    return shares * train.view_batch(images, views[:, 0]) + (1 - shares) * train.view_batch(partners, views[:, 1])


def time_iterations(spec: PhaseSpec, data: PhaseData, options: SolverOptions, tag: str) -> float:
    """Seconds per iteration, for planning a time budget, timed on a throw-away solver: the first iteration
    (allocations) is not timed, and the estimate leans low (the fastest of three), so that a phase plans rather too
    many iterations, which its deadline cuts short, than too few, which would leave the budget unused."""
    trainer = Trainer(spec, data, options, 10**6, f"{tag}_timing")
    trainer.step()
    times = []
    for _ in range(3):
        started = time.monotonic()
        trainer.step()
        times.append(time.monotonic() - started)
    return min(times)


def eval_net(spec: PhaseSpec, work: Path, tag: str, trainer: Trainer | None,
             init: Callable[[str], list[np.ndarray]] | None = None) -> Any:
    """The student alone (TEST phase), sharing ``trainer``'s weights when given, else loaded from ``init``."""
    caffe = import_caffe()
    path = work / f"{tag}_eval.prototxt"
    caffe_io.write_prototxt(path, spec.eval_net)
    net = caffe.Net(str(path), caffe.TEST)
    load_params(net, init or spec.init)
    if trainer is not None:
        net.share_with(trainer.net)
    return net


def overlay(init: Callable[[str], list[np.ndarray]], weights: Weights) -> Callable[[str], list[np.ndarray]]:
    """``init`` with the layers of ``weights`` replaced (a trainer that goes on from a probe's weights)."""
    return lambda name: weights[name] if name in weights else init(name)
