"""What a fine-tuning phase is given and what it gives back (plain data; the phase itself is in ``phase``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import Weights
from deeprebirth.caffe.data import Batches

PATIENCE = 3


@dataclass
class PhaseSpec:
    """Everything a phase trains and measures; layer names are the train net's."""

    index: int
    name: str
    train_net: pb.NetParameter
    losses: dict[str, float]  # loss top -> loss weight (Caffe's top holds the unweighted value)
    init: Callable[[str], list[np.ndarray]]  # parameters of any layer of the train or eval net
    learned: list[str]  # layers that learn (read back at the end)
    eval_net: pb.NetParameter  # the student alone, TEST phase, no losses
    logits: str | None  # the student's logits in eval_net (None: the phase does not reach them)
    teacher_logits: str  # the original's logits (Caffe blob of the original)
    compare: dict[str, tuple[str, str]]  # metric -> (blob in eval_net, blob of the original)
    objective: str  # "label" (labels + distillation), "kd", or a key of ``compare``
    labels: bool  # the train net reads labels
    temperature: float
    kd_weight: float
    teacher_input: str | None = None  # an Input blob of the train net fed with the original's cached logits
    loss: str = "KD T=4"  # what matches the original's outputs, as the report says it
    dropout: list[str] = field(default_factory=list)  # the original's Dropout layers the train net has again
    output_loss: str = "kd"  # the same, one of ``spec.LOSSES`` (its gradient scale sets the reference rate)


@dataclass
class Allotment:
    seconds: float | None = None  # a time budget's share (then iterations is None)
    iterations: int | None = None
    last: bool = False  # the run's last phase: time it leaves over is lost, so it plans to run into its deadline


@dataclass
class PhaseOutcome:
    weights: Weights  # the learned layers' parameters at the kept checkpoint
    before: dict[str, float]  # held-out metrics at the start and at the kept checkpoint
    after: dict[str, float]
    lr: float
    lr_search: dict[str, float]  # candidate -> held-out search score after its probe
    iterations: int  # solver updates that count: the training run's, with the winning probe's it went on from
    solver: str  # the solver that trained (SGD's users may get the Adam rescue)
    best_iteration: int
    stopped_early: bool
    loss_start: float
    loss_end: float
    seconds: float
    evaluations: list[dict[str, float]] = field(default_factory=list)
    loss: str = ""  # the training loss that won (see ``spec.LOSSES``)
    backoffs: list[str] = field(default_factory=list)  # why and how the phase restarted from its start
    images_per_second: float = 0.0  # training images through the student per second of training
    search_note: str = ""  # how the rate was chosen, in words


@dataclass
class PhaseData:
    work: Path
    input: str  # the student's input blob
    train: Batches
    train_indices: np.ndarray
    val: Batches | None
    val_indices: np.ndarray
    teacher: Any  # deeprebirth.finetune.context.Teacher
    batch: int
    seed: int
    cache_bytes: float
    patience: int = PATIENCE  # 0: never stop early
    shuffle: bool = True  # False: the training images in their order (as Caffe reads an LMDB)
    cache: Any = None  # deeprebirth.finetune.teacher_cache.TeacherCache for specs with a ``teacher_input``
    mixup: float = 0.0  # share of each training batch that blends two images (``teacher_cache.choose_blends``)
