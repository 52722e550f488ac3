"""Demo partners and their data: ``banks`` (real ISLR Default), ``hospitals`` (real WDBC) and ``ecommerce``
(synthetic event logs). Each scenario splits or generates data per partner, unevenly and non-IID.

``SCENARIOS[name] = Scenario(dataset, partners, generate)``; ``generate(seed)`` returns
``{partner: raw DataFrame}`` exactly as each partner would drop it, and :func:`to_csv_bytes` writes such a
frame as the CSV file a partner uploads (UTF-8, comma, header, ``\\n`` line endings, floats at full
precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pandas as pd

from lepton_tasks.ops.scenarios import banks, ecommerce, hospitals

__all__ = ["SCENARIOS", "Scenario", "to_csv_bytes"]


class Scenario(NamedTuple):
    dataset: str
    partners: list[str]
    generate: Callable[..., dict[str, pd.DataFrame]]


SCENARIOS: dict[str, Scenario] = {
    "banks": Scenario(banks.DATASET, list(banks.PARTNERS), banks.generate),
    "hospitals": Scenario(hospitals.DATASET, list(hospitals.PARTNERS), hospitals.generate),
    "ecommerce": Scenario(ecommerce.DATASET, list(ecommerce.PARTNERS), ecommerce.generate),
}


def to_csv_bytes(df: pd.DataFrame, *, header: bool = True) -> bytes:
    """``df`` as a partner's CSV file: UTF-8, ``,``, a header, ``\\n`` endings, no index, empty = missing."""
    return df.to_csv(index=False, header=header, lineterminator="\n").encode("utf-8")
