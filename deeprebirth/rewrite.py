"""The driver: apply rules to a fixed point, check the IR after every change, and report what happened."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deeprebirth.errors import DeepRebirthError
from deeprebirth.io.caffe_io import DATA_LAYER_TYPES
from deeprebirth.ir.graph import Graph, GraphError
from deeprebirth.ir.shapes import SHAPE_FUNCTIONS, infer_shapes, layer_costs
from deeprebirth.option import Option
from deeprebirth.rules import RULES, Change, Match, Rule, RuleConfig, Skip

MAX_CHANGES = 100_000  # a guard against a rule pair that undoes each other
MAX_STAGES = 100  # a guard against rules that keep producing new matches (``stages``)
OPT_IN_GROUPS = ("tucker",)  # groups that "all" leaves out: applied only when named
PHASES = ("TEST", "TRAIN")
PHASE_OPTION = Option("phase", str, "TEST", choices=PHASES,
                      help="the phase of a train_val prototxt the rules see (the other phase's layers are kept as "
                           "they are)")


@dataclass
class NetSummary:
    layers: int
    layers_by_type: dict[str, int]
    params: int
    macs: int
    activation_bytes: int
    output_shapes: dict[str, list[int] | None]

    @classmethod
    def of(cls, graph: Graph) -> NetSummary:
        shapes = infer_shapes(graph)
        costs = layer_costs(graph, shapes)
        outputs = {graph.caffe_name(b): (list(shapes[b]) if shapes[b] is not None else None)  # type: ignore[arg-type]
                   for b in graph.outputs()}
        return cls(len(costs), graph.layer_types(), sum(c.params for c in costs), sum(c.macs for c in costs),
                   sum(c.activation_bytes for c in costs), outputs)


@dataclass
class RewriteReport:
    rules: list[str]
    before: NetSummary
    after: NetSummary | None = None
    changes: list[Change] = field(default_factory=list)
    skipped: dict[str, list[Skip]] = field(default_factory=dict)  # rule name -> places it did not fire, and why
    warnings: list[str] = field(default_factory=list)  # e.g. layer types passed through untouched

    @property
    def relearn(self) -> list[str]:
        """The new layers still in the net whose weights must be learned: a layer that a later change removed
        (e.g. a merged conv that decompose_conv_tucker split) gives way to that change's own new layers."""
        names: list[str] = []
        for change in self.changes:
            gone = set(change.removed)
            names = [name for name in names if name not in gone]
            names += [name for name in change.relearn if name not in names]
        return names

    def to_json(self) -> dict[str, object]:
        return {
            "rules": self.rules,
            "before": asdict(self.before),
            "after": asdict(self.after) if self.after else None,
            "changes": [asdict(c) for c in self.changes],
            "skipped": {rule: [asdict(s) for s in skips] for rule, skips in self.skipped.items()},
            "relearn": self.relearn,
            "warnings": self.warnings,
        }

    @classmethod
    def from_json(cls, data: Any) -> RewriteReport:
        """The report ``to_json`` wrote (``relearn`` is derived from the changes; keys added beside it, such as the
        check, are ignored); DeepRebirthError saying what is wrong when ``data`` is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("changes"), list):
            raise DeepRebirthError("not a rewrite report (no 'changes' list)")
        try:
            return cls(rules=list(data["rules"]), before=NetSummary(**data["before"]),
                       after=NetSummary(**data["after"]) if data.get("after") else None,
                       changes=[Change(**change) for change in data["changes"]],
                       skipped={rule: [Skip(**skip) for skip in found]
                                for rule, found in (data.get("skipped") or {}).items()},
                       warnings=list(data.get("warnings") or []))
        except (KeyError, TypeError, AttributeError) as err:
            raise DeepRebirthError(f"not a rewrite report ({type(err).__name__}: {err})") from None




def unknown_type_warnings(graph: Graph) -> list[str]:
    """One line naming the layer types the tool has no model of: they are carried through unchanged, and rules
    leave alone everything whose shapes depend on them."""
    unknown: dict[str, list[str]] = {}
    for layer in graph.layers():
        if layer.type not in SHAPE_FUNCTIONS and layer.type not in DATA_LAYER_TYPES:
            unknown.setdefault(layer.type, []).append(layer.name)
    if not unknown:
        return []
    parts = [f"{t or '(no type)'} ({', '.join(repr(n) for n in names[:3])}{', ...' if len(names) > 3 else ''})"
             for t, names in sorted(unknown.items())]
    return [f"layer types this tool does not know, passed through untouched: {'; '.join(parts)}"]


def _check_finite(graph: Graph, change: Change) -> None:
    """Finite weights in, finite weights out: extreme (but finite) input values can overflow a fold."""
    for name in change.changed + change.added:
        if name not in graph:
            continue
        for i, blob in enumerate(graph.layer(name).blobs or []):
            if not np.isfinite(blob).all():
                raise DeepRebirthError(f"{change.rule} would give weight blob {i} NaN or Inf values: the input "
                                       "weights are out of range (e.g. a BatchNorm variance below -eps)",
                                       file=graph.source, layer=name)


def _inherit_reproduces(change: Change, pending: dict[str, str], original_blobs: set[str]) -> None:
    """A change's ``reproduces`` must name a blob of the original net. When a rule rebuilds a layer that an earlier
    lossy change made (Tucker decomposing a merged inception conv, whose own output is a new blob), it reproduces
    what that earlier change reproduced."""
    inherited = [pending.pop(name) for name in change.removed if name in pending]
    if change.reproduces is not None and change.reproduces not in original_blobs and inherited:
        change.reproduces = inherited[-1]
    for name in change.relearn:
        if change.reproduces is not None:
            pending[name] = change.reproduces


def rule_groups() -> list[str]:
    """The rule groups, in rule order."""
    return list(dict.fromkeys(rule.group for rule in RULES))


RULES_OPTION = Option("rules", str, "all", metavar="RULES",
                      help=f"rule names or groups ({', '.join(rule_groups())}, all), comma-separated; all leaves out "
                           f"the opt-in group(s) {', '.join(OPT_IN_GROUPS)}")


def select_rules(names: Sequence[str] | str = "all", skip: Iterable[str] = ()) -> tuple[Rule, ...]:
    """Rules by name or group ("exact", "streamline", "branch", "tucker", "all"), kept in the canonical order.

    "all" means every rule outside the opt-in groups (``OPT_IN_GROUPS``): DeepRebirth's default is slimming, and
    Tucker decomposition is added only when named ("all,tucker", or the deeprebirth+tucker preset)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    wanted: set[str] = set()
    known = {rule.name for rule in RULES} | {rule.group for rule in RULES} | {"all"}
    for name in names:
        if name not in known:
            raise DeepRebirthError(f"unknown rule or group {name!r} (known: {', '.join(sorted(known))})")
        wanted |= {r.name for r in RULES
                   if name in (r.name, r.group) or (name == "all" and r.group not in OPT_IN_GROUPS)}
    skip = set(skip)
    for name in skip:
        if name not in known:
            raise DeepRebirthError(f"unknown rule or group {name!r} in the rules to skip", options=("skip",))
    return tuple(r for r in RULES if r.name in wanted and r.name not in skip and r.group not in skip)


# ---------------------------------------------------------------------------------------------------------------
# the driver: every path that applies rules (rewrite, plan, inspect, the runtime plan, risk) goes through these


def candidates(graph: Graph, rules: Sequence[Rule], config: RuleConfig,
               allowed: Callable[[tuple[str, ...]], bool] | None = None) -> Iterator[tuple[Rule, Match]]:
    """Where each rule can fire now, in rule order (lazily: a rule's matches are computed when reached)."""
    for rule in rules:
        for found in rule.match(graph, config):
            if isinstance(found, Match) and (allowed is None or allowed(found.layers)):
                yield rule, found


def skips(graph: Graph, rules: Sequence[Rule], config: RuleConfig) -> list[tuple[str, Skip]]:
    """Where each rule would not fire, and why: (rule name, skip)."""
    return [(rule.name, found) for rule in rules for found in rule.match(graph, config) if isinstance(found, Skip)]


def find_again(graph: Graph, rule: Rule, anchor: str, config: RuleConfig) -> Match | None:
    """``rule``'s match anchored at ``anchor`` in ``graph`` as it is now (None: an earlier change took its place)."""
    return next((m for _, m in candidates(graph, (rule,), config) if m.layers[0] == anchor), None)


def apply_one(graph: Graph, rule: Rule, found: Match, config: RuleConfig) -> Change:
    """Apply one match in place, then check what every path checks: the IR's invariants and finite weights."""
    try:
        with np.errstate(all="ignore"):  # an overflow is reported by _check_finite, not as a warning
            change = rule.apply(graph, found, config)
        graph.check()
    except GraphError as err:
        raise GraphError(f"rule {rule.name} at {found.layers[0]!r}: {err}") from err
    _check_finite(graph, change)
    return change


def stages(state: Graph, rules: Sequence[Rule], config: RuleConfig) -> Iterator[tuple[int, list[tuple[Rule, Match]]]]:
    """Every merge that could be made, stage by stage, on ``state`` (changed in place). Stage 0 is what matches
    the net as given; stage n is what newly matches (rule, anchor not seen before) once every earlier candidate is
    applied in rule order, as ``rewrite`` would. Each stage is yielded before ``state`` advances past it. As in
    ``rewrite``, the opt-in rules (Tucker) come in only at a stage where the others have nothing new, so they are
    planned on the slimmed convs that ``rewrite`` decomposes."""
    seen: set[tuple[str, str]] = set()  # (rule, anchor layer): one candidate per place
    for stage in range(MAX_STAGES):
        matching = [(rule, m) for rule, m in candidates(state, rules, config) if (rule.name, m.layers[0]) not in seen]
        new = [(rule, m) for rule, m in matching if rule.group not in OPT_IN_GROUPS] or matching
        if not new:
            return
        seen |= {(rule.name, m.layers[0]) for rule, m in new}
        yield stage, new
        for rule, found in new:  # advance: apply this stage's merges that still match after the earlier ones
            current = find_again(state, rule, found.layers[0], config)
            if current is not None:
                apply_one(state, rule, current, config)


def rewrite(graph: Graph, rules: Sequence[Rule] | None = None, only: Iterable[str] = (),
            exclude: Iterable[str] = (), config: RuleConfig | None = None,
            permit: Callable[[Rule, Match], bool] | None = None) -> RewriteReport:
    """Rewrite ``graph`` in place with ``rules`` (default: ``select_rules("all")``). ``only``/``exclude`` restrict
    rules to matches that involve those layer names; ``permit`` (rule, match) has a further say over each match
    (``rewrite --max-drop``: see deeprebirth.plan.recoverable)."""
    rules = select_rules("all") if rules is None else rules
    only, exclude = set(only), set(exclude)
    config = config or RuleConfig()
    report = RewriteReport([r.name for r in rules], NetSummary.of(graph),
                           warnings=graph.warnings + unknown_type_warnings(graph))

    def allowed(layers: tuple[str, ...]) -> bool:
        if only and not only.intersection(layers):
            return False
        return not exclude.intersection(layers)

    # Opt-in rules (Tucker) act on what the slimming rules leave: a pass reaches them only once the other rules
    # changed nothing in it, so slimming is at its fixed point first.
    original_blobs = set(graph.caffe_blob_names().values())
    pending: dict[str, str] = {}  # new layer still to re-learn -> the original blob its change reproduces
    progress = True
    while progress:
        progress = False
        for rule in rules:
            if progress and rule.group in OPT_IN_GROUPS:
                break
            while True:
                found = next((f for f in candidates(graph, (rule,), config, allowed)
                              if permit is None or permit(rule, f[1])), None)
                if found is None:
                    break
                change = apply_one(graph, rule, found[1], config)
                _inherit_reproduces(change, pending, original_blobs)
                report.changes.append(change)
                progress = True
                if len(report.changes) > MAX_CHANGES:
                    raise GraphError("rules did not reach a fixed point")
    for name, skip in skips(graph, rules, config):
        report.skipped.setdefault(name, []).append(skip)
    report.after = NetSummary.of(graph)
    return report
