"""Hospitals: the real Wisconsin Diagnostic Breast Cancer data (569 patients), split non-IID over 3 hospitals.

Source: Street, Wolberg & Mangasarian (1993), UCI ML repository, shipped with scikit-learn
(``sklearn.datasets.load_breast_cancer``, offline). 30 numeric features (names in snake_case, e.g.
``mean_concave_points``), a stable ``patient_id`` (``p0001`` …) and ``diagnosis`` (``malignant``/``benign``).

Non-IID by tumour size (tercile of ``mean_radius``), like a referral network:

* ``hospital_a`` — a screening clinic: mostly small masses, few malignant (~160 patients);
* ``hospital_b`` — a general hospital: all sizes, the largest (~280 patients);
* ``hospital_c`` — an oncology centre: mostly large masses, mostly malignant (~125 patients).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DATASET = "hospitals"
PARTNERS = ["hospital_a", "hospital_b", "hospital_c"]

#: P(hospital | mean_radius tercile)
_TERCILE_PROBS = [[0.60, 0.35, 0.05], [0.20, 0.70, 0.10], [0.05, 0.45, 0.50]]


def load_wdbc() -> pd.DataFrame:
    """All 569 patients: ``patient_id``, the 30 features (snake_case), ``diagnosis``."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    features = data.data.rename(columns=lambda c: c.strip().lower().replace(" ", "_"))
    names = np.asarray(data.target_names)[data.target.to_numpy()]
    df = pd.DataFrame({"patient_id": [f"p{i + 1:04d}" for i in range(len(features))]})
    df = pd.concat([df, features.astype("float64")], axis=1)
    df["diagnosis"] = pd.Series(names, dtype="str")
    return df


def generate(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Partner → its patients (raw, as dropped). Deterministic for a given ``seed``."""
    df = load_wdbc()
    rng = np.random.default_rng(seed)
    tercile = np.searchsorted(
        df["mean_radius"].quantile([1 / 3, 2 / 3]).to_numpy(), df["mean_radius"], side="right"
    )
    u = rng.random(len(df))
    hospital = np.empty(len(df), dtype=np.int64)
    for t, probs in enumerate(_TERCILE_PROBS):
        sel = tercile == t
        hospital[sel] = np.searchsorted(np.cumsum(probs), u[sel], side="right")
    hospital = np.minimum(hospital, len(PARTNERS) - 1)
    return {p: df[hospital == i].reset_index(drop=True) for i, p in enumerate(PARTNERS)}
