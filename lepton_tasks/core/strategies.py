"""The aggregation strategies: the one list (trigger form, plan, aggregator and site policies use it).

A light module (no numpy, no pandas) so DAG files can import it at parse time.
"""

from __future__ import annotations

from typing import Literal, get_args

Strategy = Literal["fedavg", "fedprox", "median", "trimmed_mean", "krum"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

#: strategies that need every partner's individual update, so they cannot run under secure aggregation
#: (which reveals only the sum)
NEEDS_INDIVIDUAL_UPDATES: frozenset[str] = frozenset({"median", "trimmed_mean", "krum"})
