"""What a rule is: a name, whether it is exact, ``match`` (read-only) and ``apply`` (graph surgery); and the user
choices that steer the lossy rules (``RULE_OPTIONS``), each declared once here: the API validates against it and
the CLI builds its flags from it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph
from deeprebirth.weights.branches import WIDEN_MODES
from deeprebirth.weights.tucker import RANK_METHODS, parse_rank_method


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
class Option:
    """One user choice, declared once: its name (``--name-with-dashes`` on the command line), type, default, allowed
    values (``choices`` for a closed set, ``parse`` raising ValueError for an open one) and help. ``concept`` names
    it in error messages ("unknown widen mode '4x4'"); ``multiple`` options take a list; ``minimum`` bounds a
    number from below; ``flag`` is the command-line name when it is not the attribute's."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    parse: Callable[[str], object] | None = None
    concept: str = ""
    known: str = ""  # the allowed values of an open set, for messages and help
    multiple: bool = False
    minimum: float | None = None
    metavar: str | None = None
    flag: str | None = None
    show_default: bool = True

    def validate(self, value: Any) -> None:
        """DeepRebirthError naming the concept and the allowed values when ``value`` is not one of them."""
        if value is None or self.multiple:
            return
        concept = self.concept or self.name.replace("_", " ")
        if self.choices and value not in self.choices:
            raise DeepRebirthError(f"unknown {concept} {value!r} (known: {', '.join(self.choices)})")
        if self.parse is not None:
            try:
                self.parse(value)
            except ValueError:
                raise DeepRebirthError(f"unknown {concept} {value!r} (known: {self.known})") from None
        if self.minimum is not None and value < self.minimum:
            raise DeepRebirthError(f"{concept} must be at least {self.minimum:g}, not {value!r}")


RULE_OPTIONS: tuple[Option, ...] = (
    Option("init", str, "inherit", choices=("inherit", "filler"), concept="init",
           help="start merged layers from the original weights where shapes allow, or from fillers"),
    Option("widen", str, "balanced", choices=WIDEN_MODES, concept="widen mode",
           help="which inception branch receives the channels of the removed branches"),
    Option("seed", int, 0, help="seed for random inputs and new weights"),
    Option("rank_method", str, "vbmf", parse=parse_rank_method, known=RANK_METHODS, concept="rank method",
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
