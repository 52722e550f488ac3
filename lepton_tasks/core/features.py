"""Federated normalization: additive sufficient statistics per partner, merged into global statistics.

Each partner computes :class:`SufficientStats` on **its training split only** (the caller's responsibility:
:func:`lepton_tasks.ingest.prepare.prepare_drop` feeds only training rows; fitting on holdout rows would leak
them into the model's inputs). Per numeric feature: count, sum, sum of squares, null count; per categorical
feature: the count of each *declared* category (or hashed bucket, below); plus the label counts. No rows ever
leave the partner: only these sums.

What leaves a site is never a cell value (staging manifests carry these statistics, and each run's
``stats.json`` is their merge):

* no minimum or maximum: a column's extremes are single customers' exact values (a balance, an income).
  Where a range is needed it is the contract's declared one (:func:`declared_range`: ``clip``, else
  ``min``/``max``), which is public; cleaning already clips to ``clip``. Nothing in normalization needs a
  range: z-scores use only means and standard deviations, which come from the sums;
* categorical counts are keyed only by the contract's ``allowed`` values; any other value a non-critical
  column lets through is counted in ``other_count``, unnamed. A categorical feature without an ``allowed``
  list has no public vocabulary, so its values are hashed into ``model.hash_buckets`` buckets with the
  model's id hashing (:func:`category_keys`, identical to :func:`lepton_tasks.trainer.data.hash_ids`) and
  counted per bucket key ``#<b>``. The hash is unkeyed: it keeps raw strings from leaving, but a party that
  can guess a value can test it, so a column whose values are sensitive should declare ``allowed`` (or be
  ``ignore``);
* labels are counted only for the label's ``allowed`` values (the positive label alone when none are
  declared); others go to ``label_other_count``.

Counts, sums and sums of squares still leave as exact numbers (one row's sum is its value): secure
aggregation, with noise when DP is on, is what protects them.

:func:`merge` adds them up (associative and commutative, so any aggregation tree gives the same result up to
floating-point rounding), :meth:`GlobalStats.from_stats` derives means, population standard deviations
(``std = 0`` → 1), sorted vocabularies and modes, and :func:`transform` turns a cleaned, typed frame
into the MODEL-READY frame every trainer consumes:

* ``label``: int8, 1 where the label equals ``positive_label``;
* numeric feature ``c`` (int/float/bool/timestamp-as-epoch-seconds) → float32 z-score ``(x - mean) / std``;
  missing values filled per policy: ``mean``/``indicator``/``drop``/``mode`` → 0 (the mean after
  standardization), ``constant`` → the standardized ``fill_value``; ``indicator`` adds ``c__missing`` (float32
  1/0);
* categorical feature ``c`` → one float32 one-hot column ``c=<value>`` per vocabulary value (vocabulary =
  sorted ``allowed`` values when the contract lists them, else the hashed buckets ``#<b>`` seen in training,
  in bucket order); an unseen category → all zeros; missing → the federated mode (``mode``/``mean``/
  ``indicator``), the ``fill_value`` (``constant``) or all zeros (``drop``); ``indicator`` adds
  ``c__missing``;
* ``id``-role columns kept raw as strings (sequence models hash ids themselves), ``timestamp``-role columns
  as int64 epoch seconds; ``ignore``-role columns dropped.

Column order: id and timestamp columns (contract order), then :func:`feature_names`, then ``label``.

Precision note: variance from ``sum_sq/n - mean²`` loses digits when ``|mean| ≫ std`` (e.g. raw epoch
seconds as a feature: ~10⁻⁷ relative); fine for the contracts' features, clamped at 0 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from lepton_tasks.core.contracts import ColumnSpec, Contract

__all__ = [
    "BUCKET_PREFIX",
    "CategoricalStats",
    "GlobalStats",
    "NumericStats",
    "SufficientStats",
    "categorical_features",
    "category_keys",
    "category_vocabulary",
    "declared_labels",
    "declared_range",
    "feature_names",
    "merge",
    "numeric_features",
    "transform",
]

#: key prefix of a hashed category bucket (categorical feature without an ``allowed`` list): ``#<bucket>``
BUCKET_PREFIX = "#"


def numeric_features(contract: Contract) -> list[str]:
    """The contract's numeric features, in contract order (the statistics' and the model's order)."""
    return [c for c, s in contract.columns.items() if s.role == "feature" and s.is_numeric()]


def categorical_features(contract: Contract) -> list[str]:
    """The contract's categorical features, in contract order."""
    return [c for c, s in contract.columns.items() if s.role == "feature" and not s.is_numeric()]


def declared_labels(contract: Contract) -> list[str]:
    """Every label value the statistics may count by name (sorted): the label's ``allowed`` values, or the
    positive label alone; any other value is counted unnamed."""
    spec = contract.columns[contract.label]
    return sorted(spec.allowed) if spec.allowed is not None else [contract.positive_label]


def category_vocabulary(contract: Contract, column: str) -> list[str]:
    """Every key a categorical feature may be counted under: its allowed values (sorted), or every hashed
    bucket. A fixed, data-independent layout: what secure aggregation and the DP release vectorize."""
    spec = contract.columns[column]
    if spec.allowed is not None:
        return sorted(spec.allowed)
    return [f"{BUCKET_PREFIX}{b}" for b in range(1, contract.model.hash_buckets)]


def _as_float(s: pd.Series, spec: ColumnSpec) -> np.ndarray:
    """Numeric view of a typed column as float64 with NaN for missing (timestamps: epoch seconds)."""
    if spec.dtype == "timestamp" or pd.api.types.is_datetime64_any_dtype(s.dtype):
        ts = pd.to_datetime(s, utc=True)
        out = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        return np.asarray(out.to_numpy(dtype="float64", na_value=np.nan))
    if spec.dtype == "bool" and not pd.api.types.is_numeric_dtype(s.dtype):
        s = s.astype("boolean")
    x = pd.to_numeric(s, errors="raise").astype("Float64")
    return np.asarray(x.to_numpy(dtype="float64", na_value=np.nan))


def _as_str(s: pd.Series) -> pd.Series:
    return s if s.dtype == "str" else s.astype("str")


def _label_strings(s: pd.Series) -> pd.Series:
    return _as_str(s)


def declared_range(spec: ColumnSpec) -> tuple[float | None, float | None]:
    """The public range of a numeric column: its ``clip`` bounds when declared, else ``(min, max)``.

    Either end is ``None`` when the contract does not bound it. This is what to use wherever a range is
    needed: the observed extremes are single records' exact values and never leave a site. A column with no
    declared range has none; a consumer that truly needs one can take ``mean ± k·std`` from
    :class:`NumericSummary` (derived from the sums), never the data's min/max.
    """
    if spec.clip is not None:
        return float(spec.clip[0]), float(spec.clip[1])
    return spec.min, spec.max


def category_keys(s: pd.Series, spec: ColumnSpec, buckets: int) -> pd.Series:
    """The keys a categorical column is counted and one-hot encoded under (missing stays missing).

    With an ``allowed`` list: the values themselves (as strings; undeclared ones are the caller's to bucket).
    Without: ``#<b>`` where ``b`` in ``1..buckets-1`` is the value's bucket under the model's id hashing
    (pandas' SipHash-2-4 with its fixed key, exactly :func:`lepton_tasks.trainer.data.hash_ids`), so no raw
    value is ever a key of statistics that leave the site.
    """
    s = _as_str(s)
    if spec.allowed is not None:
        return s
    if buckets < 2:
        raise ValueError(f"hash_buckets must be >= 2 (bucket 0 is padding), got {buckets}")
    present = s.notna().to_numpy()
    keys = np.full(len(s), None, dtype=object)
    if present.any():
        h = pd.util.hash_array(s[present].to_numpy(dtype=object), categorize=True)
        b = 1 + (h % np.uint64(buckets - 1))
        keys[present] = [f"{BUCKET_PREFIX}{int(v)}" for v in b]
    return pd.Series(keys, index=s.index, dtype="str")


def _is_bucket_key(key: str) -> bool:
    return key.startswith(BUCKET_PREFIX) and key[len(BUCKET_PREFIX) :].isdigit()


class NumericStats(BaseModel):
    """Additive statistics of one numeric feature (non-null values; ``null_count`` counts the others).

    Deliberately no minimum or maximum (they are single records' values); statistics written before this
    change still load: their ``min``/``max`` fields are ignored and dropped.
    """

    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    null_count: int = 0

    def add(self, other: NumericStats) -> NumericStats:
        return NumericStats(
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sum_sq=self.sum_sq + other.sum_sq,
            null_count=self.null_count + other.null_count,
        )

    @classmethod
    def of(cls, values: np.ndarray) -> NumericStats:
        present = values[~np.isnan(values)]
        if len(present) == 0:
            return cls(null_count=len(values))
        return cls(
            count=len(present),
            sum=float(present.sum()),
            sum_sq=float(np.dot(present, present)),
            null_count=len(values) - len(present),
        )


class CategoricalStats(BaseModel):
    """Counts per declared category (or hashed bucket ``#<b>``, see :func:`category_keys`) of one feature.

    ``other_count`` counts present values outside the contract's ``allowed`` list (a non-critical column lets
    them through): they are never named.
    """

    counts: dict[str, int] = Field(default_factory=dict)
    other_count: int = 0
    null_count: int = 0

    def add(self, other: CategoricalStats) -> CategoricalStats:
        counts = dict(self.counts)
        for k, v in other.counts.items():
            counts[k] = counts.get(k, 0) + v
        return CategoricalStats(
            counts=dict(sorted(counts.items())),
            other_count=self.other_count + other.other_count,
            null_count=self.null_count + other.null_count,
        )

    @classmethod
    def of(cls, s: pd.Series, spec: ColumnSpec, buckets: int) -> CategoricalStats:
        """Statistics of column ``s`` under ``spec``; ``buckets``: the contract's ``model.hash_buckets``."""
        vc = category_keys(s, spec, buckets).value_counts(dropna=True)
        counts = {str(k): int(v) for k, v in vc.items()}
        other = 0
        if spec.allowed is not None:
            allowed = set(spec.allowed)
            other = sum(v for k, v in counts.items() if k not in allowed)
            counts = {k: v for k, v in counts.items() if k in allowed}
        return cls(counts=dict(sorted(counts.items())), other_count=other, null_count=int(s.isna().sum()))


class SufficientStats(BaseModel):
    """One partner's (or a merged group's) additive statistics over TRAINING rows of one dataset."""

    dataset: str
    contract_version: int
    rows: int = 0
    numeric: dict[str, NumericStats] = Field(default_factory=dict)
    categorical: dict[str, CategoricalStats] = Field(default_factory=dict)
    label_counts: dict[str, int] = Field(default_factory=dict)
    #: labels outside the label's ``allowed`` values (outside ``{positive_label}`` when none are declared)
    label_other_count: int = 0

    @classmethod
    def empty(cls, contract: Contract) -> SufficientStats:
        return cls(
            dataset=contract.name,
            contract_version=contract.version,
            numeric={c: NumericStats() for c in numeric_features(contract)},
            categorical={c: CategoricalStats() for c in categorical_features(contract)},
        )

    @classmethod
    def from_frame(cls, df: pd.DataFrame, contract: Contract) -> SufficientStats:
        """Statistics of ``df`` (a cleaned, typed training frame)."""
        return cls.empty(contract).update(df, contract)

    def update(self, df: pd.DataFrame, contract: Contract | None = None) -> SufficientStats:
        """Add the rows of ``df`` (chunk by chunk); returns ``self``."""
        if contract is None:
            from lepton_tasks.core.contracts import load_contract

            contract = load_contract(self.dataset)
        self._check(contract)
        if df.empty:
            return self
        for c in self.numeric:
            self.numeric[c] = self.numeric[c].add(NumericStats.of(_as_float(df[c], contract.columns[c])))
        for c in self.categorical:
            self.categorical[c] = self.categorical[c].add(
                CategoricalStats.of(df[c], contract.columns[c], contract.model.hash_buckets)
            )
        labels = _label_strings(df[contract.label]).value_counts(dropna=True)
        declared = set(declared_labels(contract))
        counts = dict(self.label_counts)
        for k, v in labels.items():
            if str(k) in declared:
                counts[str(k)] = counts.get(str(k), 0) + int(v)
            else:
                self.label_other_count += int(v)
        self.label_counts = dict(sorted(counts.items()))
        self.rows += len(df)
        return self

    def _check(self, contract: Contract) -> None:
        if (contract.name, contract.version) != (self.dataset, self.contract_version):
            raise ValueError(
                f"statistics of {self.dataset}@v{self.contract_version} cannot be used with "
                f"{contract.version_tag}"
            )

    def merged_with(self, other: SufficientStats) -> SufficientStats:
        if (other.dataset, other.contract_version) != (self.dataset, self.contract_version):
            raise ValueError(
                f"cannot merge statistics of {self.dataset}@v{self.contract_version} with "
                f"{other.dataset}@v{other.contract_version}"
            )
        if set(other.numeric) != set(self.numeric) or set(other.categorical) != set(self.categorical):
            raise ValueError("cannot merge statistics over different feature sets")
        labels = dict(self.label_counts)
        for k, v in other.label_counts.items():
            labels[k] = labels.get(k, 0) + v
        return SufficientStats(
            dataset=self.dataset,
            contract_version=self.contract_version,
            rows=self.rows + other.rows,
            numeric={c: s.add(other.numeric[c]) for c, s in self.numeric.items()},
            categorical={c: s.add(other.categorical[c]) for c, s in self.categorical.items()},
            label_counts=dict(sorted(labels.items())),
            label_other_count=self.label_other_count + other.label_other_count,
        )


def merge(stats: Iterable[SufficientStats]) -> SufficientStats:
    """Sum partners' statistics (associative, commutative). Raises ``ValueError`` on an empty list."""
    items = list(stats)
    if not items:
        raise ValueError("merge needs at least one SufficientStats")
    out = items[0]
    for s in items[1:]:
        out = out.merged_with(s)
    return out.model_copy(deep=True)


class NumericSummary(BaseModel):
    """Mean and population std of one numeric feature (no observed range: see :func:`declared_range`)."""

    count: int
    null_count: int
    mean: float
    std: float


class CategoricalSummary(BaseModel):
    vocab: list[str]
    mode: str | None
    counts: dict[str, int]
    other_count: int = 0
    null_count: int


class GlobalStats(BaseModel):
    """Normalization parameters derived from the merged training statistics of all partners."""

    dataset: str
    contract_version: int
    rows: int
    numeric: dict[str, NumericSummary]
    categorical: dict[str, CategoricalSummary]
    label_counts: dict[str, int]
    label_other_count: int = 0

    @classmethod
    def from_stats(cls, stats: SufficientStats, contract: Contract) -> GlobalStats:
        stats._check(contract)
        numeric = {}
        for c, s in stats.numeric.items():
            if s.count == 0:
                mean, std = 0.0, 1.0
            else:
                mean = s.sum / s.count
                var = max(0.0, s.sum_sq / s.count - mean * mean)
                std = math.sqrt(var)
                if not math.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
                    std = 1.0
            numeric[c] = NumericSummary(count=s.count, null_count=s.null_count, mean=mean, std=std)
        categorical = {}
        for c, cs in stats.categorical.items():
            spec = contract.columns[c]
            if spec.allowed is not None:
                vocab = sorted(spec.allowed)
            else:  # hashed buckets seen in training, in bucket order (raw keys of older statistics: ignored)
                vocab = sorted((k for k in cs.counts if _is_bucket_key(k)), key=lambda k: int(k[1:]))
            in_vocab = {k: v for k, v in cs.counts.items() if k in set(vocab)}
            mode = (
                min(in_vocab, key=lambda k: (-in_vocab[k], k)) if in_vocab else (vocab[0] if vocab else None)
            )
            categorical[c] = CategoricalSummary(
                vocab=vocab, mode=mode, counts=cs.counts, other_count=cs.other_count, null_count=cs.null_count
            )
        return cls(
            dataset=stats.dataset,
            contract_version=stats.contract_version,
            rows=stats.rows,
            numeric=numeric,
            categorical=categorical,
            label_counts=stats.label_counts,
            label_other_count=stats.label_other_count,
        )

    def positive_rate(self, contract: Contract) -> float:
        total = sum(self.label_counts.values()) + self.label_other_count
        return self.label_counts.get(contract.positive_label, 0) / total if total else 0.0


def feature_names(contract: Contract, global_stats: GlobalStats) -> list[str]:
    """The float32 feature columns of :func:`transform`'s output, in order."""
    names: list[str] = []
    for c, spec in contract.columns.items():
        if spec.role != "feature":
            continue
        if spec.is_numeric():
            names.append(c)
        else:
            names += [f"{c}={v}" for v in global_stats.categorical[c].vocab]
        if spec.missing == "indicator":
            names.append(f"{c}__missing")
    return names


def _epoch_seconds(s: pd.Series, column: str) -> np.ndarray:
    ts = pd.to_datetime(s, utc=True)
    if ts.isna().any():
        raise ValueError(
            f"timestamp column {column!r} has missing values (cleaning should have dropped them)"
        )
    return np.asarray(((ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64))


def transform(df: pd.DataFrame, contract: Contract, global_stats: GlobalStats) -> pd.DataFrame:
    """The model-ready frame for ``df`` (cleaned and typed rows of ``contract``); see the module docstring."""
    if (global_stats.dataset, global_stats.contract_version) != (contract.name, contract.version):
        raise ValueError(
            f"global statistics of {global_stats.dataset}@v{global_stats.contract_version} do not match "
            f"{contract.version_tag}"
        )
    n = len(df)
    out: dict[str, np.ndarray | pd.Series] = {}
    for c, spec in contract.columns.items():
        if spec.role == "id":
            out[c] = _as_str(df[c]).to_numpy()
        elif spec.role == "timestamp":
            out[c] = _epoch_seconds(df[c], c)
    for c, spec in contract.columns.items():
        if spec.role != "feature":
            continue
        if spec.is_numeric():
            g = global_stats.numeric[c]
            x = _as_float(df[c], spec)
            missing = np.isnan(x)
            z = (x - g.mean) / g.std
            fill = 0.0
            if spec.missing == "constant" and spec.fill_value is not None:
                fill = (float(spec.fill_value) - g.mean) / g.std
            z[missing] = fill
            out[c] = z.astype(np.float32)
        else:
            cat = global_stats.categorical[c]
            buckets = contract.model.hash_buckets
            s = category_keys(df[c], spec, buckets)
            missing = s.isna().to_numpy()
            if spec.missing in ("mode", "mean", "indicator"):
                s = s.where(~missing, cat.mode)
            elif spec.missing == "constant" and spec.fill_value is not None:
                fill = category_keys(pd.Series([str(spec.fill_value)], dtype="str"), spec, buckets).iloc[0]
                s = s.where(~missing, fill)
            # unseen/undeclared categories (and a missing value left missing) → -1 → all zeros
            codes = pd.Index(cat.vocab, dtype="str").get_indexer(s)
            onehot = np.zeros((n, len(cat.vocab)), dtype=np.float32)
            hit = codes >= 0
            onehot[np.flatnonzero(hit), codes[hit]] = 1.0
            for j, v in enumerate(cat.vocab):
                out[f"{c}={v}"] = onehot[:, j]
        if spec.missing == "indicator":
            out[f"{c}__missing"] = missing.astype(np.float32)
    labels = _label_strings(df[contract.label])
    if labels.isna().any():
        raise ValueError(
            f"label column {contract.label!r} has missing values (cleaning should have dropped them)"
        )
    out["label"] = (labels == contract.positive_label).to_numpy(dtype=np.int8)
    frame = pd.DataFrame(out, index=df.index)
    for c, spec in contract.columns.items():
        if spec.role == "id":
            frame[c] = frame[c].astype("str")
    return frame
