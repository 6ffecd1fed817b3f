"""One model's rewrite and check; it runs in a worker process, where a user error or a bug becomes a failed row."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deeprebirth.batch.discover import stem
from deeprebirth.batch.records import BatchOptions, FoundModel, ModelResult
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.pipeline import RewriteOptions


@dataclass
class ModelTask:
    """What a worker needs: absolute paths in, a staging folder out."""

    model: FoundModel
    zoo_dir: str
    out_folder: str  # OUT_DIR/<relative folder>
    staging: str  # where the worker writes; moved into out_folder only when it finished
    options: BatchOptions


def rewrite_model(task: ModelTask) -> ModelResult:
    """Rewrite one model into ``task.staging`` and, if asked and possible, check it in real Caffe."""
    from deeprebirth.pipeline import check_rewrite, rewrite_files

    m, zoo, staging = task.model, Path(task.zoo_dir), Path(task.staging)
    prototxt = zoo / m.prototxt
    weights = zoo / m.weights if m.weights else None
    out_proto = staging / prototxt.name
    out_weights = staging / weights.name if weights else None
    name = stem(prototxt.name)
    options = rewrite_options(task.options)
    # the check runs below, where a model Caffe cannot feed is skipped rather than failed
    checking = bool(options.check or options.images)
    result = rewrite_files(prototxt, out_proto, weights, out_weights, staging / f"{name}.report.json",
                           dataclasses.replace(options, check=0, images=()), keep_original=checking)
    report = result.report
    assert report.after is not None
    row = ModelResult(m.prototxt, m.weights, m.kind, "ok")
    b, a = report.before, report.after
    row.layers_before, row.layers_after = b.layers, a.layers
    row.params_before, row.params_after = b.params, a.params
    row.macs_before, row.macs_after = b.macs, a.macs
    row.activation_bytes_before, row.activation_bytes_after = b.activation_bytes, a.activation_bytes
    row.rules_fired = dict(Counter(change.rule for change in report.changes))
    row.lossy = any(not change.exact for change in report.changes)
    row.relearn = report.relearn
    row.warnings = list(report.warnings)
    row.outputs = sorted(p.name for p in staging.iterdir())
    if checking:
        if weights is None or out_weights is None:
            row.check = "skipped: no caffemodel"
            return row
        original, rewritten = result.original, result.graph
        assert original is not None and rewritten is not None
        why = _cannot_check(original)
        if why:
            row.check = f"skipped: {why}"
            return row
        try:
            check = check_rewrite(original, rewritten, prototxt, weights, out_proto, out_weights, options,
                                  lossy=row.lossy)
        except DeepRebirthError as err:
            row.status, row.check, row.error = "check_failed", "FAILED", str(err)
            return row
        if check.lossy:
            row.check = f"lossy: output shapes kept on {check.inputs} inputs (re-learn {len(row.relearn)} layers)"
        elif check.passed:
            row.check = f"passed: worst relative error {check.worst.max_rel:.3g} on {check.inputs} inputs"
        else:
            row.status = "check_failed"
            row.check = (f"FAILED: worst relative error {check.worst.max_rel:.3g} (tolerance {check.tolerance:g}), "
                         f"{check.predictions_changed} predictions changed")
    return row


def rewrite_options(options: BatchOptions) -> RewriteOptions:
    """The rewrite part of batch options."""
    return RewriteOptions(**{f.name: getattr(options, f.name) for f in fields(RewriteOptions)})


def _cannot_check(graph: Any) -> str:
    from deeprebirth.ir.shapes import SHAPE_FUNCTIONS, infer_shapes

    shapes = infer_shapes(graph)
    inputs = graph.inputs()
    if not inputs or any(shapes[b] is None for b in inputs):
        return "no Input layers of known shape to feed"
    odd = sorted({layer.type for layer in graph.layers()
                  if layer.type in caffe_io.DATA_LAYER_TYPES or layer.type not in SHAPE_FUNCTIONS})
    if odd:
        return f"layers Caffe would have to read files or run code for: {', '.join(odd)}"
    return ""


def run_model(worker: Callable[[ModelTask], ModelResult], task: ModelTask) -> ModelResult:
    """A worker's body (in an isolated child, ``deeprebirth.caffe.isolation``): a user error or a bug becomes the row of
    a failed model, and the batch goes on."""
    start = time.perf_counter()
    try:
        row = worker(task)
    except DeepRebirthError as err:
        row = ModelResult(task.model.prototxt, task.model.weights, task.model.kind, "failed", error=str(err))
    except Exception as err:  # noqa: BLE001  (a bug in a rule or in the tool: recorded, the batch goes on)
        row = ModelResult(task.model.prototxt, task.model.weights, task.model.kind, "failed",
                          error=f"internal error (please report): {type(err).__name__}: {err}")
    row.seconds = time.perf_counter() - start
    return row
