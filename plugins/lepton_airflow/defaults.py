"""The retry policy every Lepton DAG shares.

Transient failures (a storage or Vault outage, a service restarting) retry with exponential backoff from
15 s up to 2 min between tries; with 4 retries a task rides out about 4 to 5 minutes of outage (measured in
``bench/faults``). Failures no retry can fix (bad data, a security check, a policy refusal) raise
``AirflowFailException`` and fail at once whatever the policy says.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def default_args(*, retries: int = 4) -> dict[str, Any]:
    """A DAG's ``default_args``: owner ``lepton`` and the shared backoff, with ``retries`` tries after the
    first."""
    return {
        "owner": "lepton",
        "retries": retries,
        "retry_delay": timedelta(seconds=15),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=2),
    }
