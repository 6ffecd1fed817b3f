"""What a rule is: a name, whether it is exact, ``match`` (read-only) and ``apply`` (graph surgery); and the user
choices that steer the lossy rules (``RULE_OPTIONS``), each declared once here: the API validates against it and
the CLI builds its flags from it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deeprebirth.ir.graph import Graph
from deeprebirth.option import Option
from deeprebirth.weights.branches import WIDEN_MODES
from deeprebirth.weights.tucker import DEFAULT_RANK_METHOD, RANK_METHODS, parse_rank_method


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


RULE_OPTIONS: tuple[Option, ...] = (
    Option("init", str, "inherit", choices=("inherit", "filler"), concept="init",
           help="start merged layers from the original weights where shapes allow, or from fillers"),
    Option("widen", str, "balanced", choices=WIDEN_MODES, concept="widen mode",
           help="which inception branch receives the channels of the removed branches"),
    Option("seed", int, 0, help="seed for random inputs and new weights"),
    Option("rank_method", str, DEFAULT_RANK_METHOD, parse=parse_rank_method, known=RANK_METHODS, concept="rank method",
           help=f"Tucker ranks per conv (rule decompose_conv_tucker): {RANK_METHODS}"),
)
RULE_OPTION: dict[str, Option] = {option.name: option for option in RULE_OPTIONS}
RULE_DEFAULTS: dict[str, Any] = {option.name: option.default for option in RULE_OPTIONS}


@dataclass(frozen=True)
class RuleConfig:
    """User choices that change how lossy rules build their new layers (declared in ``RULE_OPTIONS``)."""

    init: str = RULE_DEFAULTS["init"]  # start new layers from the original weights where shapes allow, or fillers
    widen: str = RULE_DEFAULTS["widen"]  # merge_inception_branches: where freed channels go
    seed: int = RULE_DEFAULTS["seed"]  # for the random parts of new weights
    rank_method: str = RULE_DEFAULTS["rank_method"]  # decompose_conv_tucker: how ranks are chosen

    def validate(self) -> RuleConfig:
        for option in RULE_OPTIONS:
            option.validate(getattr(self, option.name))
        return self


@dataclass(frozen=True)
class Rule:
    name: str
    exact: bool
    group: str  # "exact", "streamline", "branch", ...
    match: Callable[[Graph, RuleConfig], Iterator[Match | Skip]]
    apply: Callable[[Graph, Match, RuleConfig], Change]
