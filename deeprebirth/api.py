"""The library calls behind each CLI command: files in, files and reports out. The library never prints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeprebirth import caffe_io
from deeprebirth.caffe_io import DATA_LAYER_TYPES
from deeprebirth.caffe_runtime import CheckResult, compare_nets, image_feeds, random_feeds
from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph
from deeprebirth.model import PathLike, load_model, same_file, save_model
from deeprebirth.rewrite import RewriteReport, rewrite, select_rules
from deeprebirth.rules import RULES, Rule, RuleConfig, Skip
from deeprebirth.shapes import LayerCost, infer_shapes, layer_costs
from deeprebirth.weights.tucker import parse_rank_method


@dataclass
class RewriteOptions:
    rules: str | Sequence[str] = "all"
    skip: Sequence[str] = ()
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()
    phase: str = "TEST"  # the phase of a train_val net the rules see; the other phase's layers are kept
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # data layer top -> shape
    check: int = 0  # random inputs to compare on in real Caffe (needs weights)
    images: Sequence[PathLike] = ()  # real photos to compare on as well
    tolerance: float = 1e-4  # max |a - b| / max |a| per compared blob
    seed: int = 0
    init: str = "inherit"  # how lossy rules start new layers: "inherit" or "filler"
    widen: str = "balanced"  # where merge_inception_branches puts freed channels: "3x3", "5x5", "balanced"
    rank_method: str = "vbmf"  # decompose_conv_tucker's ranks: "vbmf", "energy:F", "speedup:X", "ranks:R1,R2", "full"
    runtime: str | None = None  # onnxruntime, mnn, ncnn: apply only the lossy merges that pay there (--min-gain)
    min_gain: float = 1.0  # percent of the original net's time on ``runtime`` a lossy merge must save
    runtime_rounds: int = 10  # interleaved timing rounds of the runtime plan


# Named pipelines (``rewrite --preset``): settings of RewriteOptions. DeepRebirth's default is slimming alone; its
# fastest configuration adds Tucker-2 decomposition with VBMF ranks (Kim et al. 2016).
PRESETS: dict[str, dict[str, str]] = {
    "deeprebirth": {"rules": "all"},
    "deeprebirth+tucker": {"rules": "all,tucker", "rank_method": "vbmf"},
}


def preset_options(preset: str, **settings: Any) -> RewriteOptions:
    """RewriteOptions from a preset; ``settings`` that are not None override the preset's and the defaults."""
    if preset not in PRESETS:
        raise DeepRebirthError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    given = {key: value for key, value in settings.items() if value is not None}
    return RewriteOptions(**{**PRESETS[preset], **given})


@dataclass
class RewriteResult:
    report: RewriteReport
    check: CheckResult | None


def rewrite_files(prototxt: PathLike, out_prototxt: PathLike, weights: PathLike | None = None,
                  out_weights: PathLike | None = None, report_path: PathLike | None = None,
                  options: RewriteOptions | None = None) -> RewriteResult:
    """Load, rewrite, save (atomically), then optionally compare both nets in real Caffe."""
    options = options or RewriteOptions()
    _refuse_overwrite(prototxt, weights, out_prototxt, out_weights, report_path)
    if out_weights is not None and weights is None:
        raise DeepRebirthError("--out-weights needs --weights")
    if (options.check or options.images) and (weights is None or out_weights is None):
        raise DeepRebirthError("--check and --images need --weights and --out-weights")
    rules = select_rules(options.rules, options.skip)
    try:
        parse_rank_method(options.rank_method)
    except ValueError as err:
        raise DeepRebirthError(str(err)) from None
    graph = load_model(prototxt, weights, phase=options.phase, input_shapes=options.input_shapes)
    rules, kept_dropout = training_rules(graph, rules, options.rules)
    config = RuleConfig(init=options.init, widen=options.widen, seed=options.seed, rank_method=options.rank_method)
    exclude, notes = list(options.exclude), list[str]()
    if options.runtime:
        exclude, notes = _runtime_exclusions(prototxt, weights, options, config, exclude)
    report = rewrite(graph, rules, only=options.only, exclude=exclude, config=config)
    report.warnings += kept_dropout + notes
    save_model(graph, out_prototxt, out_weights)
    if out_weights is not None:
        report.warnings += caffemodel_size_warnings(os.path.getsize(out_weights))
    check = None
    if options.check or options.images:
        original = load_model(prototxt, weights, phase=options.phase, input_shapes=options.input_shapes)
        lossy = any(not change.exact for change in report.changes)
        check = check_rewrite(original, graph, prototxt, weights, out_prototxt, out_weights, options,  # type: ignore
                              lossy=lossy)
    if report_path is not None:
        payload = report.to_json()
        if check is not None:
            payload["check"] = {"inputs": check.inputs, "tolerance": check.tolerance, "passed": check.passed,
                                "lossy": check.lossy,
                                "predictions_changed": check.predictions_changed,
                                "blobs": [vars(d) for d in check.diffs]}
        caffe_io.atomic_write_bytes(report_path, json.dumps(payload, indent=2))
    return RewriteResult(report, check)


def _runtime_exclusions(prototxt: PathLike, weights: PathLike | None, options: RewriteOptions, config: RuleConfig,
                        exclude: list[str]) -> tuple[list[str], list[str]]:
    """``rewrite --runtime R --min-gain PCT``: measure every candidate merge on R (export.runtime_plan) and leave
    out the lossy ones that save less than PCT percent there; returns (exclude list, report lines)."""
    from deeprebirth.export.runtime_plan import exclusions, plan_on_runtime

    plan = plan_on_runtime(prototxt, weights, options.runtime or "", rules=options.rules, seed=options.seed,
                           rounds=options.runtime_rounds, clock="cpu", config=config)
    names, dropped = exclusions(plan, options.min_gain)
    notes = [f"not applied: {c.rule} at '{c.layers[0]}' saves {100 * plan.share(c):.1f}% of the net's time on "
             f"{plan.runtime} (< {options.min_gain:g}%): a lossy merge that does not pay there is accuracy spent "
             "for nothing" for c in dropped]
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
    note = [f"train_val net: Dropout kept for training ({listed}); name eliminate_dropout in --rules to remove it"]
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


CALLS_OUT_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData", "HDF5Output", "Python")


def check_rewrite(original: Graph, rewritten: Graph, prototxt: PathLike, weights: PathLike,
                  out_prototxt: PathLike, out_weights: PathLike, options: RewriteOptions,
                  lossy: bool = False) -> CheckResult:
    """Compare outputs (and the logits under a Softmax output) of the two nets in real Caffe."""
    shapes = infer_shapes(original)
    inputs = {original.caffe_name(b): shapes[b] for b in original.inputs()}
    if any(s is None for s in inputs.values()) or not inputs:
        raise DeepRebirthError("--check needs a net with Input layers of known shape", file=str(prototxt))
    # Caffe would open the files these layers name (data sources, mean files, HDF5 output) or import their module
    risky = [f"'{layer.name}' ({layer.type})" for layer in original.layers() if layer.type in CALLS_OUT_TYPES]
    if risky:
        raise DeepRebirthError(f"--check would make Caffe open files or import code named in the net: "
                               f"{', '.join(risky[:3])}; check a deploy net with Input layers", file=str(prototxt))
    feeds = random_feeds(inputs, options.check, options.seed)  # type: ignore[arg-type]
    if options.images:
        name, shape = next(iter(inputs.items()))
        feeds += image_feeds(options.images, name, shape)  # type: ignore[arg-type]
    blobs = comparable_blobs(original, rewritten, lossy)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-check-") as tmp:
        # compare the normalised original (V1 upgraded, phase filtered) so Caffe runs the same net we read
        normalised = Path(tmp) / "original.prototxt"
        caffe_io.write_prototxt(normalised, original.to_net())
        return compare_nets((str(normalised), str(weights)), (str(out_prototxt), str(out_weights)), feeds, blobs,
                            options.tolerance, lossy)


def comparable_blobs(original: Graph, rewritten: Graph, lossy: bool = False) -> list[str]:
    """The rewritten net's outputs, plus the input of each Softmax output (logits say more than saturated
    probabilities), restricted to names both nets have. A lossy rewrite changes values, so a DetectionOutput (how
    many rows it has depends on the values) is judged by its inputs' shapes instead."""
    known = set(original.caffe_blob_names().values())
    names = rewritten.caffe_blob_names()
    blobs: list[str] = []
    for blob in rewritten.outputs():
        producer = rewritten.producer(blob)
        candidates = [names[blob]]
        if producer.type == "Softmax":
            candidates.append(names[producer.bottoms[0]])
        if producer.type == "DetectionOutput" and lossy:
            candidates = [names[b] for b in producer.bottoms]
        blobs += [c for c in candidates if c in known and c not in blobs]
    if not blobs:
        raise DeepRebirthError("the rewritten net shares no output blob with the original")
    return blobs


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
    fires, skips = [], []
    for rule in RULES:
        for found in rule.match(graph, RuleConfig()):
            if isinstance(found, Skip):
                skips.append((rule.name, found))
            else:
                fires.append((rule.name, found.layers))
    return Inspection(graph, costs, fires, skips)


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
