"""What each lossy merge costs in accuracy, measured: the other side of ``plan``'s time saved.

For each lossy candidate of a plan, the net with only that merge (and the merges it builds on: a candidate of a
later stage needs the earlier ones whose new layers it touches, e.g. an LRN merged into the conv that a pooling
merge made) is written out and briefly distilled from the original on the user's data, without labels
(``finetune`` in mimic mode, whole-net schedule, ``budget``). The risk is read off the held-out data:

* **agreement**: how often the net's top-1 equals the original's, as merged (before) and after the short mimic;
* **error at the output**: the relative squared error of its logits against the original's, before and after.

A merge whose agreement stays low after the short mimic is one the full fine-tuning will struggle with; next to
its time saved, that is what lets a user leave it out (``rewrite --exclude``, or ``rewrite --max-drop``: see
``deeprebirth.plan.recoverable``).

The short runs are set up to buy real updates where an iteration costs seconds (an ImageNet-size net on a CPU):
a small batch (``RISK_BATCH``) and a fixed solver and rate (``RISK_SOLVER``, Adam at 1e-4: what a phase falls back to
when its budget is too short for a learning-rate search), so no part of a short budget goes to a search.
A run that made no solver iteration at all says so (``Risk.updated`` is False) and has no "after" figures: its
"after" would only repeat the merged net's.

The **drop** a merge costs, in points: with labels, the original's held-out top-1 minus the net's; without, 100 x
(1 - top-1 agreement with the original). Labels count only where they are the net's own classes: the short run
itself checks that the original's top-1 against them beats a guess beyond the noise
(``caffe.evaluate.labels_are_its_classes``). Photos listed with one placeholder label, or class folders numbered in
another order than the net's outputs, are read as unlabelled, so that a drop of 0 points is not read off a top-1 of
0% before and after. ``share_budget`` splits a fine-tuning budget over the runs.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from deeprebirth.caffe.data import PathLike
from deeprebirth.finetune import FinetuneOptions, FinetuneResult, StepResult, finetune_files
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model
from deeprebirth.plan.candidates import Candidate
from deeprebirth.rewrite import NetSummary, RewriteReport, apply_one, find_again
from deeprebirth.rules import RULES, Change, RuleConfig

DEFAULT_BUDGET = "30s"
RISK_BATCH = 8  # a CPU's images per second hardly depend on the batch: small batches buy more updates
RISK_SOLVER = SolverOptions(solver="adam", lr=1e-4)  # a given rate: no learning-rate search


@dataclass
class Risk:
    candidate: int  # index into the plan's candidates
    with_merges: list[int]  # the earlier candidates it needs (indices), applied with it
    agreement_before: float | None
    agreement_after: float | None  # None when the run made no update
    output_error_before: float | None
    output_error_after: float | None
    seconds: float
    budget: str = ""  # the short run's budget
    iterations: int = 0  # solver iterations the short run made (0: no update)
    held_out: int = 0  # held-out images the figures come from
    original_accuracy: float | None = None  # held-out top-1 with labels (None: unlabelled data)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    labels_ignored: bool = False  # labels were given, but the original is no better than a guess on them

    @property
    def updated(self) -> bool:
        return self.iterations > 0

    @property
    def labelled(self) -> bool:
        return self.original_accuracy is not None and self.accuracy_before is not None

    @property
    def measure(self) -> str:
        """What the drop counts points of, in words."""
        if self.labelled:
            return "top-1"
        return "top-1 agreement with the original" + (
            " (the labels given are not the net's classes: the original's top-1 against them is no better than a "
            "guess, so they were read as no labels)" if self.labels_ignored else "")

    def _drop(self, accuracy: float | None, agreement: float | None) -> float | None:
        if self.labelled:
            return None if accuracy is None else 100 * (self.original_accuracy - accuracy)  # type: ignore[operator]
        return None if agreement is None else 100 * (1 - agreement)

    @property
    def drop_before(self) -> float | None:
        """Points lost as merged (see the module docstring)."""
        return self._drop(self.accuracy_before, self.agreement_before)

    @property
    def drop_after(self) -> float | None:
        """Points lost after the short run; None when it made no update."""
        return self._drop(self.accuracy_after, self.agreement_after) if self.updated else None

    @property
    def resolution(self) -> float | None:
        """Points one held-out image is worth."""
        return 100 / self.held_out if self.held_out else None


def share_budget(budget: str, runs: int) -> str:
    """One of ``runs`` equal shares of a fine-tuning ``budget`` (time, iterations or epochs), as a budget text."""
    total = Budget.parse(budget)
    runs = max(1, runs)
    if total.unit == "it":
        return f"{max(1, round(total.amount / runs))}it"
    if total.unit == "ep":
        return f"{total.amount / runs:g}ep"
    return f"{total.amount / runs:.3g}s"


def risk_options(budget: str = DEFAULT_BUDGET, **settings: object) -> FinetuneOptions:
    """The short runs' fine-tuning options: ``RISK_BATCH``, ``RISK_SOLVER`` (no search), ``budget`` each, and
    ``settings`` (e.g. ``transform``, ``seed``) over those."""
    return replace(FinetuneOptions(budget=budget, batch=RISK_BATCH, solver=RISK_SOLVER), **settings)  # type: ignore[arg-type]


def measured(k: int, chain: Sequence[int], result: FinetuneResult) -> Risk:
    """A candidate's risk from its short run's result; a run without an update keeps no "after" figures, and labels
    the run ignored (``FinetuneResult.labels_ignored``) give no top-1 figures."""
    step: StepResult = result.steps[-1]
    moved = step.iterations > 0
    ignored = result.labels_ignored
    accuracy = (None, None, None) if ignored else (result.original_accuracy, step.accuracy_before,
                                                   step.accuracy_after if moved else None)
    return Risk(k, list(chain[:-1]), step.agreement_before, step.agreement_after if moved else None,
                step.output_error_before, step.output_error_after if moved else None, result.seconds,
                result.budget, step.iterations, result.held_out, *accuracy, labels_ignored=ignored)


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
           progress: Callable[[int, int, Candidate], None] | None = None,
           which: Sequence[int] | None = None) -> list[Risk]:
    """Measure the risk of every lossy candidate (or those of ``which``) of a plan of ``prototxt`` + ``weights``
    (see the module docstring). ``options``: the short mimic's, each run's (mode and schedule are forced to mimic /
    whole; default: ``risk_options()``)."""
    config = config or RuleConfig()
    graph = load_model(prototxt, weights)
    base = options or risk_options()
    short = replace(base, mode="mimic", schedule="whole", resume=False, max_steps=None, report=None, work_dir=None)
    lossy = [k for k, c in enumerate(candidates) if c.risk == "lossy" and (which is None or k in which)]
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
            risks.append(measured(k, chain, result))
    return risks
