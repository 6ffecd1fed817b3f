"""One phase's nets and losses (``phase_spec``): the student that trains and the one that is measured, the
frozen teacher embedded beside it, the loss the schedule and mode ask for, and where every parameter comes from.
Shared by the in-process run (``driver``) and the plain-Caffe export (``export``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.context import Context, Teacher
from deeprebirth.finetune.hints import hint_blobs
from deeprebirth.finetune.losses import (
    add_distillation,
    add_label_loss,
    add_logit_regression,
    add_mimic_loss,
    embed_teacher,
    logits_of,
    teacher_name,
)
from deeprebirth.finetune.options import FinetuneOptions
from deeprebirth.finetune.phase_types import PhaseSpec
from deeprebirth.finetune.state import Weights
from deeprebirth.finetune.steps import Step, StepNet, build_step_net
from deeprebirth.finetune.train import restore_dropout, training_net
from deeprebirth.ir.graph import GraphError


def _lookup(ctx: Context, nets: Sequence[StepNet], store: Weights) -> Callable[[str], list[np.ndarray]]:
    """Parameters by layer name of a phase's nets: the students' (current store or original), the teacher's."""
    source = {name: where for net in nets for name, where in net.source.items()}

    def lookup(name: str) -> list[np.ndarray]:
        if name in source:
            where, layer = source[name]
            return store[layer] if where == "slim" or layer in ctx.shared else ctx.original_weights[layer]
        if name.startswith(teacher_name("")):
            return ctx.original_weights[name[len(teacher_name("")):]]
        raise GraphError(f"no parameters known for layer {name!r}")

    return lookup


def blob_counts(ctx: Context, step_net: StepNet, store: Weights) -> dict[str, int]:
    counts = {}
    for name, (where, layer) in step_net.source.items():
        found = store.get(layer) if where == "slim" or layer in ctx.shared else ctx.original_weights.get(layer)
        if found:
            counts[name] = len(found)
    return counts


def _next_blob(ctx: Context, step: Step) -> str:
    """The blob the step after ``step`` reproduces (the logits after the last)."""
    later = [s for s in ctx.steps if s.index > step.index and not s.final]
    return later[0].reproduces if later else ctx.logits


def _student(ctx: Context, step: Step, options: FinetuneOptions) -> tuple[StepNet, StepNet, str]:
    """(the net that trains, the net that is measured, the loss's target) of a phase."""
    mult = 1.0 if step.final else options.new_lr_mult

    def build(with_suffix: bool, until: str | None = None) -> StepNet:
        return build_step_net(step, ctx.slim, ctx.original, with_suffix, ctx.shared, mult, options.freeze_rest,
                              until)

    if step.final:
        whole = build(False)
        return whole, whole, "labels+kd" if options.mode == "label" else "kd"
    try:
        hybrid: StepNet | None = build(True)
    except DeepRebirthError:
        hybrid = None
    if options.mode == "label":
        assert hybrid is not None  # checked before training started
        return hybrid, hybrid, "labels+kd"
    if hybrid is None or options.mimic_at == "local":
        local = build(False)
        return local, hybrid or local, "local"
    if options.mimic_at == "logits":
        return hybrid, hybrid, "kd"
    until = _next_blob(ctx, step)
    if until == ctx.logits:
        return hybrid, hybrid, "kd"
    return build(True, until), hybrid, f"next:{until}"


LOSSES = ("kd", "kd1", "regression")  # KD at --temperature, KD at T=1, regression on the logits


def loss_label(loss: str, temperature: float) -> str:
    return {"kd": f"KD T={temperature:g}", "kd1": "KD T=1", "regression": "logit regression"}[loss]


def phase_spec(ctx: Context, step: Step, store: Weights, teacher: Teacher, options: FinetuneOptions,
               loss: str = "kd", cached_teacher: bool = False) -> tuple[PhaseSpec, StepNet, str]:
    """A phase's nets. ``loss``: what matches the original's logits (one of ``LOSSES``); ``cached_teacher``: the
    original's logits come in through an ``Input`` blob fed from ``TeacherCache`` instead of a frozen copy of the
    original inside the train net (in-process runs; an exported net for plain ``caffe train`` embeds it)."""
    train_student, eval_student, target = _student(ctx, step, options)
    assert options.batch is not None
    counts = blob_counts(ctx, train_student, store)
    net = training_net(train_student.net, train_student.factor, counts, options.batch, "none", "")
    with_dropout = options.dropout == "on" or (options.dropout == "auto" and target == "labels+kd")
    dropout = restore_dropout(net, ctx.original.to_net()) if with_dropout else []
    compare: dict[str, tuple[str, str]] = {}
    hints: list[str] = []
    if not step.final:
        compare["blob"] = (eval_student.blob, step.reproduces)
    if target in ("labels+kd", "kd"):
        losses = _add_output_losses(ctx, net, step, train_student, target, teacher, options, loss, cached_teacher)
        hints = hint_blobs(ctx.original, ctx.slim, step.relearn, ctx.logits) if uses_hints(step, options) else []
        losses.update(_add_hint_losses(ctx, net, hints, teacher, options.batch))
        objective = "label" if target == "labels+kd" else "kd"
    else:
        if target == "local":
            student_blob, original_blob = train_student.blob, step.reproduces
            objective = "blob"
        else:
            student_blob, original_blob = train_student.until or "", target.split(":", 1)[1]
            compare["until"] = (student_blob, original_blob)
            objective = "until"
        losses = _add_blob_mimic_loss(ctx, net, student_blob, original_blob, teacher, options.batch)
    eval_net = _batched(eval_student.net, options.batch)
    eval_logits: str | None = None
    if step.final:
        eval_logits = eval_student.blob
    elif eval_student.output is not None:
        eval_logits = logits_of(eval_net, eval_student.output)
    # the student's layers learn; the teacher's and the suffix's frozen ones do not
    learned = [name for name, f in train_student.factor.items() if f > 0 and counts.get(name)]
    spec = PhaseSpec(step.index, step.name, net, losses, _lookup(ctx, [train_student, eval_student], store), learned,
                     eval_net, eval_logits, ctx.logits, compare, objective,
                     options.mode == "label" and "label" in [p.name for p in net.layer], options.temperature,
                     options.kd_weight,
                     teacher_name(ctx.logits) if cached_teacher and target in ("labels+kd", "kd") else None,
                     loss_label(loss, options.temperature) + (f" + {len(hints)} hints" if hints else ""),
                     dropout, loss)
    return spec, train_student, target


def uses_hints(step: Step, options: FinetuneOptions) -> bool:
    """Whether the phase matches intermediate blobs too (``finetune.hints``): the whole-net phase, where the run
    resolved ``--hints`` to "on" (``driver.resolve_auto``)."""
    return step.final and options.hints == "on"


def _add_hint_losses(ctx: Context, net: pb.NetParameter, hints: list[str], teacher: Teacher,
                     batch: int) -> dict[str, float]:
    """A relative squared error to the original's blob per hint (the blob has the same name in both nets)."""
    return _add_mimic_losses(ctx, net, [(blob, blob, f"hint{i}") for i, blob in enumerate(hints)], teacher,
                             min(batch, 8))


def _add_output_losses(ctx: Context, net: pb.NetParameter, step: Step, student: StepNet, target: str,
                       teacher: Teacher, options: FinetuneOptions, loss: str,
                       cached_teacher: bool) -> dict[str, float]:
    """The losses on the student's logits: distillation (or logit regression) against the original's logits,
    plus the labels' cross-entropy in label mode. Returns loss top -> loss weight."""
    assert options.batch is not None
    assert student.output is not None or step.final
    output = student.blob if step.final else student.output
    logits = logits_of(net, output)  # type: ignore[arg-type]
    sample = np.zeros(0)
    if cached_teacher or loss == "regression":  # the logits' shape, their spread
        x = ctx.train.batch(ctx.train_indices[:min(options.batch, 8)])
        sample = teacher.outputs(x, [ctx.logits])[ctx.logits]
    if cached_teacher:
        teacher_input = teacher_name(ctx.logits)
        fed = net.layer.add(name=teacher_input, type="Input", top=[teacher_input])
        fed.input_param.shape.add(dim=[options.batch, *sample.shape[1:]])
    else:
        _embed_original(ctx, net, ctx.logits)
    losses: dict[str, float] = {}
    kd_weight = options.kd_weight if target == "labels+kd" else 1.0
    if kd_weight > 0 and loss == "regression":
        top = add_logit_regression(net, logits, teacher_name(ctx.logits), kd_weight, float(np.var(sample)))
        losses[top] = net.layer[-1].loss_weight[0]
    elif kd_weight > 0:
        temperature = 1.0 if loss == "kd1" else options.temperature
        top = add_distillation(net, logits, teacher_name(ctx.logits), temperature, kd_weight, options.batch)
        losses[top] = kd_weight / options.batch
    if target == "labels+kd" and kd_weight < 1:
        top = add_label_loss(net, logits, 1.0 - kd_weight, options.batch)
        losses[top] = 1.0 - kd_weight
    return losses


def _add_blob_mimic_loss(ctx: Context, net: pb.NetParameter, student_blob: str, original_blob: str,
                         teacher: Teacher, batch: int) -> dict[str, float]:
    """A regression of the student's blob on the original's (layer-wise steps)."""
    return _add_mimic_losses(ctx, net, [(student_blob, original_blob, "mimic")], teacher, batch)


def _add_mimic_losses(ctx: Context, net: pb.NetParameter, pairs: list[tuple[str, str, str]], teacher: Teacher,
                      sample: int) -> dict[str, float]:
    """Per (student blob, original blob, loss name): a relative squared error to the original's blob, its
    variance measured on ``sample`` training images; the original embedded up to those blobs."""
    if not pairs:
        return {}
    originals = [original for _, original, _ in pairs]
    _embed_original(ctx, net, *originals)
    found = teacher.outputs(ctx.train.batch(ctx.train_indices[:sample]), originals)
    losses = {}
    for student_blob, original_blob, name in pairs:
        target = found[original_blob]
        top = add_mimic_loss(net, student_blob, teacher_name(original_blob), int(np.prod(target.shape[1:])),
                             float(np.var(target)), name=name)
        losses[top] = net.layer[-1].loss_weight[0]
    return losses


def _embed_original(ctx: Context, net: pb.NetParameter, *blobs: str) -> None:
    """A frozen copy of the original inside ``net``, up to ``blobs`` (the targets the student's losses read)."""
    counts = {name: len(weights) for name, weights in ctx.original_weights.items()}
    embed_teacher(net, ctx.original, ctx.io.input, blobs, counts)


def _batched(net: pb.NetParameter, batch: int) -> pb.NetParameter:
    """A copy of ``net`` whose Input blobs hold ``batch`` items."""
    batched = pb.NetParameter()
    batched.CopyFrom(net)
    for param in batched.layer:
        if param.type == "Input":
            for shape in param.input_param.shape:
                shape.dim[0] = batch
    return batched
