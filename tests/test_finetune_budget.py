"""The budget's arithmetic: parsing, the sharing rule."""

from __future__ import annotations

import pytest

from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.budget import Budget, phase_weights, share_iterations, share_time


@pytest.mark.parametrize("text, amount, unit", [("10m", 600, "s"), ("90s", 90, "s"), ("1.5h", 5400, "s"),
                                                ("2min", 120, "s"), ("3000it", 3000, "it"), ("5ep", 5, "ep"),
                                                (" 0.5EP ", 0.5, "ep")])
def test_parse(text: str, amount: float, unit: str) -> None:
    budget = Budget.parse(text)
    assert (budget.amount, budget.unit) == (amount, unit)


@pytest.mark.parametrize("text", ["10", "m", "-3m", "0it", "5 days", ""])
def test_bad_budgets_are_refused_with_the_forms_that_work(text: str) -> None:
    with pytest.raises(DeepRebirthError, match="e.g. 10m, 90s, 1.5h, 3000it or 5ep"):
        Budget.parse(text)


def test_iterations_of_epoch_and_iteration_budgets() -> None:
    assert Budget.parse("3000it").iterations(859) == 3000
    assert Budget.parse("2.5ep").iterations(100) == 250
    with pytest.raises(ValueError):
        Budget.parse("5m").iterations(100)


def test_layerwise_steps_share_half_and_the_whole_net_the_other_half() -> None:
    weights = phase_weights(5, layerwise=True)
    assert weights == [0.1] * 5 + [0.5]
    assert phase_weights(5, layerwise=False) == [1.0] == phase_weights(0, layerwise=True)
    assert share_iterations(1000, weights) == [100] * 5 + [500]
    assert share_iterations(3, weights) == [1] * 5 + [2]  # at least one each


def test_time_is_shared_when_a_phase_starts_so_unused_time_goes_on() -> None:
    weights = [0.25, 0.25, 0.5]
    assert share_time(400, weights, 0) == pytest.approx(100)
    assert share_time(330, weights, 1) == pytest.approx(110)  # phase 0 used only 70 of its 100 s
    assert share_time(200, weights, 2) == pytest.approx(200)
    assert share_time(-5, weights, 2) == 0.0
