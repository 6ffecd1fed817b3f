"""Runtime-aware planning: what each candidate merge saves *on the target runtime*, measured, not estimated.

A lossy merge costs fine-tuning and some accuracy; it is worth it only where it makes the target faster. Caffe's
pooling and LRN are slow, so in Caffe nearly every merge pays; MNN, ncnn and ONNX Runtime run pooling fast, so a
merge that trades a pooling for a strided conv may save nothing there.

Candidates come in stages as in ``deeprebirth.plan.candidates``: stage 0 matches the net as given; stage n matches once every
earlier candidate is applied. Each candidate is applied alone to its stage's graph; every stage graph and every
trial is exported to the runtime and all of them are timed in one worker, interleaved (base, trial 1, trial 2, ...
each round), so machine drift hits all alike. Time saved = median(stage graph) - median(trial).

Noise: ``NULL_COPIES`` identical copies of the original net are exported and timed with the rest; how far their
medians land from the original's is the plan's noise floor. ``exclusions`` turns a plan into what ``rewrite
--runtime R --min-gain PCT`` leaves out only where the measurement is sure: the lossy candidates whose saving *plus
the noise floor* is still under PCT percent of the original net's time on R (exact folds always apply: they cost
nothing). Why, measured: docs/decisions/noise-floor.md.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import EXPORTED
from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.classify import TENSOR_TYPES
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import PathLike, load_model, save_model
from deeprebirth.measure.latency import exported_latency
from deeprebirth.rewrite import apply_one, select_rules
from deeprebirth.rewrite import stages as staged
from deeprebirth.rules import Change, Match, Rule, RuleConfig

NULL_COPIES = 3
ELIMINATED_TYPES = frozenset({"Pooling", "LRN"})  # what lossy merges exist to remove


@dataclass
class RuntimeCandidate:
    rule: str
    group: str
    risk: str  # "exact" or "lossy"
    stage: int
    layers: tuple[str, ...]
    summary: str
    removed: list[str]
    eliminated: list[str]  # the pooling/LRN layers it removes (else its other non-tensor ones): what it exists for
    relearn: list[str]
    base_ms: float  # median of the stage's graph
    after_ms: float  # median with this merge alone applied to it

    @property
    def saved_ms(self) -> float:
        return self.base_ms - self.after_ms


@dataclass
class RuntimePlan:
    prototxt: str
    runtime: str
    threads: int
    batch: int
    rounds: int
    original_ms: float
    candidates: list[RuntimeCandidate]
    noise: float = 0.0  # largest |median(identical copy) - median(original)| as a fraction of the original

    def share(self, candidate: RuntimeCandidate) -> float:
        """Time saved as a fraction of the original net's time on the runtime."""
        return candidate.saved_ms / self.original_ms if self.original_ms > 0 else 0.0

    def surely_below(self, candidate: RuntimeCandidate, min_gain_pct: float) -> bool:
        """Whether ``candidate`` saves under ``min_gain_pct`` percent even allowing for the noise floor."""
        return 100 * (self.share(candidate) + self.noise) < min_gain_pct


def plan_on_runtime(prototxt: PathLike, weights: PathLike | None, runtime: str, *, rules: str | Sequence[str] = "all",
                    batch: int = 1, threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0,
                    clock: str = "wall", config: RuleConfig | None = None) -> RuntimePlan:
    """Measure every candidate merge of ``prototxt`` on ``runtime`` (onnxruntime, mnn, ncnn)."""
    if runtime not in EXPORTED:
        raise DeepRebirthError(f"a runtime plan takes {', '.join(EXPORTED)} (Caffe is the default plan)",
                               options=("runtime",))
    chosen = select_rules(rules)
    config = config or RuleConfig()
    graph = load_model(prototxt, weights)
    if weights is None:
        random_weights(graph, seed)
    set_batch(graph, batch)
    stages: list[Graph] = []
    found: list[tuple[int, Rule, Match, Graph, Change]] = []
    state = copy.deepcopy(graph)
    for stage, new in staged(state, chosen, config):
        stages.append(copy.deepcopy(state))
        for rule, match in new:
            trial = copy.deepcopy(state)
            change = apply_one(trial, rule, match, config)
            found.append((stage, rule, match, trial, change))
    if not stages:
        stages.append(graph)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-runtime-plan-") as tmp:
        pairs = []
        for i, variant in enumerate([*stages, *(f[3] for f in found), *[stages[0]] * NULL_COPIES]):
            proto, model = Path(tmp) / f"v{i}.prototxt", Path(tmp) / f"v{i}.caffemodel"
            save_model(variant, proto, model)
            pairs.append((str(proto), str(model)))
        times = exported_latency(pairs, runtime, Path(tmp), batch=batch, threads=threads, rounds=rounds,
                                  warmup=warmup, seed=seed, clock=clock)
    medians = [statistics.median(t) for t in times]
    copies = medians[len(medians) - NULL_COPIES:]
    noise = max(abs(m - medians[0]) for m in copies) / medians[0] if medians[0] > 0 else 0.0
    candidates = []
    for k, (stage, rule, match, _, change) in enumerate(found):
        types = {layer.name: layer.type for layer in stages[stage].layers()}
        eliminated = [n for n in change.removed if types.get(n) in ELIMINATED_TYPES] or \
            [n for n in change.removed if types.get(n) not in TENSOR_TYPES]
        candidates.append(RuntimeCandidate(rule.name, rule.group, "exact" if change.exact else "lossy", stage,
                                           match.layers, change.summary, list(change.removed), eliminated,
                                           list(change.relearn), medians[stage], medians[len(stages) + k]))
    return RuntimePlan(str(prototxt), runtime, threads, batch, rounds, medians[0], candidates, noise)



def exclusions(plan: RuntimePlan, min_gain_pct: float) -> tuple[list[str], list[RuntimeCandidate]]:
    """(layer names for ``rewrite --exclude``, the lossy candidates left out): every lossy candidate saving less
    than ``min_gain_pct`` percent of the original time on the runtime, noise floor included, is excluded by the
    non-tensor layers it would remove (its pooling or LRN; all it removes if none), never by a layer that a
    candidate which stays needs: excluding GoogLeNet's pool1 also blocked the LRN merge whose match runs through
    it, the biggest saving on ONNX Runtime (LRN is half its time there). A candidate only such layers would
    exclude stays in."""
    below = [c for c in plan.candidates if c.risk == "lossy" and plan.surely_below(c, min_gain_pct)]
    needed = {name for c in plan.candidates if c not in below for name in c.layers}
    names: list[str] = []
    dropped: list[RuntimeCandidate] = []
    for candidate in below:
        own = [n for n in candidate.eliminated or candidate.removed if n not in needed]
        if own:
            dropped.append(candidate)
            names += [n for n in own if n not in names]
    return names, dropped
