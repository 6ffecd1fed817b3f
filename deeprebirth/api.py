"""The library calls behind each CLI command: files in, files and reports out. The library never prints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deeprebirth import caffe_io
from deeprebirth.caffe_runtime import CheckResult, compare_nets, image_feeds, random_feeds
from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph
from deeprebirth.model import PathLike, load_model, same_file, save_model
from deeprebirth.rewrite import RewriteReport, rewrite, select_rules
from deeprebirth.rules import RULES, RuleConfig, Skip
from deeprebirth.shapes import LayerCost, infer_shapes, layer_costs


@dataclass
class RewriteOptions:
    rules: str | Sequence[str] = "all"
    skip: Sequence[str] = ()
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()
    phase: str = "TEST"
    check: int = 0  # random inputs to compare on in real Caffe (needs weights)
    images: Sequence[PathLike] = ()  # real photos to compare on as well
    tolerance: float = 1e-4  # max |a - b| / max |a| per compared blob
    seed: int = 0
    init: str = "inherit"  # how lossy rules start new layers: "inherit" or "filler"
    widen: str = "balanced"  # where merge_inception_branches puts freed channels: "3x3", "5x5", "balanced"


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
    graph = load_model(prototxt, weights, phase=options.phase)
    config = RuleConfig(init=options.init, widen=options.widen, seed=options.seed)
    report = rewrite(graph, rules, only=options.only, exclude=options.exclude, config=config)
    save_model(graph, out_prototxt, out_weights)
    check = None
    if options.check or options.images:
        original = load_model(prototxt, weights, phase=options.phase)
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
        text = json.dumps(payload, indent=2).encode()
        caffe_io.atomic_write(report_path, lambda handle: handle.write(text))
    return RewriteResult(report, check)


def check_rewrite(original: Graph, rewritten: Graph, prototxt: PathLike, weights: PathLike,
                  out_prototxt: PathLike, out_weights: PathLike, options: RewriteOptions,
                  lossy: bool = False) -> CheckResult:
    """Compare outputs (and the logits under a Softmax output) of the two nets in real Caffe."""
    shapes = infer_shapes(original)
    inputs = {original.caffe_name(b): shapes[b] for b in original.inputs()}
    if any(s is None for s in inputs.values()) or not inputs:
        raise DeepRebirthError("--check needs a net with Input layers of known shape", file=str(prototxt))
    feeds = random_feeds(inputs, options.check, options.seed)  # type: ignore[arg-type]
    if options.images:
        name, shape = next(iter(inputs.items()))
        feeds += image_feeds(options.images, name, shape)  # type: ignore[arg-type]
    blobs = comparable_blobs(original, rewritten)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-check-") as tmp:
        # compare the normalised original (V1 upgraded, phase filtered) so Caffe runs the same net we read
        normalised = Path(tmp) / "original.prototxt"
        caffe_io.write_prototxt(normalised, original.to_net())
        return compare_nets((str(normalised), str(weights)), (str(out_prototxt), str(out_weights)), feeds, blobs,
                            options.tolerance, lossy)


def comparable_blobs(original: Graph, rewritten: Graph) -> list[str]:
    """The rewritten net's outputs, plus the input of each Softmax output (logits say more than saturated
    probabilities), restricted to names both nets have."""
    known = set(original.caffe_blob_names().values())
    names = rewritten.caffe_blob_names()
    blobs = []
    for blob in rewritten.outputs():
        producer = rewritten.producer(blob)
        candidates = [names[blob]]
        if producer.type == "Softmax":
            candidates.append(names[producer.bottoms[0]])
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


def inspect_file(prototxt: PathLike, weights: PathLike | None = None, phase: str = "TEST") -> Inspection:
    graph = load_model(prototxt, weights, phase=phase)
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
