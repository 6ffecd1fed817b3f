"""What each possible merge would buy: every match of every rule, priced with the net's measured Caffe profile.

For each match the rule is applied alone to a copy of the graph and ``shapes.layer_costs`` is diffed, so MACs,
parameters and activation memory saved are exact. Time saved is an estimate built from measurements:

    time saved = measured time of the layers the merge removes − added tensor MACs × time per MAC

where the added MACs are those of the added and changed tensor layers after the merge minus those of the changed
ones before. The time per MAC is that of the tensor layers the merge removes, measured (a merged conv runs about as
fast per MAC as the convs it replaces, and a conv that is only renamed then costs exactly nothing); when the merge
removes no measured tensor layer, it is the net's own Convolution time over its Convolution MACs.

Some matches only exist once another merge is done (a Scale after a BatchNorm is foldable once the BatchNorm is
gone). So candidates come in stages: stage 0 is what matches the net as given; stage n is what newly matches once
every earlier candidate is applied (in rule order, as the rewrite driver would). Later-stage candidates are priced
on that rewritten graph; removed layers that were never measured (made by an earlier merge) are estimated from
their MACs and listed in ``estimated``.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.classify import TENSOR_TYPES
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import PathLike, load_model
from deeprebirth.ir.shapes import LayerCost, layer_costs
from deeprebirth.measure.layer_times import profile_reference
from deeprebirth.measure.profile import NetProfile, random_caffemodel
from deeprebirth.rewrite import apply_one, select_rules, skips, stages
from deeprebirth.rules import Match, Rule, RuleConfig, Skip


@dataclass
class Candidate:
    rule: str
    group: str  # "exact", "streamline", "branch", ...
    risk: str  # "exact": same outputs; "lossy": the new layers must be re-learned
    stage: int
    layers: tuple[str, ...]  # the match (first: the anchor)
    summary: str
    removed: list[str]
    added: list[str]
    changed: list[str]
    relearn: list[str]
    removed_ms: float  # measured (or estimated, see ``estimated``) time of the removed layers
    extra_macs: int  # tensor MACs of the added and changed layers after, minus those of the changed ones before
    ms_per_mac: float  # the rate the extra MACs are priced at
    time_saved_ms: float
    macs_saved: int
    params_saved: int
    activation_bytes_saved: int
    estimated: list[str] = field(default_factory=list)  # removed layers without a measured time

    @property
    def memory_saved_bytes(self) -> int:
        """Activations plus float32 parameters."""
        return self.activation_bytes_saved + 4 * self.params_saved


@dataclass
class Plan:
    prototxt: str
    random_weights: bool  # planned (and timed) with random weights because none were given
    profile: NetProfile
    conv_ms_per_mac: float
    candidates: list[Candidate]
    skips: list[tuple[str, Skip]]  # places a rule would not fire once all candidates are applied, and why


def conv_ms_per_mac(profile: NetProfile, costs: list[LayerCost]) -> float:
    """The net's measured convolution cost per MAC (all tensor layers if it has no convolutions)."""
    times = profile.times()
    for types in (("Convolution", "Deconvolution"), tuple(TENSOR_TYPES)):
        macs = sum(c.macs for c in costs if c.type in types and c.name in times)
        ms = sum(times[c.name] for c in costs if c.type in types and c.name in times)
        if macs > 0:
            return ms / macs
    return 0.0


def _evaluate(graph: Graph, rule: Rule, found: Match, config: RuleConfig, stage: int, times: dict[str, float],
              rate: float) -> Candidate:
    before = {c.name: c for c in layer_costs(graph)}
    trial = copy.deepcopy(graph)
    change = apply_one(trial, rule, found, config)
    after = {c.name: c for c in layer_costs(trial)}

    def tensor_macs(costs: dict[str, LayerCost], names: list[str]) -> int:
        return sum(costs[n].macs for n in names if n in costs and costs[n].type in TENSOR_TYPES)

    extra = tensor_macs(after, change.added + change.changed) - tensor_macs(before, change.changed)
    measured = [n for n in change.removed if n in times]
    estimated = [n for n in change.removed if n not in times]
    removed_tensor_macs = tensor_macs(before, measured)
    if removed_tensor_macs > 0:
        rate = sum(times[n] for n in measured if before[n].type in TENSOR_TYPES) / removed_tensor_macs
    removed_ms = sum(times[n] for n in measured) + rate * tensor_macs(before, estimated)

    def total(costs: dict[str, LayerCost], attr: str) -> int:
        return sum(getattr(c, attr) for c in costs.values())

    return Candidate(
        rule=rule.name, group=rule.group, risk="exact" if change.exact else "lossy", stage=stage,
        layers=found.layers, summary=change.summary, removed=list(change.removed), added=list(change.added),
        changed=list(change.changed), relearn=list(change.relearn), removed_ms=removed_ms, extra_macs=extra,
        ms_per_mac=rate, time_saved_ms=removed_ms - extra * rate,
        macs_saved=total(before, "macs") - total(after, "macs"),
        params_saved=total(before, "params") - total(after, "params"),
        activation_bytes_saved=total(before, "activation_bytes") - total(after, "activation_bytes"),
        estimated=estimated)


def plan_graph(graph: Graph, profile: NetProfile, rules: Sequence[Rule] | None = None,
               config: RuleConfig | None = None, random_weights: bool = False) -> Plan:
    """Price every candidate merge of ``graph`` (left unchanged) with ``profile``, measured on the same net;
    ``rules`` defaults to what ``rewrite`` applies by default ("all": the opt-in groups left out)."""
    rules = select_rules("all") if rules is None else rules
    config = config or RuleConfig()
    times = profile.times()
    rate = conv_ms_per_mac(profile, layer_costs(graph))
    state = copy.deepcopy(graph)
    found = [_evaluate(state, rule, match, config, stage, times, rate)
             for stage, new in stages(state, rules, config) for rule, match in new]
    return Plan(graph.source or "", random_weights, profile, rate, found, skips(state, rules, config))


def plan_file(prototxt: PathLike, weights: PathLike | None = None, *, rules: str | Sequence[str] = "all",
              batch: int | None = None, threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0,
              config: RuleConfig | None = None, clock: str = "wall", reference: str | None = None) -> Plan:
    """Profile ``prototxt`` in the reference runtime (real Caffe; ``reference="opencv"``, or no pycaffe: OpenCV
    dnn, where fused BatchNorm/Scale cost nothing already) and plan its merges with ``rules`` (names or groups, as ``rewrite`` takes
    them: "all" leaves out the opt-in groups such as Tucker). Without ``weights`` both the timing and the plan use
    random weights (exact folds need weights to match; which merges are possible does not depend on their values)."""
    chosen = select_rules(rules)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-plan-") as tmp:
        model = weights
        if weights is None:
            model = str(Path(tmp) / "random.caffemodel")
            random_caffemodel(prototxt, model, seed)
        graph = load_model(prototxt, model)
        profile = profile_reference(prototxt, model, reference=reference, batch=batch, threads=threads,
                                    rounds=rounds, warmup=warmup, seed=seed, clock=clock)
    profile.weights = None if weights is None else str(weights)
    if batch is not None:
        set_batch(graph, batch)
    return plan_graph(graph, profile, chosen, config, random_weights=weights is None)
