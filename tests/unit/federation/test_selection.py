"""Choosing the round to publish (lepton_tasks.federation.selection): hand-checkable scores, every refusal."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lepton_tasks.federation import aggregate
from lepton_tasks.federation.selection import best_round

# Federated held-out AUC of the global model after each round of the Caravan example.
CARAVAN = {1: 0.712, 2: 0.761, 3: 0.775, 4: 0.769, 5: 0.758}


def test_best_round_is_not_the_last_round() -> None:
    assert best_round(CARAVAN) == 3  # 0.775, while the last round scored 0.758


def test_lower_is_better_for_losses() -> None:
    losses = {1: 0.41, 2: 0.33, 3: 0.35}
    assert best_round(losses, higher_is_better=False) == 2
    assert best_round(losses) == 1


def test_ties_go_to_the_earliest_round_whatever_the_mapping_order() -> None:
    scores = {5: 0.8, 2: 0.8, 4: 0.8, 3: 0.7}
    assert best_round(scores) == 2
    assert best_round({5: 0.1, 4: 0.1, 1: 0.3}, higher_is_better=False) == 4


def test_rounds_without_a_score_are_skipped() -> None:
    assert best_round({1: None, 2: 0.6, 3: None, 4: 0.55}) == 2
    assert best_round({1: None, 2: 0.6}, higher_is_better=False) == 2


def test_numpy_and_integer_scores_and_infinite_losses() -> None:
    assert best_round({1: np.float32(0.5), 2: np.float64(0.7), 3: 1}) == 3
    assert best_round({1: float("inf"), 2: 3.0}, higher_is_better=False) == 2  # a diverged loss is worst
    assert best_round({np.int64(7): 0.5}) == 7


@pytest.mark.parametrize("scores", [{}, {1: None}, {1: None, 2: None}], ids=["empty", "one-none", "all-none"])
def test_refuses_when_no_round_has_a_score(scores: dict[int, float | None]) -> None:
    with pytest.raises(ValueError, match="no round has a score"):
        best_round(scores)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ({1: 0.5, 2: float("nan")}, r"round 2: score is NaN"),
        ({1: 0.5, 2: "0.9"}, r"round 2: score must be a real number or None, got '0.9'"),
        ({1: True}, r"round 1: score must be a real number or None, got True"),
        ({"3": 0.5}, r"round numbers must be integers, got '3'"),
        ({1.0: 0.5}, r"round numbers must be integers, got 1.0"),
        ({True: 0.5}, r"round numbers must be integers, got True"),
    ],
)
def test_refuses_malformed_scores(scores: dict[Any, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        best_round(scores)


def test_best_round_is_reexported_by_aggregate() -> None:
    # The coordinator's plan imports it from the aggregation module.
    assert aggregate.best_round is best_round
