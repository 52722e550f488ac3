"""Which round's global model to publish: pure functions, no Airflow, no numpy needed.

Federated training does not improve monotonically: on the Caravan example the global model
scores 0.775 on the partners' held-out data after round 3 and 0.758 after round 5, the last
one. The coordinator therefore publishes the best-scoring round's model, as early stopping with
"restore best weights" would, rather than the last one. The score is the federated held-out
evaluation of each round's global model (each partner scores it on its own holdout; the
coordinator only sees the merged metric). Selecting on that score makes it an optimistic
estimate for the chosen model, so a final report should say which round was kept and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

__all__ = ["best_round"]


def best_round(round_scores: Mapping[int, float | None], *, higher_is_better: bool = True) -> int:
    """The round whose global model scored best on the federated held-out evaluation.

    Args:
        round_scores: ``{round number: score}``; ``None`` for a round that has no score (not
            evaluated, or the metric is undefined there) -- such rounds are skipped. Infinite
            scores order as usual (a diverged loss of ``inf`` is simply the worst).
        higher_is_better: ``True`` for metrics such as AUC or accuracy, ``False`` for losses.

    Returns:
        The round number with the best score; among equal best scores, the earliest round
        (the smallest round number, whatever the mapping's order), which is the cheaper model
        to have trained and the conventional early-stopping choice.

    Raises:
        ValueError: no round has a score (including an empty mapping); a round number that is
            not an integer; a score that is neither ``None`` nor a real number, or is NaN
            (naming the round: a NaN would make every comparison false).
    """
    best: tuple[int, float] | None = None
    for rnd in _sorted_rounds(round_scores):
        score = round_scores[rnd]
        if score is None:
            continue
        if isinstance(score, bool) or not isinstance(score, Real):
            raise ValueError(f"round {rnd}: score must be a real number or None, got {score!r}")
        value = float(score)
        if math.isnan(value):
            raise ValueError(f"round {rnd}: score is NaN; use None for a round without a score")
        if best is None or (value > best[1] if higher_is_better else value < best[1]):
            best = (int(rnd), value)
    if best is None:
        raise ValueError(
            f"no round has a score; cannot choose a model to publish (rounds: {sorted(round_scores)})"
        )
    return best[0]


def _sorted_rounds(round_scores: Mapping[int, float | None]) -> list[int]:
    for rnd in round_scores:
        if isinstance(rnd, bool) or not isinstance(rnd, Integral):
            raise ValueError(f"round numbers must be integers, got {rnd!r}")
    return sorted(round_scores)
