"""The driver: apply rules to a fixed point, check the IR after every change, and report what happened."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph, GraphError
from deeprebirth.rules import RULES, Change, Rule, RuleConfig, Skip
from deeprebirth.shapes import infer_shapes, layer_costs

MAX_CHANGES = 100_000  # a guard against a rule pair that undoes each other


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

    @property
    def relearn(self) -> list[str]:
        return [name for change in self.changes for name in change.relearn]

    def to_json(self) -> dict[str, object]:
        return {
            "rules": self.rules,
            "before": asdict(self.before),
            "after": asdict(self.after) if self.after else None,
            "changes": [asdict(c) for c in self.changes],
            "skipped": {rule: [asdict(s) for s in skips] for rule, skips in self.skipped.items()},
            "relearn": self.relearn,
        }


def select_rules(names: Sequence[str] | str = "all", skip: Iterable[str] = ()) -> tuple[Rule, ...]:
    """Rules by name or group ("exact", "streamline", "branch", "all"), kept in the canonical order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    wanted: set[str] = set()
    known = {rule.name for rule in RULES} | {rule.group for rule in RULES} | {"all"}
    for name in names:
        if name not in known:
            raise DeepRebirthError(f"unknown rule or group {name!r} (known: {', '.join(sorted(known))})")
        wanted |= {r.name for r in RULES if name in ("all", r.name, r.group)}
    skip = set(skip)
    for name in skip:
        if name not in known:
            raise DeepRebirthError(f"unknown rule or group {name!r} in --skip")
    return tuple(r for r in RULES if r.name in wanted and r.name not in skip and r.group not in skip)


def rewrite(graph: Graph, rules: Sequence[Rule] = RULES, only: Iterable[str] = (),
            exclude: Iterable[str] = (), config: RuleConfig | None = None) -> RewriteReport:
    """Rewrite ``graph`` in place. ``only``/``exclude`` restrict rules to matches that involve those layer names."""
    only, exclude = set(only), set(exclude)
    config = config or RuleConfig()
    report = RewriteReport([r.name for r in rules], NetSummary.of(graph))

    def allowed(layers: tuple[str, ...]) -> bool:
        if only and not only.intersection(layers):
            return False
        return not exclude.intersection(layers)

    progress = True
    while progress:
        progress = False
        for rule in rules:
            while True:
                found = next((m for m in rule.match(graph, config) if not isinstance(m, Skip) and allowed(m.layers)), None)
                if found is None:
                    break
                try:
                    change = rule.apply(graph, found, config)
                    graph.check()
                except GraphError as err:
                    raise GraphError(f"rule {rule.name} at {found.layers[0]!r}: {err}") from err
                report.changes.append(change)
                progress = True
                if len(report.changes) > MAX_CHANGES:
                    raise GraphError("rules did not reach a fixed point")
    for rule in rules:
        skips = [m for m in rule.match(graph, config) if isinstance(m, Skip)]
        if skips:
            report.skipped[rule.name] = skips
    report.after = NetSummary.of(graph)
    return report
