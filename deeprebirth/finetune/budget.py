"""How long fine-tuning may run, and how that is shared out (pure arithmetic, no Caffe).

A budget is wall-clock time (``90s``, ``10m``, ``1.5h``), solver iterations (``3000it``) or epochs of the training
data (``5ep``). It covers the whole run: learning-rate search, training, held-out evaluations, and the final
measurement; only loading the nets and data comes before it starts.

Sharing rule: each phase has a weight; the layer-wise schedule gives its K steps ``1 / (2K)`` each and the
closing whole-net phase ``1/2``; the whole-net schedule has one phase of weight 1. A time budget is shared when a
phase starts: it gets ``remaining × w_i / Σ_{j≥i} w_j``, so time one phase did not use goes to the later ones. An
iteration budget is shared up front (each phase at least one iteration).

Within a phase (see ``deeprebirth.finetune.phase``): at most ``search.SEARCH_SHARE`` of it goes to the learning-rate
search and about ``EVAL_SHARE`` to held-out evaluations; the rest is training. A phase plans its iterations from a
few timed ones, then checks its pace a few times on the way and re-plans (the solver's state carries over); it stops
at its deadline, and the last one plans slightly more iterations than fit, so the run ends on its budget, early or
late by at most 5% in the tests.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from deeprebirth.errors import DeepRebirthError

UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "it": 0.0, "ep": 0.0}
EVAL_SHARE = 0.1


@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # "s" (seconds), "it" (solver iterations) or "ep" (epochs)

    @classmethod
    def parse(cls, text: str) -> Budget:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h|it|ep)\s*", str(text).lower())
        if not found or float(found.group(1)) <= 0:
            raise DeepRebirthError(f"budget {text!r}: expected a positive amount and a unit, e.g. 10m, 90s, 1.5h, "
                                   "3000it or 5ep")
        amount, unit = float(found.group(1)), found.group(2)
        if unit in ("it", "ep"):
            return cls(amount, unit)
        return cls(amount * UNITS[unit], "s")

    @property
    def timed(self) -> bool:
        return self.unit == "s"

    def iterations(self, epoch_iterations: int) -> int:
        """The budget in solver iterations (iteration and epoch budgets only)."""
        if self.unit == "it":
            return max(1, round(self.amount))
        if self.unit == "ep":
            return max(1, round(self.amount * epoch_iterations))
        raise ValueError("a time budget has no fixed number of iterations")

    def __str__(self) -> str:
        if self.unit == "s":
            return f"{self.amount / 60:g}m" if self.amount >= 60 else f"{self.amount:g}s"
        return f"{self.amount:g}{self.unit}"


def phase_weights(steps: int, layerwise: bool) -> list[float]:
    """The sharing rule: K layer-wise steps share one half, the whole-net phase the other (or everything)."""
    if not layerwise or steps == 0:
        return [1.0]
    return [0.5 / steps] * steps + [0.5]


def share_iterations(total: int, weights: list[float]) -> list[int]:
    """An iteration budget split by weight up front (each phase at least one)."""
    return [max(1, round(total * w / sum(weights))) for w in weights]


def share_time(remaining: float, weights: list[float], index: int) -> float:
    """Seconds for phase ``index`` when it starts with ``remaining`` seconds left for it and the later phases."""
    rest = sum(weights[index:])
    return max(0.0, remaining * weights[index] / rest) if rest > 0 else 0.0


class Clock:
    """Seconds since the run started, against a time budget (``None``: no time limit)."""

    def __init__(self, seconds: float | None, spent: float = 0.0) -> None:
        self.start = time.monotonic() - spent
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()
