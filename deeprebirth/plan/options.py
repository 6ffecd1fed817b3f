"""The options of ``plan``, each declared once (``deeprebirth.option``)."""

from __future__ import annotations

from deeprebirth.caffe.options import REFERENCE_OPTION, TRANSFORM_OPTIONS
from deeprebirth.export.runtimes import EXPORTED
from deeprebirth.finetune import FinetuneOptions
from deeprebirth.measure.options import TIMING_OPTIONS
from deeprebirth.option import Option
from deeprebirth.rewrite import RULES_OPTION

PLAN_OPTIONS: tuple[Option, ...] = (
    *TIMING_OPTIONS,
    Option("json_path", str, None, flag="json", path="file", help="write the plan as JSON"),
    RULES_OPTION,
    Option("data", str, None, path="any",
           help="images (no labels needed) to measure each lossy merge's accuracy risk with: a short mimic of the "
                "net with only that merge (needs --weights)"),
    Option("risk_budget", str, "30s", help="the short mimic's --budget, per merge (without --budget and --max-drop)"),
    Option("budget", str, None,
           help="the fine-tuning budget you plan: the risk runs share it (each lossy merge an equal part)  "
                f"[default with --max-drop: finetune's, {FinetuneOptions().budget}]"),
    Option("max_drop", float, None, minimum=0,
           help="with --data: mark the lossy merges fine-tuning cannot bring back to within this many points of "
                "top-1 (of agreement without labels), as `rewrite --max-drop` leaves them out"),
    Option("runtime", str, None, choices=("caffe", *EXPORTED),
           help="price merges in the reference's per-layer profile (caffe: real Caffe's), or measure each merge "
                "alone on an exported runtime (batch 1 unless --batch)  [default: the reference's profile]"),
    REFERENCE_OPTION,
    *TRANSFORM_OPTIONS,
)
