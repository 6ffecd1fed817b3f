"""What each lossy merge costs in accuracy, measured: the other side of ``plan``'s time saved.

For each lossy candidate of a plan, the net with only that merge (and the merges it builds on: a candidate of a
later stage needs the earlier ones whose new layers it touches, e.g. an LRN merged into the conv that a pooling
merge made) is written out and briefly distilled from the original on the user's data, without labels
(``finetune`` in mimic mode, whole-net schedule, ``budget``). The risk is read off the held-out data:

* **agreement**: how often the net's top-1 equals the original's, as merged (before) and after the short mimic;
* **error at the output**: the relative squared error of its logits against the original's, before and after.

A merge whose agreement stays low after the short mimic is one the full fine-tuning will struggle with; next to
its time saved, that is what lets a user leave it out (``rewrite --exclude``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from deeprebirth import caffe_io
from deeprebirth.data import PathLike
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.graph import Graph
from deeprebirth.model import load_model
from deeprebirth.plan import Candidate
from deeprebirth.rewrite import NetSummary, RewriteReport, apply_one, find_again
from deeprebirth.rules import RULES, Change, RuleConfig

DEFAULT_BUDGET = "30s"


@dataclass
class Risk:
    candidate: int  # index into the plan's candidates
    with_merges: list[int]  # the earlier candidates it needs (indices), applied with it
    agreement_before: float | None
    agreement_after: float | None
    output_error_before: float | None
    output_error_after: float | None
    seconds: float


def dependencies(candidates: Sequence[Candidate], index: int) -> list[int]:
    """The earlier candidates whose new or changed layers candidate ``index`` involves, transitively, in order."""
    needed: set[int] = set()
    todo = [index]
    while todo:
        layers = set(candidates[todo.pop()].layers)
        for k, other in enumerate(candidates[:index]):
            if k not in needed and layers & set(other.added + other.changed):
                needed.add(k)
                todo.append(k)
    return sorted(needed)


def merged_graph(graph: Graph, candidates: Sequence[Candidate], chain: Sequence[int],
                 config: RuleConfig) -> tuple[Graph, list[Change]]:
    """``graph`` with the candidates ``chain`` applied, in order (each found again by its rule and anchor)."""
    rules = {rule.name: rule for rule in RULES}
    trial = copy.deepcopy(graph)
    changes = []
    for k in chain:
        rule, anchor = rules[candidates[k].rule], candidates[k].layers[0]
        found = find_again(trial, rule, anchor, config)
        if found is None:  # an earlier merge of the chain took its place
            continue
        changes.append(apply_one(trial, rule, found, config))
    return trial, changes


def assess(prototxt: PathLike, weights: PathLike, candidates: Sequence[Candidate], data: PathLike,
           options: FinetuneOptions | None = None, config: RuleConfig | None = None,
           progress: Callable[[int, int, Candidate], None] | None = None) -> list[Risk]:
    """Measure the risk of every lossy candidate of a plan of ``prototxt`` + ``weights`` (see the module
    docstring). ``options``: the short mimic's (mode and schedule are forced to mimic / whole; the budget defaults
    to ``DEFAULT_BUDGET``)."""
    config = config or RuleConfig()
    graph = load_model(prototxt, weights)
    base = options or FinetuneOptions(budget=DEFAULT_BUDGET)
    short = replace(base, mode="mimic", schedule="whole", resume=False, max_steps=None, report=None, work_dir=None)
    lossy = [k for k, c in enumerate(candidates) if c.risk == "lossy"]
    risks = []
    with tempfile.TemporaryDirectory(prefix="deeprebirth-risk-") as tmp:
        folder = Path(tmp)
        for n, k in enumerate(lossy, 1):
            if progress is not None:
                progress(n, len(lossy), candidates[k])
            chain = dependencies(candidates, k) + [k]
            trial, changes = merged_graph(graph, candidates, chain, config)
            net = trial.to_net()
            slim_proto, slim_model = folder / f"merge{k}.prototxt", folder / f"merge{k}.caffemodel"
            report = folder / f"merge{k}.json"
            caffe_io.write_prototxt(slim_proto, net)
            caffe_io.write_caffemodel(slim_model, net, trial.weights())
            rules = list(dict.fromkeys(change.rule for change in changes))
            typed = RewriteReport(rules, NetSummary.of(graph), NetSummary.of(trial), changes)
            report.write_text(json.dumps(typed.to_json()))
            result = finetune_files(prototxt, weights, slim_proto, slim_model, report, data,
                                    folder / f"merge{k}_tuned.caffemodel",
                                    replace(short, work_dir=folder / f"merge{k}.work"))
            step = result.steps[-1]
            risks.append(Risk(k, chain[:-1], step.agreement_before, step.agreement_after, step.output_error_before,
                              step.output_error_after, result.seconds))
    return risks
