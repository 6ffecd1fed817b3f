"""What a rule is: a name, whether it is exact, ``match`` (read-only) and ``apply`` (graph surgery)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deeprebirth.graph import Graph


@dataclass(frozen=True)
class Match:
    """A place where a rule can fire: the layers involved (the first is the anchor) and what apply() needs."""

    layers: tuple[str, ...]
    data: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Skip:
    """A place that looked like a match but failed a precondition, and why."""

    layer: str
    reason: str


@dataclass
class Change:
    """What one application of a rule did."""

    rule: str
    exact: bool
    removed: list[str]
    added: list[str]
    changed: list[str]
    summary: str
    relearn: list[str] = field(default_factory=list)  # new layers whose weights must be learned (lossy rules)
    reproduces: str | None = None  # the original blob whose activation the new layers should reproduce


@dataclass(frozen=True)
class RuleConfig:
    """User choices that change how lossy rules build their new layers."""

    init: str = "inherit"  # "inherit": start new layers from the original weights where shapes allow; "filler"
    widen: str = "balanced"  # merge_inception_branches: where freed channels go ("3x3", "5x5", "balanced")
    seed: int = 0  # for the random parts of new weights
    rank_method: str = "vbmf"  # decompose_conv_tucker: "vbmf", "energy:F", "speedup:X", "ranks:R1,R2", "full"


@dataclass(frozen=True)
class Rule:
    name: str
    exact: bool
    group: str  # "exact", "streamline", "branch", ...
    match: Callable[[Graph, RuleConfig], Iterator[Match | Skip]]
    apply: Callable[[Graph, Match, RuleConfig], Change]
