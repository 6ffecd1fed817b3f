"""The library calls behind each CLI command: files in, files and reports out. The library never prints.

This module is the CLI's only door into the library, and no library module imports it: the rewrite calls come from
``deeprebirth.pipeline``, and the other commands' entry points (profile, plan, finetune, evaluate, batch, export,
draw) are reached through it too, imported on first use (``_ELSEWHERE``) so that a command loads Caffe, OpenCV or
the export runtimes only when it needs them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from statistics import median
from typing import Any

from deeprebirth.aliases import PathLike
from deeprebirth.batch.records import BATCH_OPTIONS  # noqa: F401
from deeprebirth.caffe.data import Transform, image_files  # noqa: F401
from deeprebirth.caffe.options import EVALUATE_OPTIONS, TRANSFORM_NAMES, TRANSFORM_OPTIONS, pop_transform  # noqa: F401
from deeprebirth.caffe.reference import describe as describe_reference  # noqa: F401
from deeprebirth.caffe.reference import pick_reference, require_pycaffe  # noqa: F401
from deeprebirth.errors import DeepRebirthError  # noqa: F401
from deeprebirth.export.api import EXPORT_OPTIONS  # noqa: F401
from deeprebirth.export.runtimes import EXPORTED, FORMATS, RUNTIMES  # noqa: F401
from deeprebirth.finetune.settings import FINETUNE_OPTIONS, budget_for, finetune_options  # noqa: F401
from deeprebirth.io import caffe_io
from deeprebirth.ir.classify import type_class  # noqa: F401
from deeprebirth.ir.graph import GraphError  # noqa: F401  (the CLI's exit code 3)
from deeprebirth.ir.model import save_model  # noqa: F401
from deeprebirth.measure.options import PROFILE_OPTIONS  # noqa: F401
from deeprebirth.pipeline import (  # noqa: F401
    DEFAULT_PRESET,
    FINETUNE_BUDGET,
    OPTION,
    PRESETS,
    REWRITE_OPTIONS,
    RewriteOptions,
    RewriteResult,
    inspect_file,
    parse_input_shapes,
    preset_options,
    rewrite_files,
)
from deeprebirth.plan.options import PLAN_OPTIONS  # noqa: F401
from deeprebirth.rewrite import NetSummary, RewriteReport  # noqa: F401
from deeprebirth.rules import RULE_LABELS  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------
# the JSON files commands write (each atomically: temp file + rename)


def _save_json(path: PathLike, payload: Any) -> None:
    caffe_io.atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def save_profiles(path: PathLike, profiles: Sequence[Any]) -> None:
    """``profile --json``: one entry per profiled net (NetProfile.to_json)."""
    _save_json(path, [p.to_json() for p in profiles])


def save_latency(path: PathLike, runtime: str, timing: dict[str, Any], nets: Sequence[tuple[str, str | None]],
                 times: Sequence[Sequence[float]]) -> None:
    """``profile --runtime R --json``: the whole-forward times of each net."""

    _save_json(path, {"runtime": runtime, **timing,
                      "nets": [{"prototxt": p, "weights": w, "times_ms": list(t), "median_ms": median(t)}
                               for (p, w), t in zip(nets, times)]})


def save_runtime_profile(path: PathLike, profile: Any) -> None:
    """``profile --runtime onnxruntime|mnn|opencv --json``: the runtime's own per-layer times."""
    _save_json(path, profile.to_json())


def save_runtime_plan(path: PathLike, plan: Any) -> None:
    """``plan --runtime R --json``: the plan, with each candidate's time saved and share of the net."""
    _save_json(path, {**asdict(plan), "candidates": [dict(asdict(c), saved_ms=c.saved_ms, share=plan.share(c))
                                                     for c in plan.candidates]})


def save_plan(path: PathLike, plan: Any, risks: dict[int, Any], chosen: Any = None) -> None:
    """``plan --json``: the Caffe plan, each candidate with its memory saved and measured accuracy risk (and, with
    ``--max-drop``, the choice: deeprebirth.plan.recoverable.AccuracyPlan)."""
    extra = {} if chosen is None else {"accuracy": chosen.to_json()}
    _save_json(path, {**extra, "prototxt": plan.prototxt, "random_weights": plan.random_weights,
                      "profile": plan.profile.to_json(), "conv_ms_per_mac": plan.conv_ms_per_mac,
                      "candidates": [dict(asdict(c), memory_saved_bytes=c.memory_saved_bytes,
                                          accuracy_risk=dict(asdict(risks[k]), updated=risks[k].updated,
                                                             drop_before=risks[k].drop_before,
                                                             drop_after=risks[k].drop_after)
                                          if k in risks else None)
                                     for k, c in enumerate(plan.candidates)],
                      "skips": [{"rule": rule, "layer": s.layer, "reason": s.reason} for rule, s in plan.skips]})


def save_evaluation(path: PathLike, result: Any) -> None:
    """``evaluate --json``."""
    _save_json(path, asdict(result))


# ---------------------------------------------------------------------------------------------------------------
# the other commands' entry points, imported on first use (PEP 562)

_ELSEWHERE = {
    "deeprebirth.measure.profile": ("plot_by_type", "profile_net"),
    "deeprebirth.measure.latency": ("latency",),
    "deeprebirth.measure.layer_times": ("LAYER_TIMED", "NOT_LAYER_TIMED", "profile_on_runtime"),
    "deeprebirth.plan.runtime_plan": ("plan_on_runtime",),
    "deeprebirth.export.api": ("ExportOptions", "export_files"),
    "deeprebirth.caffe.data": ("transform_from_prototxt",),
    "deeprebirth.plan.candidates": ("plan_file",),
    "deeprebirth.plan.risk": ("assess", "risk_options"),
    "deeprebirth.plan.recoverable": ("measure_risks",),
    "deeprebirth.finetune": ("FinetuneOptions", "finetune_files"),
    "deeprebirth.finetune.export": ("export_plan",),
    "deeprebirth.finetune.train": ("SolverOptions",),
    "deeprebirth.caffe.evaluate": ("evaluate_files",),
    "deeprebirth.caffe.runtime": ("image_feeds",),
    "deeprebirth.batch": ("BatchOptions", "ModelResult", "run_batch"),
    "deeprebirth.ir.draw": ("draw_file",),
}
_HOME = {name: module for module, names in _ELSEWHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOME[name]), name)
