"""A rewrite of a net's files, end to end: its options (each declared once, in REWRITE_OPTIONS) and presets, then
load, choose the lossy merges (by their time on a runtime, ``deeprebirth.plan.runtime_plan``, or by their
recoverable accuracy, ``deeprebirth.plan.recoverable``), rewrite, save atomically and check in the reference
runtime. ``rewrite`` and ``batch`` run it; ``inspect_file`` says where the rules would fire."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeprebirth.aliases import PathLike
from deeprebirth.caffe.compare import CheckResult, compare_nets, compared_blobs
from deeprebirth.caffe.data import Transform, image_files
from deeprebirth.caffe.options import REFERENCE_OPTION
from deeprebirth.caffe.reference import pick_reference
from deeprebirth.caffe.runtime import image_feeds, random_feeds
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import EXPORTED
from deeprebirth.finetune import FinetuneOptions
from deeprebirth.io import caffe_io
from deeprebirth.io.caffe_io import DATA_LAYER_TYPES
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model, same_file, save_model
from deeprebirth.ir.shapes import LayerCost, infer_shapes, layer_costs
from deeprebirth.rewrite import PHASE_OPTION, RULES_OPTION, RewriteReport, candidates, rewrite, select_rules, skips
from deeprebirth.rules import RULE_OPTIONS, RULES, Option, Rule, RuleConfig, Skip

FINETUNE_BUDGET = FinetuneOptions().budget  # what --max-drop's risk runs plan with: what finetune will get

# The options of a rewrite (``rewrite`` and ``batch``), each declared once: RewriteOptions takes its defaults from
# here, ``validate_options`` checks a value against it, and the CLI builds its flags from it.
REWRITE_OPTIONS: tuple[Option, ...] = (
    RULES_OPTION,
    Option("skip", str, (), multiple=True, help="rule names or groups not to apply"),
    Option("only", str, (), multiple=True, help="apply rules only where they involve these layers"),
    Option("exclude", str, (), multiple=True, help="never apply rules that involve these layers"),
    PHASE_OPTION,
    Option("input_shapes", str, (), multiple=True, flag="input-shape", metavar="BLOB:N,C,H,W",
           help="shape of a data layer's top (repeatable); default: from transform_param.crop_size and the first "
                "record of its LMDB"),
    Option("check", int, 0, minimum=0, concept="number of check inputs",
           help="compare both nets in the reference runtime on N random inputs (needs weights)"),
    REFERENCE_OPTION,
    Option("images", str, (), multiple=True,
           help="real photos (files or a folder of them; repeatable) to compare on too"),
    Option("tolerance", float, 1e-4, help="largest allowed max|a-b|/max|a| on each compared blob"),
    *RULE_OPTIONS,
    Option("runtime", str, None, choices=EXPORTED,
           help="time every candidate merge on this runtime first and apply only the lossy ones that save at "
                "least the minimum gain there (exact folds always apply)"),
    Option("min_gain", float, 1.0, minimum=0.0, concept="minimum gain",
           help="with a runtime: the percent of the net's time on it a lossy merge must save"),
    Option("max_drop", float, None, minimum=0.0, concept="maximum drop",
           help="measure each lossy merge's accuracy risk on --data first and apply only those fine-tuning can "
                "bring back to within this many points of the original's top-1 (of agreement with it without "
                "labels) in --budget (exact folds always apply)"),
    Option("data", str, None, help="with a maximum drop: images (labels optional) to measure the risks on"),
    Option("budget", str, FINETUNE_BUDGET,
           help="with a maximum drop: the fine-tuning budget you plan (time, Nit or Nep); the risk runs share it"),
)
OPTION: dict[str, Option] = {option.name: option for option in REWRITE_OPTIONS}
DEFAULT: dict[str, Any] = {option.name: option.default for option in REWRITE_OPTIONS}


@dataclass
class RewriteOptions:
    """A rewrite's settings; each field's meaning, default and allowed values are declared in REWRITE_OPTIONS."""

    rules: str | Sequence[str] = DEFAULT["rules"]
    skip: Sequence[str] = DEFAULT["skip"]
    only: Sequence[str] = DEFAULT["only"]
    exclude: Sequence[str] = DEFAULT["exclude"]
    phase: str = DEFAULT["phase"]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # data layer top -> shape
    check: int = DEFAULT["check"]
    images: Sequence[PathLike] = DEFAULT["images"]
    tolerance: float = DEFAULT["tolerance"]
    reference: str | None = DEFAULT["reference"]  # None: real Caffe where pycaffe imports, else OpenCV dnn
    seed: int = DEFAULT["seed"]
    init: str = DEFAULT["init"]
    widen: str = DEFAULT["widen"]
    rank_method: str = DEFAULT["rank_method"]
    runtime: str | None = DEFAULT["runtime"]
    min_gain: float = DEFAULT["min_gain"]
    runtime_rounds: int = 10  # interleaved timing rounds of the runtime plan (not a command-line option)
    max_drop: float | None = DEFAULT["max_drop"]
    data: str | None = DEFAULT["data"]
    budget: str = DEFAULT["budget"]
    transform: Transform | None = None  # the risk runs' preprocessing (as finetune's); None: Transform(mirror=True)

    def rule_config(self) -> RuleConfig:
        return RuleConfig(**{option.name: getattr(self, option.name) for option in RULE_OPTIONS})

    def validate(self) -> RewriteOptions:
        """Every value checked against its declaration, and the rule names known: one place, before any work."""
        for option in REWRITE_OPTIONS:
            option.validate(getattr(self, option.name))
        select_rules(self.rules, self.skip)
        return self


# Named pipelines (``rewrite --preset``): settings of RewriteOptions. DeepRebirth's default is slimming alone; its
# fastest configuration adds Tucker-2 decomposition with VBMF ranks (Kim et al. 2016), floored at half the energy.
PRESETS: dict[str, dict[str, str]] = {
    "deeprebirth": {"rules": "all"},
    "deeprebirth+tucker": {"rules": "all,tucker", "rank_method": DEFAULT["rank_method"]},
}
DEFAULT_PRESET = "deeprebirth"


def parse_input_shapes(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``BLOB:N,C,H,W`` texts -> {blob: shape}."""
    return dict(caffe_io.parse_input_shape(text) for text in texts)


def preset_options(preset: str | None = None, options_type: type[RewriteOptions] | None = None,
                   **settings: Any) -> RewriteOptions:
    """Options from a preset (default: DEFAULT_PRESET); ``settings`` that are not None (nor empty lists) override
    the preset's and the defaults. Text as a command line gives it is accepted: comma-separated names, input shapes
    as ``BLOB:N,C,H,W``, image folders (their photos). ``options_type``: RewriteOptions or a subclass."""
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise DeepRebirthError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    given = {key: value for key, value in settings.items() if value is not None and value != ()}
    for key in ("skip", "only", "exclude"):
        if key in given and not isinstance(given[key], str):
            given[key] = [part.strip() for value in given[key] for part in value.split(",") if part.strip()]
    if "input_shapes" in given and not isinstance(given["input_shapes"], dict):
        given["input_shapes"] = parse_input_shapes(given["input_shapes"])
    if "images" in given:
        given["images"] = image_files(given["images"])
    return (options_type or RewriteOptions)(**{**PRESETS[preset], **given})


@dataclass
class RewriteResult:
    report: RewriteReport
    check: CheckResult | None
    original: Graph | None = None  # the net as read (with ``keep_original``, or when checked)
    graph: Graph | None = None  # the rewritten net
    accuracy: Any = None  # with a maximum drop: the AccuracyPlan (deeprebirth.plan.recoverable) it chose with


def rewrite_files(prototxt: PathLike, out_prototxt: PathLike, weights: PathLike | None = None,
                  out_weights: PathLike | None = None, report_path: PathLike | None = None,
                  options: RewriteOptions | None = None, keep_original: bool = False,
                  progress: Any = None) -> RewriteResult:
    """Load (once), rewrite, save (atomically), then optionally compare both nets in real Caffe. The result holds
    the rewritten graph, and the original one when checked or ``keep_original``. With ``options.max_drop`` the
    lossy merges are chosen by their measured accuracy risk first (deeprebirth.plan.recoverable; ``progress(n, total,
    candidate)`` before each risk run)."""
    options = options or RewriteOptions()
    _refuse_overwrite(prototxt, weights, out_prototxt, out_weights, report_path)
    if out_weights is not None and weights is None:
        raise DeepRebirthError("output weights asked for, but no input weights given", options=("out_weights", "weights"))
    if (options.check or options.images) and (weights is None or out_weights is None):
        raise DeepRebirthError("checking in Caffe needs the input and the output weights",
                               options=("check", "images", "weights", "out_weights"))
    if options.check or options.images:
        pick_reference(options.reference)  # before any work: a missing pycaffe is one line, not a lost rewrite
    rules = select_rules(options.validate().rules, options.skip)
    if options.max_drop is not None or options.data is not None:
        from deeprebirth.plan.recoverable import check_settings

        check_settings(weights, options.max_drop, options.data, options.budget)
    graph = load_model(prototxt, weights, phase=options.phase, input_shapes=options.input_shapes)
    # the check compares with the net as read: a copy, rather than reading the files a second time
    original = copy.deepcopy(graph) if options.check or options.images or keep_original else None
    rules, kept_dropout = training_rules(graph, rules, options.rules)
    config = options.rule_config()
    exclude, notes = list(options.exclude), list[str]()
    if options.runtime:
        exclude, notes = _runtime_exclusions(prototxt, weights, options, config, exclude)
    accuracy, permit = None, None
    if options.max_drop is not None:  # measure, then let only the recoverable lossy merges through
        from deeprebirth.plan.recoverable import permit as permitted
        from deeprebirth.plan.recoverable import plan_for_accuracy

        accuracy = plan_for_accuracy(prototxt, weights, options.data, options.max_drop, budget=options.budget,  # type: ignore[arg-type]
                                     transform=options.transform, rules=[r.name for r in rules], only=options.only,
                                     exclude=exclude, config=config, seed=options.seed, progress=progress)
        permit = permitted(accuracy.plan.candidates, accuracy.decisions, accuracy.refused)
    report = rewrite(graph, rules, only=options.only, exclude=exclude, config=config, permit=permit)
    report.warnings += kept_dropout + notes
    save_model(graph, out_prototxt, out_weights)
    if out_weights is not None:
        report.warnings += caffemodel_size_warnings(os.path.getsize(out_weights))
    check = None
    if options.check or options.images:
        assert original is not None
        lossy = any(not change.exact for change in report.changes)
        check = check_rewrite(original, graph, prototxt, weights, out_prototxt, out_weights, options,  # type: ignore
                              lossy=lossy)
    if report_path is not None:
        payload = report.to_json()
        if check is not None:
            payload["check"] = {"inputs": check.inputs, "tolerance": check.tolerance, "passed": check.passed,
                                "lossy": check.lossy, "reference": check.reference,
                                "predictions_changed": check.predictions_changed,
                                "blobs": [vars(d) for d in check.diffs]}
        if accuracy is not None:
            payload["accuracy"] = accuracy.to_json()
        caffe_io.atomic_write_bytes(report_path, json.dumps(payload, indent=2))
    return RewriteResult(report, check, original, graph, accuracy)



def _runtime_exclusions(prototxt: PathLike, weights: PathLike | None, options: RewriteOptions, config: RuleConfig,
                        exclude: list[str]) -> tuple[list[str], list[str]]:
    """``rewrite --runtime R --min-gain PCT``: measure every candidate merge on R (plan.runtime_plan) and leave
    out the lossy ones that save less than PCT percent there; returns (exclude list, report lines)."""
    from deeprebirth.plan.runtime_plan import exclusions, plan_on_runtime

    plan = plan_on_runtime(prototxt, weights, options.runtime or "", rules=options.rules, seed=options.seed,
                           rounds=options.runtime_rounds, clock="cpu", config=config)
    names, dropped = exclusions(plan, options.min_gain)
    notes = [f"not applied: {c.rule} at '{c.layers[0]}' saves {100 * plan.share(c):.1f}% of the net's time on "
             f"{plan.runtime} (< {options.min_gain:g}%): a lossy merge that does not pay there is accuracy spent "
             "for nothing" for c in dropped]
    notes.append(f"runtime plan on {plan.runtime}: noise floor {100 * plan.noise:.1f}% of the net's time (identical "
                 "copies measured that far apart)" + ("" if 100 * plan.noise < options.min_gain else
                 f", over the minimum gain {options.min_gain:g}%: only merges that surely save less were left out (a "
                 "quieter machine or more rounds resolves more)"))
    return exclude + [n for n in names if n not in exclude], notes


def training_rules(graph: Graph, rules: tuple[Rule, ...], asked: str | Sequence[str]) -> tuple[tuple[Rule, ...],
                                                                                          list[str]]:
    """A train_val net (data layers, or layers of another phase) is written back for training, where Dropout is
    not the identity it is at inference: eliminate_dropout runs on it only when named explicitly."""
    named = {n.strip() for n in (asked.split(",") if isinstance(asked, str) else asked)}
    training = bool(graph.aside) or any(layer.type in DATA_LAYER_TYPES for layer in graph.layers())
    if not training or "eliminate_dropout" in named or not any(r.name == "eliminate_dropout" for r in rules):
        return rules, []
    dropouts = [layer.name for layer in graph.layers() if layer.type == "Dropout"]
    listed = ", ".join(dropouts[:3]) + (", ..." if len(dropouts) > 3 else "")
    note = [f"train_val net: Dropout kept for training ({listed}); name eliminate_dropout in the rules to remove it"]
    return tuple(r for r in rules if r.name != "eliminate_dropout"), note if dropouts else []


def caffemodel_size_warnings(size: int) -> list[str]:
    """deeprebirth reads and writes caffemodels of any size, but Caffe parses them with protobuf: 2 GiB is a hard
    limit of the format, and some Caffe builds cap reads at 512 MiB (brocolli's util/io.cpp, the pycaffe here)."""
    if size >= 2**31:
        return [(f"the caffemodel is {size / 2**30:.1f} GiB: protobuf (and so Caffe) cannot parse messages of "
                 "2 GiB or more")]
    if size > 2**29:
        return [(f"the caffemodel is {size / 2**20:.0f} MiB: BVLC Caffe reads it, but Caffe builds that cap "
                 "protobuf reads at 512 MiB (e.g. brocolli-caffe) refuse it")]
    return []


CALLS_OUT_TYPES = (*DATA_LAYER_TYPES, "HDF5Output", "Python")


def check_rewrite(original: Graph, rewritten: Graph, prototxt: PathLike, weights: PathLike,
                  out_prototxt: PathLike, out_weights: PathLike, options: RewriteOptions,
                  lossy: bool = False) -> CheckResult:
    """Compare outputs (and the logits under a Softmax output) of the two nets in the reference runtime
    (``options.reference``; None: real Caffe where pycaffe imports, else OpenCV dnn)."""
    shapes = infer_shapes(original)
    inputs = {original.caffe_name(b): shapes[b] for b in original.inputs()}
    if any(s is None for s in inputs.values()) or not inputs:
        raise DeepRebirthError("checking in Caffe needs a net with Input layers of known shape", file=str(prototxt),
                               options=("check",))
    # Caffe would open the files these layers name (data sources, mean files, HDF5 output) or import their module
    risky = [f"'{layer.name}' ({layer.type})" for layer in original.layers() if layer.type in CALLS_OUT_TYPES]
    if risky:
        raise DeepRebirthError(f"checking would make Caffe open files or import code named in the net: "
                               f"{', '.join(risky[:3])}; check a deploy net with Input layers", file=str(prototxt),
                               options=("check",))
    feeds = random_feeds(inputs, options.check, options.seed)  # type: ignore[arg-type]
    if options.images:
        name, shape = next(iter(inputs.items()))
        feeds += image_feeds(options.images, name, shape)  # type: ignore[arg-type]
    blobs = compared_blobs(rewritten, original, lossy)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-check-") as tmp:
        # compare the normalised original (V1 upgraded, phase filtered) so Caffe runs the same net we read
        normalised = Path(tmp) / "original.prototxt"
        caffe_io.write_prototxt(normalised, original.to_net())
        return compare_nets((str(normalised), str(weights)), (str(out_prototxt), str(out_weights)), feeds, blobs,
                            options.tolerance, lossy, pick_reference(options.reference))


@dataclass
class Inspection:
    graph: Graph
    costs: list[LayerCost]
    fires: list[tuple[str, tuple[str, ...]]]  # (rule, layers) where a rule would fire
    skips: list[tuple[str, Skip]]  # (rule, skip) where it would not, and why


def inspect_file(prototxt: PathLike, weights: PathLike | None = None, phase: str = "TEST",
                 input_shapes: dict[str, tuple[int, ...]] | None = None) -> Inspection:
    graph = load_model(prototxt, weights, phase=phase, input_shapes=input_shapes)
    costs = layer_costs(graph)
    fires = [(rule.name, found.layers) for rule, found in candidates(graph, RULES, RuleConfig())]
    return Inspection(graph, costs, fires, skips(graph, RULES, RuleConfig()))


def _refuse_overwrite(prototxt: PathLike, weights: PathLike | None, *outputs: PathLike | None) -> None:
    inputs = [p for p in (prototxt, weights) if p is not None]
    for out in outputs:
        if out is None:
            continue
        for src in inputs:
            if same_file(src, out):
                raise DeepRebirthError("output would overwrite an input; choose another path", file=str(out))
        if os.path.isdir(out):
            raise DeepRebirthError("output path is a folder", file=str(out))
    named = [str(Path(o).resolve()) for o in outputs if o is not None]
    if len(set(named)) != len(named):
        raise DeepRebirthError("two outputs share one path")
