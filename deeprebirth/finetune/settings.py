"""``finetune``'s user settings, each declared once (``deeprebirth.option``), and the FinetuneOptions they make
(``finetune_options``). A plain setting is declared where it lives, as a FinetuneOptions field made with
``options.setting`` (default, type, help, bounds): that field is the one place a new setting is added. Declared
here: the inputs and outputs, the budget (whose default depends on --export), the batch (None: chosen by pace), the
solver's settings and the transform's."""

from __future__ import annotations

import dataclasses
from typing import Any

from deeprebirth.caffe.options import GPU_OPTION, TRANSFORM_OPTIONS, pop_transform
from deeprebirth.finetune.options import FinetuneOptions
from deeprebirth.finetune.train import SOLVER_TYPES, SolverOptions
from deeprebirth.option import Option

DEFAULT = FinetuneOptions()
# --export writes solver files that run elsewhere, at a pace unknown here: a time budget has no iteration count there
EXPORT_BUDGET = "5ep"

FINETUNE_OPTIONS: tuple[Option, ...] = (
    Option("report_path", str, None, flag="report", path="file", required=True,
           help="the JSON report `deeprebirth rewrite --report` wrote"),
    Option("data", str, None, path="any", required=True,
           help="training data: an image folder (a subfolder per class), a list file, an .npz or a Caffe LMDB"),
    Option("out", str, None, path="file", help="where to write the fine-tuned caffemodel"),
    Option("export_dir", str, None, flag="export", path="dir",
           help="instead of training, write the plan as Caffe files into this new folder: per phase a "
                "train_val.prototxt, solver.prototxt and starting caffemodel, and run.sh (`caffe train`, e.g. "
                f"./run.sh -gpu all); the budget then defaults to {EXPORT_BUDGET}"),
    Option("train_val", str, None, path="file",
           help="with --export: read the training images with this train_val's TRAIN data layer (default: an "
                "LMDB written from --data)"),
    GPU_OPTION,
    *(Option(f.name, default=f.default, **f.metadata["option"]) for f in dataclasses.fields(FinetuneOptions)
      if "option" in f.metadata),
    Option("budget", str, None,
           help="for the whole run: time (90s, 10m, 1.5h), solver iterations (3000it) or epochs (5ep)  "
                f"[default: {DEFAULT.budget}; with --export: {EXPORT_BUDGET}]"),
    Option("batch", int, DEFAULT.batch, minimum=1,
           help="images per update  [default: 32, or 16 or 8 where the budget would buy fewer than 400 updates "
                "(see docs/finetune.md)]"),
    Option("lr", float, DEFAULT.solver.lr, help="base learning rate (default: searched per phase on held-out data)"),
    Option("solver", str, DEFAULT.solver.solver, choices=tuple(SOLVER_TYPES),
           help="the Caffe solver type; with sgd and no --lr the search may switch to adam: where every SGD rate "
           "diverges, and without labels where Adam's probe beats SGD's beyond the noise; adam with no --lr searches from "
           "1e-3 without labels, 3e-4 with"),
    Option("momentum", float, DEFAULT.solver.momentum, help="the solver's momentum"),
    Option("weight_decay", float, DEFAULT.solver.weight_decay, help="the solver's weight decay"),
    Option("val", str, None, path="any", help="held-out data (default: --holdout of --data)"),
    Option("work_dir", str, None, path="dir",
           help="solver files, snapshots and state (default: OUT without suffix + .finetune)"),
    Option("json_path", str, None, flag="json", path="file",
           help="the report (default: OUT without suffix + .finetune.json)"),
    *TRANSFORM_OPTIONS,
)
# the settings that are not FinetuneOptions fields of the same name: where the run reads and writes, the solver's
SOLVER_SETTINGS = ("solver", "lr", "momentum", "weight_decay")
RENAMED = {"json_path": "report"}


def budget_for(budget: str | None, export: bool) -> str:
    """The budget a run takes: the one given, else the default (``EXPORT_BUDGET`` for --export)."""
    if budget is not None:
        return budget
    return EXPORT_BUDGET if export else DEFAULT.budget


def finetune_options(settings: dict[str, Any], export: bool = False) -> FinetuneOptions:
    """FinetuneOptions from FINETUNE_OPTIONS' values (by name, as the command line gives them; the transform
    options as ``caffe.options.pop_transform`` reads them, flipping training images unless told otherwise)."""
    values = dict(settings)
    transform = pop_transform(values, mirror=True)
    solver = SolverOptions(*(values.pop(name) for name in SOLVER_SETTINGS))
    fields = {field.name for field in dataclasses.fields(FinetuneOptions)}
    chosen = {RENAMED.get(name, name): value for name, value in values.items()
              if RENAMED.get(name, name) in fields}
    chosen["budget"] = budget_for(values.get("budget"), export)
    return FinetuneOptions(**chosen, solver=solver, transform=transform)
