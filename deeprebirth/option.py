"""A user choice declared once (``Option``): the library validates values against it and the command line builds
its flags, defaults and help from it, so neither can drift from the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deeprebirth.errors import DeepRebirthError


@dataclass(frozen=True)
class Option:
    """One user choice, declared once: its name (``--name-with-dashes`` on the command line), type, default, allowed
    values (``choices`` for a closed set, ``parse`` raising ValueError for an open one) and help. ``concept`` names
    it in error messages ("unknown widen mode '4x4'"); ``multiple`` options take a list; ``minimum`` and
    ``maximum`` bound a number (``open_bounds``: the bounds themselves excluded, "min", "max" or "both");
    ``flag`` is the command-line name when it is not the attribute's. For the command line only: ``path`` ("file",
    "dir" or "any") takes a file system path, ``switch`` is an on/off flag (``negatable``: with a --no- form),
    ``nargs`` takes that many values, ``required`` must be given."""

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
    maximum: float | None = None
    open_bounds: str = ""
    path: str = ""
    switch: bool = False
    negatable: bool = False
    nargs: int = 1
    required: bool = False

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


def declared(options: tuple[Option, ...]) -> dict[str, Option]:
    """Name -> declaration."""
    return {option.name: option for option in options}
