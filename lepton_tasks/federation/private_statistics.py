"""The statistics round under differential privacy: one Gaussian release of the site's statistics.

Without DP a site's statistics answer (``site.training.statistics_answer``) is exact: counts, sums and sums of
squares of its training split (never a minimum, a maximum or a cell value: ``core.features``). Exact sums
still reveal a record that is added or removed (the difference of two answers is its value), and under
secure aggregation the coordinator learns their exact sum over the sites. With DP on (the job's
``hparams.dp``), :func:`noisy_statistics` releases them through the Gaussian mechanism instead (Dwork &
Roth, "The Algorithmic Foundations of Differential Privacy", 2014, section 3.5 and appendix A), charged to
the site's ledger as ONE ``GaussianDpEvent(sigma)`` (:func:`lepton_tasks.core.privacy.gaussian_charge`,
``release="statistics"``), which composes with its DP-SGD rounds and evaluation in the same RDP sum.

Sensitivity (add/remove one record). The statistics are a dense vector in K blocks (:func:`blocks`):

* ``rows``: one record adds 1;
* ``labels``: the declared labels and ``label_other_count``: one record adds 1 to exactly one entry;
* per numeric feature ``c`` with declared range ``[lo, hi]`` (``[0, 1]`` for a bool; the same range
  secure aggregation's :func:`~lepton_tasks.federation.secagg_round.statistics_layout` derives its bound
  from), midpoint ``m = (lo + hi) / 2`` and half-width ``h = (hi - lo) / 2``: ``c.count`` (count and null
  count: 1 to exactly one), ``c.sum`` released CENTRED as ``sum(x - m)`` (at most ``h``) and ``c.sum_sq`` as
  ``sum((x - m)^2)`` (at most ``h^2``). Why centred: the uncentred sums move by up to ``R = max(|lo|, |hi|)``
  and ``R^2``; for a range ``[0, H]`` centring halves the sum's noise and quarters the sum of squares'. The
  variance ``sum_sq/n - (sum/n)^2`` is shift-invariant, so converting back (``sum = S' + m n``,
  ``sum_sq = Q' + 2 m S' + m^2 n`` with the same noisy ``n``) adds no noise to it: post-processing;
* per categorical feature: its whole vocabulary (allowed values, or every hashed bucket), ``other_count``
  and ``null_count``: 1 to exactly one entry.

Block ``b``'s per-record L2 contribution is at most ``Delta_b``. Dividing block ``b`` by ``Delta_b * sqrt(K)``
gives a vector whose L2 sensitivity is at most 1; adding N(0, sigma^2) to each of its entries is one Gaussian
release at sensitivity 1 and noise multiplier sigma. Scaled back, an entry of block ``b`` gets noise of std
``sigma * sqrt(K) * Delta_b`` (:func:`noise_std`): the budget is split equally over the blocks. sigma is
:func:`statistics_sigma`: the smallest sigma whose one Gaussian release costs at most the run's declared
``DPTraining.statistics_epsilon`` at its delta by the ledger's own RDP accountant
(:func:`lepton_tasks.core.privacy.gaussian_sigma_for_epsilon`, as the evaluation's release is calibrated):
the run declares what the statistics cost, each site derives the same sigma, and its ledger is charged
exactly ``GaussianDpEvent(sigma)``. (DP-SGD's noise multiplier is the wrong knob here: one full-batch release
at sigma = 1 alone costs eps = 4.7 at delta = 1e-5.)
EVERY entry gets noise, zero ones included (which categories are empty is data too).

The bound must hold for every staged record, not just for the aggregates: :func:`unbounded_columns` accepts
a numeric feature only when ingest enforces its range on every row (``clip`` on an int or float: cleaning
clips each value; ``min`` and ``max`` on a *critical* int or float column: validation quarantines a drop with
any value outside; a bool). Any other numeric feature (no range, a non-critical range that lets values
through, a timestamp) makes a DP statistics round impossible: the coordinator refuses to start such a run
and a site refuses the job, naming the column. As a last check, statistics whose centred sums exceed
``count x h`` or ``count x h^2`` (which records within the range cannot produce) raise, and nothing is
released.

Post-processing (free under DP, Dwork & Roth Prop. 2.1): counts are rounded and clamped to
``[0, contract.rows.max]``; a centred sum to ``[-h x count, h x count]`` (the mean stays in the declared
range), a centred sum of squares to ``[S'^2 / count, h^2 x count]`` (a variance >= 0), both with the noisy
count, then converted back; zero counts are dropped as ``StatisticsCodec.decode`` does. This keeps every
answer a valid :class:`~lepton_tasks.core.features.SufficientStats` that the secure-aggregation codec accepts
(counts in ``[0, max_rows]``, ``lo n <= sum <= hi n``, ``sum_sq <= max(lo^2, hi^2) n``) and that
``GlobalStats.from_stats`` normalizes with (a count of 0 gives mean 0 and std 1 there). Clamping at 0 biases
a small count up (about ``0.4 x std`` per site for a count whose true value is 0); large counts, which
normalization rests on, are unbiased.

Under secure aggregation each site adds the FULL noise before masking (no distributed-noise split), so the
sum the coordinator unmasks carries ``n_sites`` times the variance one site's would: simple, and each site's
guarantee does not depend on the others being honest.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from lepton_tasks.core import privacy
from lepton_tasks.core.contracts import ColumnSpec, Contract
from lepton_tasks.core.features import (
    CategoricalStats,
    NumericStats,
    SufficientStats,
    categorical_features,
    category_vocabulary,
    declared_labels,
    declared_range,
    numeric_features,
)
from lepton_tasks.core.messages import DPTraining

__all__ = [
    "Block",
    "UnboundedStatistics",
    "blocks",
    "dense",
    "noise_std",
    "noisy_statistics",
    "require_bounded",
    "scaled",
    "statistics_charge",
    "statistics_sigma",
    "unbounded_columns",
]


class UnboundedStatistics(ValueError):
    """The contract has a numeric feature whose per-record bound ingest does not enforce: its sums have no
    finite sensitivity, so they cannot be released with DP."""


@dataclass(frozen=True)
class Block:
    """One block of the dense statistics vector and the L2 norm of one record's contribution to it."""

    name: str
    sensitivity: float


def _enforced(spec: ColumnSpec) -> bool:
    """Whether ingest keeps every staged value of this numeric column inside its declared range."""
    if spec.dtype == "bool":
        return True
    if spec.dtype not in ("int", "float"):
        return False
    if spec.clip is not None:
        return True  # cleaning clips every value to clip
    return spec.min is not None and spec.max is not None and spec.critical  # else the drop is quarantined


def unbounded_columns(contract: Contract) -> list[str]:
    """The numeric features of ``contract`` whose range ingest does not enforce on every row (module
    docstring); a DP statistics round needs this list empty."""
    return [c for c in numeric_features(contract) if not _enforced(contract.columns[c])]


def require_bounded(contract: Contract) -> None:
    """Raise :class:`UnboundedStatistics` naming every numeric feature without an enforced range."""
    if bad := unbounded_columns(contract):
        raise UnboundedStatistics(
            f"the statistics of {contract.version_tag} cannot be released with differential privacy: "
            f"numeric feature(s) {', '.join(repr(c) for c in bad)} have no range that ingest enforces on "
            "every row, so one record's contribution to their sums is unbounded. Declare `clip` (or `min` "
            "and `max` on a critical column) for each, or run without DP"
        )


def _centre(contract: Contract, column: str) -> tuple[float, float]:
    """``(m, h)``: the midpoint and half-width of the column's declared range (``[0, 1]`` for a bool); a
    one-point range gets ``h = 1`` (its sums need no noise; a positive width keeps the scaling defined)."""
    spec = contract.columns[column]
    if spec.dtype == "bool":
        lo, hi = 0.0, 1.0
    else:
        declared = declared_range(spec)
        assert declared[0] is not None and declared[1] is not None  # require_bounded
        lo, hi = float(declared[0]), float(declared[1])
    return (lo + hi) / 2, ((hi - lo) / 2) or 1.0


def blocks(contract: Contract) -> list[Block]:
    """The blocks of the statistics vector and their per-record sensitivity (module docstring);
    :class:`UnboundedStatistics` when a numeric feature has no enforced range."""
    require_bounded(contract)
    out = [Block("rows", 1.0), Block("labels", 1.0)]
    for c in numeric_features(contract):
        h = _centre(contract, c)[1]
        out += [Block(f"{c}.count", 1.0), Block(f"{c}.sum", h), Block(f"{c}.sum_sq", h * h)]
    out += [Block(c, 1.0) for c in categorical_features(contract)]
    return out


def noise_std(contract: Contract, noise_multiplier: float) -> dict[str, float]:
    """The noise std of each block's entries: ``sigma x sqrt(K) x Delta_b`` for K blocks, so the whole
    release is ONE Gaussian mechanism at L2 sensitivity 1 with noise multiplier ``sigma``."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    bs = blocks(contract)
    scale = noise_multiplier * math.sqrt(len(bs))
    return {b.name: scale * b.sensitivity for b in bs}


def _check_within_bounds(stats: SufficientStats, contract: Contract) -> None:
    """Exact statistics that records within the range could not produce (a value outside it, a category
    outside the vocabulary) raise ``ValueError`` naming the entry, never a value: the sensitivity would not
    hold."""
    vec = dense(stats, contract)
    for c in numeric_features(contract):
        h, count = _centre(contract, c)[1], stats.numeric[c].count
        centred, squares = float(vec[f"{c}.sum"][0]), float(vec[f"{c}.sum_sq"][0])
        # float64 rounding of the centring, relative to the uncentred magnitudes
        slack = 1e-9 * (abs(stats.numeric[c].sum_sq) + abs(stats.numeric[c].sum) + h * h * count + 1.0)
        if abs(centred) > h * count + slack or squares > h * h * count + slack or squares < -slack:
            raise ValueError(
                f"the statistics of numeric feature {c!r} exceed count x its declared range: staged values "
                "lie outside the contract's range, so the DP sensitivity does not hold; nothing is released"
            )
    for c in categorical_features(contract):
        if set(stats.categorical[c].counts) - set(category_vocabulary(contract, c)):
            raise ValueError(f"categorical feature {c!r} has counts under keys outside its vocabulary")
    if set(stats.label_counts) - set(declared_labels(contract)):
        raise ValueError("label counts outside the declared labels")


def _check_layout(stats: SufficientStats, contract: Contract) -> None:
    if (stats.dataset, stats.contract_version) != (contract.name, contract.version):
        raise ValueError(
            f"statistics of {stats.dataset}@v{stats.contract_version}, the contract is {contract.version_tag}"
        )
    if set(stats.numeric) != set(numeric_features(contract)) or set(stats.categorical) != set(
        categorical_features(contract)
    ):
        raise ValueError("the statistics cover another feature set than the contract")


def dense(stats: SufficientStats, contract: Contract) -> dict[str, np.ndarray]:
    """The statistics as the dense vector the mechanism perturbs, block by block (:func:`blocks`' names and
    order; numeric sums centred on the range's midpoint; categorical blocks over the contract's full
    vocabulary, so zero counts are entries too)."""
    _check_layout(stats, contract)
    labels = declared_labels(contract)
    out: dict[str, np.ndarray] = {
        "rows": np.array([stats.rows], np.float64),
        "labels": np.array([stats.label_counts.get(v, 0) for v in labels] + [stats.label_other_count], float),
    }
    for c in numeric_features(contract):
        n, (m, _) = stats.numeric[c], _centre(contract, c)
        out[f"{c}.count"] = np.array([n.count, n.null_count], np.float64)
        out[f"{c}.sum"] = np.array([n.sum - m * n.count], np.float64)  # sum(x - m)
        out[f"{c}.sum_sq"] = np.array(
            [n.sum_sq - 2 * m * n.sum + m * m * n.count], np.float64
        )  # sum((x-m)^2)
    for c in categorical_features(contract):
        cs = stats.categorical[c]
        counts = [cs.counts.get(k, 0) for k in category_vocabulary(contract, c)]
        out[c] = np.array([*counts, cs.other_count, cs.null_count], np.float64)
    return out


def scaled(stats: SufficientStats, contract: Contract) -> np.ndarray:
    """:func:`dense` with block ``b`` divided by ``Delta_b x sqrt(K)``: the vector whose L2 sensitivity to
    one record is at most 1, which the Gaussian mechanism perturbs with N(0, sigma^2) per entry."""
    bs = blocks(contract)
    vec = dense(stats, contract)
    root_k = math.sqrt(len(bs))
    return np.concatenate([vec[b.name] / (b.sensitivity * root_k) for b in bs])


def noisy_statistics(
    stats: SufficientStats,
    contract: Contract,
    noise_multiplier: float,
    *,
    rng: np.random.Generator | None = None,
) -> SufficientStats:
    """``stats`` (exact, of ``contract``) released by the Gaussian mechanism at noise multiplier
    ``noise_multiplier`` and L2 sensitivity 1 after per-block scaling (:func:`scaled`; equivalently, noise
    of std :func:`noise_std` on :func:`dense`), then post-processed (module docstring). ``rng``: tests only;
    by default a generator seeded by :mod:`secrets` (never a fixed or derivable seed)."""
    std = noise_std(contract, noise_multiplier)  # raises UnboundedStatistics first
    exact = dense(stats, contract)
    _check_within_bounds(stats, contract)
    gen = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    noisy = {b: v + gen.normal(0.0, std[b], size=v.shape) for b, v in exact.items()}
    max_rows = contract.rows.max

    def counts(block: str) -> list[int]:
        return [int(v) for v in np.clip(np.rint(noisy[block]), 0, max_rows)]

    (rows,) = counts("rows")
    labels = declared_labels(contract)
    *label_values, label_other = counts("labels")
    out_numeric: dict[str, NumericStats] = {}
    for c in numeric_features(contract):
        m, h = _centre(contract, c)
        count, nulls = counts(f"{c}.count")
        centred = min(max(float(noisy[f"{c}.sum"][0]), -h * count), h * count)
        floor = centred * centred / count if count else 0.0
        squares = min(max(float(noisy[f"{c}.sum_sq"][0]), floor), h * h * count)
        out_numeric[c] = NumericStats(
            count=count,
            sum=centred + m * count,
            sum_sq=squares + 2 * m * centred + m * m * count,
            null_count=nulls,
        )
    out_categorical: dict[str, CategoricalStats] = {}
    for c in categorical_features(contract):
        vocab = category_vocabulary(contract, c)
        *values, other, nulls = counts(c)
        out_categorical[c] = CategoricalStats(
            counts={k: v for k, v in zip(vocab, values, strict=True) if v > 0},
            other_count=other,
            null_count=nulls,
        )
    return SufficientStats(
        dataset=stats.dataset,
        contract_version=stats.contract_version,
        rows=rows,
        numeric=out_numeric,
        categorical=out_categorical,
        label_counts={v: n for v, n in zip(labels, label_values, strict=True) if n > 0},
        label_other_count=label_other,
    )


def statistics_sigma(dp: DPTraining) -> float:
    """The noise multiplier of a DP run's statistics release: the smallest sigma whose one Gaussian release
    at sensitivity 1 costs at most ``dp.statistics_epsilon`` at ``dp.delta`` (module docstring)."""
    return privacy.gaussian_sigma_for_epsilon(float(dp.statistics_epsilon), float(dp.delta))


def statistics_charge(dp: DPTraining, *, run_id: str, round: int, dataset: str) -> privacy.Charge:
    """The ledger entry of the statistics release of ``run_id`` round ``round``: ONE Gaussian release at
    :func:`statistics_sigma` (``release="statistics"``), known before anything is computed."""
    return privacy.gaussian_charge(
        statistics_sigma(dp), run_id=run_id, round=round, dataset=dataset, release="statistics"
    )
