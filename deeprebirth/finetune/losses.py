"""The training objectives of fine-tuning, written with stock BVLC Caffe layers so that a train net runs in-process
and in any plain ``caffe train`` (one or many GPUs): this Caffe has no Python layer and no soft-target loss.

* **The frozen teacher** (``embed_teacher``): the ORIGINAL net's layers copied into the train net under
  ``teacher/`` names, reading the same input blob, every parameter at ``lr_mult: 0``, Dropout left out (identity),
  BatchNorm on its global statistics. Caffe skips their backward pass (nothing below them learns).
* **Distillation** (``add_distillation``, Hinton et al. 2015): with student logits z, teacher logits t and
  temperature T, ``p = softmax(t/T)``, ``q = softmax(z/T)``::

      z -> Power{scale: 1/T} -> Softmax -> Log{shift: 1e-8} -> log q
      t -> Power{scale: 1/T} -> Softmax -> p
      Eltwise{PROD}(p, log q) -> Reduction{SUM, coeff: -T^2}, loss_weight w / N

  i.e. ``w · T² · mean_n CE(p_n, q_n)``, whose gradient is ``w · T · (q - p) / N`` (the T² keeps its size
  comparable with the label loss as T changes). Cross-entropy to p is the KL divergence plus the teacher's entropy,
  a constant: the same gradient.
* **Regression on the logits** (``add_logit_regression``): EuclideanLoss between z and t with loss_weight
  ``w / var(t)``, i.e. ``w · mean_n ‖z_n - t_n‖² / (2 var(t))``, whose gradient ``w · (z - t) / (N var(t))`` has
  about KD's size when the logits are a standard deviation apart. Where the slim net starts far from the original
  (a merged stem: agreement near chance), matching the logits themselves can pull harder than soft targets.
* **Labels** (``add_label_loss``): SoftmaxWithLoss on the student's logits, loss_weight ``1 - w``.
* **Activation mimic** (``add_mimic_loss``): EuclideanLoss between a student blob and the teacher's, weighted by
  ``2 / (elements · variance of the teacher's blob)`` so that it reads as a relative mean squared error: the
  layer-wise steps' target, and the whole-net phase's hints (``finetune.hints``).

Every loss top is named ``loss_*``; ``LOSS_PREFIX`` lets the driver sum them with their weights.

The numpy functions at the end (``softmax``, ``distillation_loss``) are the references the held-out metrics and
the gradient test use.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.finetune.steps import prefix
from deeprebirth.ir.graph import Graph

TEACHER = "teacher/"
LOSS_PREFIX = "loss_"
LOG_FLOOR = 1e-8  # keeps log q finite where the student's softmax underflows


def teacher_name(name: str) -> str:
    return TEACHER + name


def embed_teacher(net: pb.NetParameter, original: Graph, input_blob: str, blobs: Iterable[str],
                  param_counts: dict[str, int]) -> dict[str, str]:
    """Append the original's layers that ``blobs`` (Caffe blob names of the original) depend on to ``net``, frozen,
    under ``teacher/`` names, reading ``input_blob``. Returns {original layer name: its name in ``net``} for the
    layers added (their weights are the original's); layers already in ``net`` (embedded for another target) are
    not added again. ``param_counts``: parameter blobs per original layer."""
    names = original.caffe_blob_names()
    wanted = set(blobs)
    writers = {names[top]: layer.name for layer in original.layers() for top in layer.tops if names[top] in wanted}
    needed: set[str] = set()
    for layer in writers.values():
        needed |= prefix(original, layer)
    inputs = {names[b] for b in original.inputs()}
    alias: dict[str, str] = {}  # Dropout's top -> its bottom (Dropout is the identity at inference)

    def blob(name: str) -> str:
        name = alias.get(name, name)
        return input_blob if name in inputs else teacher_name(name)

    added: dict[str, str] = {}
    present = {layer.name for layer in net.layer}  # embedded before, for another target
    for param in original.to_net().layer:
        if param.name not in needed or param.type == "Input":
            continue
        if param.type == "Dropout":
            for bottom, top in zip(param.bottom, param.top):
                if top != bottom:
                    alias[top] = alias.get(bottom, bottom)
            continue
        if teacher_name(param.name) in present:
            continue
        layer = net.layer.add()
        layer.CopyFrom(param)
        layer.name = teacher_name(param.name)
        del layer.bottom[:]
        del layer.top[:]
        layer.bottom.extend(blob(b) for b in param.bottom)
        layer.top.extend(blob(t) for t in param.top)
        del layer.include[:]
        del layer.exclude[:]
        count = param_counts.get(param.name, 0)
        del layer.param[:]
        for _ in range(count):
            layer.param.add(lr_mult=0.0, decay_mult=0.0)
        if layer.type == "BatchNorm":
            layer.batch_norm_param.use_global_stats = True
        added[param.name] = layer.name
    return added


def logits_of(net: pb.NetParameter, output: str) -> str:
    """The logits behind prediction blob ``output``: the input of the Softmax that makes it, which is removed from
    ``net`` (the losses apply their own softmax); ``output`` itself when no Softmax makes it."""
    last = next((p for p in reversed(net.layer) if output in p.top), None)
    removable = (last is not None and last.type == "Softmax" and len(last.top) == 1 and last.top[0] != last.bottom[0]
                 and not any(output in p.bottom for p in net.layer if p is not last))
    if not removable:
        return output
    assert last is not None
    logits = str(last.bottom[0])
    net.layer.remove(last)
    return logits


def add_distillation(net: pb.NetParameter, student_logits: str, teacher_logits: str, temperature: float,
                     weight: float, batch: int) -> str:
    """Soft-target cross-entropy at ``temperature`` (see the module docstring); returns the loss top."""
    inverse = 1.0 / temperature
    net.layer.add(name="kd/student_scaled", type="Power", bottom=[student_logits], top=["kd/student_scaled"],
                  power_param=pb.PowerParameter(scale=inverse))
    net.layer.add(name="kd/q", type="Softmax", bottom=["kd/student_scaled"], top=["kd/q"])
    net.layer.add(name="kd/log_q", type="Log", bottom=["kd/q"], top=["kd/log_q"],
                  log_param=pb.LogParameter(shift=LOG_FLOOR))
    net.layer.add(name="kd/teacher_scaled", type="Power", bottom=[teacher_logits], top=["kd/teacher_scaled"],
                  power_param=pb.PowerParameter(scale=inverse))
    net.layer.add(name="kd/p", type="Softmax", bottom=["kd/teacher_scaled"], top=["kd/p"])
    net.layer.add(name="kd/p_log_q", type="Eltwise", bottom=["kd/p", "kd/log_q"], top=["kd/p_log_q"],
                  eltwise_param=pb.EltwiseParameter(operation=pb.EltwiseParameter.PROD))
    top = LOSS_PREFIX + "kd"
    net.layer.add(name=top, type="Reduction", bottom=["kd/p_log_q"], top=[top],
                  reduction_param=pb.ReductionParameter(operation=pb.ReductionParameter.SUM, axis=0,
                                                        coeff=-temperature ** 2),
                  loss_weight=[weight / batch])
    return top


def add_logit_regression(net: pb.NetParameter, student_logits: str, teacher_logits: str, weight: float,
                         variance: float) -> str:
    """Squared error between the student's and the teacher's logits (see the module docstring); the loss top."""
    top = LOSS_PREFIX + "logits"
    net.layer.add(name=top, type="EuclideanLoss", bottom=[student_logits, teacher_logits], top=[top],
                  loss_weight=[weight / max(variance, 1e-12)])
    return top


def add_label_loss(net: pb.NetParameter, logits: str, weight: float, batch: int) -> str:
    """SoftmaxWithLoss on an Input ``label`` of ``batch`` labels; returns the loss top."""
    label = net.layer.add(name="label", type="Input", top=["label"])
    label.input_param.shape.add(dim=[batch])
    top = LOSS_PREFIX + "label"
    net.layer.add(name=top, type="SoftmaxWithLoss", bottom=[logits, "label"], top=[top], loss_weight=[weight])
    return top


def add_mimic_loss(net: pb.NetParameter, student_blob: str, teacher_blob: str, elements: int,
                   variance: float, name: str = "mimic") -> str:
    """EuclideanLoss to the teacher's blob, as a relative mean squared error; returns the loss top."""
    top = LOSS_PREFIX + name
    net.layer.add(name=top, type="EuclideanLoss", bottom=[student_blob, teacher_blob], top=[top],
                  loss_weight=[2.0 / (elements * max(variance, 1e-12))])
    return top


# ---------------------------------------------------------------------------------------------------------------
# numpy references


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.reshape(len(logits), -1).astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def distillation_losses(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    """Per image: ``T² · KL(p_n ‖ q_n)`` (``distillation_loss`` is their mean)."""
    p = softmax(teacher, temperature)
    log_q = np.log(softmax(student, temperature) + LOG_FLOOR)
    log_p = np.log(p + LOG_FLOOR)
    return temperature ** 2 * np.sum(p * (log_p - log_q), axis=1)  # type: ignore[no-any-return]


def distillation_loss(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """``T² · mean_n KL(p_n ‖ q_n)``: the distillation loss less the teacher's entropy (0 when they agree)."""
    return float(np.mean(distillation_losses(student, teacher, temperature)))
