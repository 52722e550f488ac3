"""The site's privacy budget: an RDP accountant for DP-SGD and a JSON ledger of what each job spent.

Pure (numpy, scipy, pydantic and ``core.messages``; no TensorFlow): the site checks a job against its budget
before training. :func:`planned_charge` is the charge of a DP-SGD training from the job's ``hparams.dp`` and
the site's record count (``lepton_tasks.trainer.local`` trains exactly that schedule); :func:`budget_status`
is what a site reports of its ledger in an answer; :func:`run_privacy` composes a run's charges per site for
the run report (``RunMetrics.privacy``).

Accountant. DP-SGD with Poisson sampling rate q and noise multiplier sigma is ``steps`` compositions of the
Poisson-subsampled Gaussian mechanism. Its Renyi-DP curve is computed as in Mironov, Talwar & Zhang, "Renyi
Differential Privacy of the Sampled Gaussian Mechanism" (2019, arXiv:1908.10530): integer orders by the
binomial expansion, fractional orders by the two series of its section 3.3, on the order grid of Google's
dp_accounting RdpAccountant. RDP converts to (eps, delta) by Canonne, Kamath & Steinke (2020,
arXiv:2004.00010, Prop. 12), as dp_accounting does. For the same inputs this reproduces dp_accounting's
``RdpAccountant`` on ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)`` to
floating-point precision: the tests pin its values, and call it directly where it is installed.

Why not dp_accounting itself: every release (0.4.4 to 0.6.0) requires attrs<24 (or numpy 1.x), while
apache-airflow-task-sdk 1.3.2 requires attrs>=24.2: it cannot sit next to Airflow with a clean pip check.
Why RDP rather than PLD: composing heterogeneous charges (different sigma, q, steps per run) is an addition of
RDP curves, exact and instant for any number of ledger entries, and the values match the published TF Privacy
and Abadi et al. tables people will compare against. PLD is tighter (about 8% lower eps at sigma=1.1, q=0.01,
10,000 steps, delta=1e-5) but needs discretization choices and is much slower on long ledgers; RDP is a valid
upper bound, so its error only over-charges.

Composition. The ledger composes ALL its charges together (RDP curves added, one conversion at the end); it
never adds per-run eps's, which over-states the total: two runs of 5,000 steps at sigma=1.1, q=0.01 cost
eps=5.63 together at delta=1e-5, against 2 x 3.85 = 7.69 summed. Every dataset of one ledger is assumed to
hold the same people (the privacy unit is a person of the site); a site whose datasets are provably disjoint
may keep one ledger per dataset.

Other releases. What a site sends besides its DP-SGD update is released by the Gaussian mechanism at L2
sensitivity 1 (:func:`noisy_counts`: the evaluation round's score histogram, where each held-out record is one
count of one bin; ``federation.private_statistics``: the statistics round's counts and sums, each block
scaled by its per-record bound so one record moves the whole vector by at most 1). :func:`gaussian_charge`
records it as a ledger entry with ``sampling_rate = 1`` and one step: ``PoissonSampled(1, Gaussian(sigma))``
IS ``GaussianDpEvent(sigma)`` (RDP ``alpha / (2 sigma^2)``), so it composes with the DP-SGD entries in the
same RDP sum.

Sampling. The accounting is for Poisson sampling. Shuffled fixed-size batches are commonly accounted the same
way with q = B/N, but that is a heuristic (Chua et al., ICML 2024, show it can under-state eps): such charges
are recorded as ``sampling="shuffle"`` and refused unless the budget sets ``accept_shuffled``.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import special

from lepton_tasks.core.messages import (
    BudgetStatus,
    DPTraining,
    PrivacyCharge,
    RoundAnswer,
    RunPrivacy,
    SitePrivacy,
)

SCHEMA_VERSION: Final = 1

#: RDP orders: the grid of dp_accounting's RdpAccountant (DEFAULT_RDP_ORDERS), good for the Gaussian mechanism
#: in the usual regime (sigma >~ 0.5, eps <~ 50).
DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(11, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)

_MAX_SERIES_TERMS = 1000


# ------------------------------------------------------------------------------------------------ accountant


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_erfc(x: float) -> float:
    return math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (Mironov et al. 2019, section 3.2): a binomial sum, in log space."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_comb = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    terms = log_comb + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha (Mironov et al. 2019, section 3.3): two series, until both decay."""
    log_a0 = log_a1 = last0 = last1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for i in range(_MAX_SERIES_TERMS):
        log_coef = float(special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1))
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last0 and log_s1 < last1 and max(log_s0, log_s1) < total - 30:
            return total
        last0, last1 = log_s0, log_s1
    return math.inf  # did not converge: this order is left out of the conversion (eps = inf there)


@functools.lru_cache(maxsize=256)
def _rdp_step(noise_multiplier: float, sampling_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    q, sigma = sampling_rate, noise_multiplier
    out = np.empty(len(orders))
    for k, alpha in enumerate(orders):
        if q == 0:
            out[k] = 0.0
        elif sigma == 0 or math.isinf(alpha):
            out[k] = math.inf
        elif q == 1.0:
            out[k] = alpha / (2 * sigma**2)
        elif float(alpha).is_integer():
            out[k] = _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
        else:
            out[k] = _log_a_frac(q, sigma, alpha) / (alpha - 1)
    out.setflags(write=False)
    return out


def _check_mechanism(noise_multiplier: float, sampling_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def rdp_curve(
    noise_multiplier: float, sampling_rate: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP eps(alpha) at each of ``orders`` of ``steps`` Poisson-subsampled Gaussian steps (RDP adds up)."""
    _check_mechanism(noise_multiplier, sampling_rate, steps)
    if steps == 0:
        return np.zeros(len(orders))
    return int(steps) * _rdp_step(float(noise_multiplier), float(sampling_rate), tuple(map(float, orders)))


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """(eps, best order) for ``delta`` from an RDP curve, by Canonne, Kamath & Steinke 2020, Prop. 12."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if len(orders) != len(rdp):
        raise ValueError(f"{len(orders)} orders but {len(rdp)} RDP values")
    if delta == 0:
        return (0.0, 0.0) if all(r == 0 for r in rdp) else (math.inf, 0.0)
    best, best_order = math.inf, 0.0
    for a, r in zip(orders, rdp, strict=True):
        if a < 1:
            raise ValueError(f"RDP orders must be >= 1, got {a}")
        if r < 0:
            eps = 0.0  # numerical noise of extreme events: as dp_accounting does
        elif delta**2 + math.expm1(-r) > 0:
            eps = 0.0  # delta >= sqrt(1 - exp(-KL)): the KL bound already gives eps = 0
        elif a > 1.01:
            eps = float(r) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        else:
            eps = math.inf
        if eps < best:
            best, best_order = eps, float(a)
    return float(max(0.0, best)), best_order


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """eps at ``delta`` of ``steps`` DP-SGD steps, Poisson sampling rate q and noise multiplier sigma.

    >>> round(epsilon_spent(1.1, 0.01, 10_000, 1e-5), 3)
    5.632
    """
    return rdp_to_epsilon(DEFAULT_ORDERS, rdp_curve(noise_multiplier, sampling_rate, steps), delta)[0]


class Mechanism(Protocol):
    """What the accountant reads of a charge (:class:`Charge` or a message's ``PrivacyCharge``)."""

    @property
    def noise_multiplier(self) -> float: ...
    @property
    def sampling_rate(self) -> float: ...
    @property
    def steps(self) -> int: ...


def epsilon_of(charges: Iterable[Mechanism], delta: float) -> float:
    """eps at ``delta`` of all ``charges`` composed together (RDP curves added, one conversion)."""
    steps_by_mechanism: dict[tuple[float, float], int] = defaultdict(int)
    for c in charges:
        steps_by_mechanism[(c.noise_multiplier, c.sampling_rate)] += c.steps
    total = np.zeros(len(DEFAULT_ORDERS))
    for (sigma, q), steps in steps_by_mechanism.items():
        total = total + rdp_curve(sigma, q, steps)
    return rdp_to_epsilon(DEFAULT_ORDERS, total, delta)[0]


# ------------------------------------------------------------------------------------------------ ledger


class Charge(BaseModel):
    """One DP-SGD training of one round at the site, ``steps`` x PoissonSampled(q, Gaussian(sigma)), or one
    Gaussian release (q = 1, one step: :func:`gaussian_charge`).

    This is the DpEvent description the ledger keeps (``dp_accounting``:
    ``SelfComposedDpEvent(PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(noise_multiplier)), steps)``).
    ``(run_id, round)`` is the idempotency key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(min_length=1)
    round: int = Field(ge=0)
    dataset: str = Field(min_length=1)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sampling_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    #: how batches were drawn: ``poisson`` (what the accountant analyses) or ``shuffle`` (fixed-size batches
    #: of a shuffled epoch, accounted as Poisson with q = B/N: a heuristic, see the module docstring)
    sampling: Literal["poisson", "shuffle"] = "poisson"
    #: what the charge released: a DP-SGD ``update``, an ``evaluation`` (a Gaussian release of counts,
    #: :func:`gaussian_charge`) or the statistics round's ``statistics`` (one Gaussian release of the
    #: sensitivity-scaled statistics, ``federation.private_statistics``); older ledgers hold updates only
    release: Literal["update", "evaluation", "statistics"] = "update"
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.round)

    def same_charge(self, other: Charge) -> bool:
        """Same key and same mechanism (the timestamp does not count)."""
        return self.model_dump(exclude={"timestamp"}) == other.model_dump(exclude={"timestamp"})


class PrivacyBudget(BaseModel):
    """The site's total (eps, delta) for the people in its datasets, over every run and round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    #: accept charges whose batches were shuffled, not Poisson-sampled (accounted as Poisson: a heuristic)
    accept_shuffled: bool = False


class PrivacyLedger(BaseModel):
    """The JSON ledger file that stays at the site: its budget and every charge made against it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    budget: PrivacyBudget
    entries: list[Charge] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_keys(self) -> PrivacyLedger:
        seen: set[tuple[str, int]] = set()
        for e in self.entries:
            if e.key in seen:
                raise ValueError(f"the ledger charges run {e.run_id!r} round {e.round} twice")
            seen.add(e.key)
        return self


class BudgetExceeded(ValueError):
    """A job would spend more than the site's remaining privacy budget."""

    def __init__(
        self, *, spent: float, remaining: float, delta: float, job: float, total: float, charge: Charge
    ):
        self.spent, self.remaining, self.delta, self.job, self.total, self.charge = (
            spent,
            remaining,
            delta,
            job,
            total,
            charge,
        )
        super().__init__(
            f"privacy budget exceeded: run {charge.run_id!r} round {charge.round} on {charge.dataset!r} "
            f"(sigma={charge.noise_multiplier:g}, q={charge.sampling_rate:g}, {charge.steps} steps) "
            f"costs eps={job:.4g} alone and would bring the total to eps={total:.4g}; "
            f"spent eps={spent:.4g}, remaining eps={remaining:.4g} of {spent + remaining:.4g} "
            f"at delta={delta:g}"
        )


def spent(ledger: PrivacyLedger) -> float:
    """eps at the budget's delta of every charge in the ledger, composed."""
    return epsilon_of(ledger.entries, ledger.budget.delta)


def remaining(ledger: PrivacyLedger) -> float:
    """eps left at the budget's delta (0 when spent; never negative)."""
    return max(0.0, ledger.budget.epsilon - spent(ledger))


def existing_charge(ledger: PrivacyLedger, charge: Charge) -> Charge | None:
    """The ledger's entry for ``charge``'s key (``None``: not charged yet); ``ValueError`` when that key holds
    another mechanism (a retry must repeat the same job)."""
    for e in ledger.entries:
        if e.key == charge.key:
            if not e.same_charge(charge):
                raise ValueError(
                    f"run {charge.run_id!r} round {charge.round} is already charged with different "
                    f"parameters ({e.model_dump(exclude={'timestamp'})}); a retry must repeat the same job"
                )
            return e
    return None


def check_job(ledger: PrivacyLedger, charge: Charge) -> None:
    """Raise :class:`BudgetExceeded` if ``charge`` (composed with the ledger) exceeds the budget.

    A charge already in the ledger (same key and parameters: a retried task) costs nothing more. A different
    charge under an existing key raises ``ValueError``; a shuffled charge is refused unless the budget allows.
    """
    if existing_charge(ledger, charge) is not None:
        return
    if charge.sampling == "shuffle" and not ledger.budget.accept_shuffled:
        raise ValueError(
            f"run {charge.run_id!r} round {charge.round} used shuffled batches; this site's budget accounts "
            "Poisson sampling only (set accept_shuffled to account shuffling as Poisson with q = B/N)"
        )
    delta = ledger.budget.delta
    total = epsilon_of([*ledger.entries, charge], delta)
    if total > ledger.budget.epsilon:
        already = spent(ledger)
        raise BudgetExceeded(
            spent=already,
            remaining=max(0.0, ledger.budget.epsilon - already),
            delta=delta,
            job=epsilon_of([charge], delta),
            total=total,
            charge=charge,
        )


def charge(ledger: PrivacyLedger, entry: Charge) -> PrivacyLedger:
    """A new ledger with ``entry`` recorded, after :func:`check_job`; unchanged if it is already recorded."""
    check_job(ledger, entry)
    if existing_charge(ledger, entry) is not None:
        return ledger
    return ledger.model_copy(update={"entries": [*ledger.entries, entry]})


# ------------------------------------------------------------------------------------------------ jobs


def gaussian_charge(
    noise_multiplier: float,
    *,
    run_id: str,
    round: int,
    dataset: str,
    release: Literal["evaluation", "statistics"] = "evaluation",
) -> Charge:
    """The ledger entry of ONE Gaussian release at L2 sensitivity 1 and noise std ``noise_multiplier``
    (``dp_accounting.GaussianDpEvent(noise_multiplier)``): q = 1, one step; ``release`` names what it
    released (the evaluation's histogram, or the statistics round's noisy statistics)."""
    return Charge(
        run_id=run_id,
        round=round,
        dataset=dataset,
        noise_multiplier=noise_multiplier,
        sampling_rate=1.0,
        steps=1,
        release=release,
    )


def gaussian_privacy_charge(noise_multiplier: float, delta: float) -> PrivacyCharge:
    """How an answer reports one Gaussian release at sensitivity 1 (``l2_clip`` is that sensitivity)."""
    return PrivacyCharge(
        noise_multiplier=noise_multiplier,
        sampling_rate=1.0,
        steps=1,
        sampling="poisson",
        l2_clip=1.0,
        delta=delta,
        epsilon_this_update=epsilon_spent(noise_multiplier, 1.0, 1, delta),
    )


@functools.lru_cache(maxsize=64)
def gaussian_sigma_for_epsilon(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier sigma (to a relative 1e-9, rounded up) whose ONE Gaussian release at L2
    sensitivity 1 costs at most ``epsilon`` at ``delta`` — by THIS module's accountant (:func:`epsilon_spent`
    with q = 1 and one step, exactly what :func:`gaussian_charge` records), so a ledger charges such a release
    at most ``epsilon``. Bisection: eps is non-increasing in sigma (each order's RDP ``alpha / (2 sigma^2)``
    is). Not the analytic Gaussian mechanism of Balle & Wang (2018), which is tighter for one release but is
    not what the ledger composes with.

    ``ValueError`` when ``epsilon`` is not a finite number > 0 or ``delta`` is not in (0, 1). Any such
    epsilon calibrates: for a very large sigma the conversion gives eps = 0 (its KL bound), so the doubling
    that brackets sigma ends (epsilon = 0.001 needs sigma = 7.4e4 at delta = 1e-5)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def cost(sigma: float) -> float:
        return epsilon_spent(sigma, 1.0, 1, delta)

    lo, hi = 1e-3, 1.0
    while cost(hi) > epsilon:
        lo, hi = hi, hi * 2
    if cost(lo) <= epsilon:  # a cost this low at sigma = 0.001 (epsilon in the thousands): no bisection
        return lo
    while (hi - lo) > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= epsilon else (mid, hi)
    return hi


def evaluation_sigma(dp: DPTraining) -> float:
    """The noise multiplier of a DP run's evaluation release (the score histogram, ``site.training``): the
    smallest sigma whose one Gaussian release costs at most ``dp.evaluation_epsilon`` at ``dp.delta``
    (:func:`gaussian_sigma_for_epsilon`). The run declares the evaluation's cost, not its sigma, so that a
    site's approver and its budget see what the evaluation spends; each site derives the same sigma."""
    return gaussian_sigma_for_epsilon(float(dp.evaluation_epsilon), float(dp.delta))


def evaluation_charge(dp: DPTraining, *, run_id: str, rounds: int, dataset: str) -> Charge:
    """The ledger entry of a run's evaluation release (round ``rounds + 1``, at :func:`evaluation_sigma`):
    what the site charges when it evaluates, and what it RESERVES with the run's first train charge, so that
    a site that trained always has room to evaluate (``site.jobs``)."""
    return gaussian_charge(evaluation_sigma(dp), run_id=run_id, round=rounds + 1, dataset=dataset)


def noisy_counts(counts: np.ndarray, noise_multiplier: float) -> np.ndarray:
    """``counts`` + N(0, noise_multiplier^2) per cell, rounded to integers (post-processing), NOT clamped:
    a cell may come out negative.

    The Gaussian mechanism for counts where one record adds 1 to exactly one cell (L2 sensitivity 1 under
    add/remove-one). EVERY cell gets noise, empty ones included: which cells are empty is data too. The
    noise comes from a generator seeded by :mod:`secrets` (never a fixed or derivable seed, as DP-SGD's).
    Each released cell is unbiased: for an integer count c, ``rint(c + Z) = c + rint(Z)`` and ``rint(Z)`` is
    symmetric about 0. Clamping at 0 would add about 0.4 sigma to every empty cell, a bias that sums over
    cells and sites (an AUC computed from clamped counts is pulled toward 0.5: docs/benchmarks.md); whoever
    needs a non-negative figure clips the metric computed from the signed counts, not the counts.
    """
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    exact = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(secrets.randbits(128))
    noisy = exact + rng.normal(0.0, noise_multiplier, size=exact.shape)
    return np.asarray(np.rint(noisy), dtype=np.int64)


def dp_schedule(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sampling_rate, steps)`` of a DP-SGD training on ``n`` records: ``q = min(1, batch_size / n)`` and
    ``epochs x ceil(n / batch_size)`` steps (the optimizer steps of plain training; ``epochs / q`` rounded up
    per epoch), so a site can check its budget before it trains."""
    if n < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1, epochs >= 0 (got {n}, {batch_size}, {epochs})")
    return min(1.0, batch_size / n), int(epochs) * math.ceil(n / batch_size)


def planned_charge(dp: DPTraining, n: int, batch_size: int, epochs: int) -> PrivacyCharge:
    """The :class:`~lepton_tasks.core.messages.PrivacyCharge` of a DP-SGD training with ``dp`` on ``n``
    records (``lepton_tasks.trainer.local.train_local`` trains exactly this; known before training: it does
    not depend on the data, only on its size)."""
    q, steps = dp_schedule(n, batch_size, epochs)
    return PrivacyCharge(
        noise_multiplier=dp.noise_multiplier,
        sampling_rate=q,
        steps=steps,
        sampling="poisson",
        l2_clip=dp.l2_clip,
        delta=dp.delta,
        epsilon_this_update=epsilon_spent(dp.noise_multiplier, q, steps, dp.delta),
    )


def ledger_charge(cost: PrivacyCharge, *, run_id: str, round: int, dataset: str) -> Charge:
    """The ledger entry of ``cost`` (a trainer's or a planned charge) for round ``round`` of ``run_id``."""
    return Charge(
        run_id=run_id,
        round=round,
        dataset=dataset,
        noise_multiplier=cost.noise_multiplier,
        sampling_rate=cost.sampling_rate,
        steps=cost.steps,
        sampling=cost.sampling,
    )


def budget_status(ledger: PrivacyLedger, name: str) -> BudgetStatus:
    """The ledger's totals as the site reports them in its answer (``name``: its dataset, or ``*``)."""
    used = spent(ledger)
    return BudgetStatus(
        ledger=name,
        epsilon_limit=ledger.budget.epsilon,
        delta=ledger.budget.delta,
        epsilon_spent=used,
        epsilon_remaining=max(0.0, ledger.budget.epsilon - used),
    )


def run_privacy(
    answers: Mapping[str, Sequence[RoundAnswer]],
    *,
    dp: DPTraining | None,
    secure_aggregation: bool,
    dropouts_recovered: int | None = None,
) -> RunPrivacy:
    """What protected a run, for ``RunMetrics.privacy`` and the report: per site, this run's DP charges
    (from its accepted answers, in round order: each DP-SGD round and, through sites, the evaluation's
    Gaussian release of its score histogram) composed by the accountant at the site's budget's delta (the
    run's delta when the site reported no budget), and the site's ledger after its last answer.

    ``dropouts_recovered``: sites recovered after masking; ignored (``None``) without secure aggregation.
    """
    sites: dict[str, SitePrivacy] = {}
    for site, site_answers in sorted(answers.items()):
        charges = [a.privacy for a in site_answers if a.privacy is not None]
        budgets = [a.budget for a in site_answers if a.budget is not None]
        if not charges and not budgets:
            continue
        last = budgets[-1] if budgets else None
        delta = last.delta if last is not None else (dp.delta if dp is not None else charges[0].delta)
        sites[site] = SitePrivacy(
            rounds_charged=len(charges),
            delta=delta,
            epsilon_run=epsilon_of(charges, delta),
            noise_multiplier=charges[-1].noise_multiplier if charges else None,
            l2_clip=charges[-1].l2_clip if charges else None,
            epsilon_limit=last.epsilon_limit if last is not None else None,
            epsilon_spent=last.epsilon_spent if last is not None else None,
            epsilon_remaining=last.epsilon_remaining if last is not None else None,
        )
    return RunPrivacy(
        secure_aggregation=secure_aggregation,
        dropouts_recovered=dropouts_recovered if secure_aggregation else None,
        dp=dp,
        sites=sites,
    )


# ------------------------------------------------------------------------------------------------ file


def save_ledger(path: str | os.PathLike[str], ledger: PrivacyLedger) -> None:
    """Write the ledger as JSON, atomically, mode 0600. Callers serialize writers (one Airflow pool slot)."""
    from lepton_tasks.core.files import write_private

    write_private(path, (ledger.model_dump_json(indent=2) + "\n").encode("utf-8"))


def load_ledger(path: str | os.PathLike[str]) -> PrivacyLedger:
    """Read and validate a ledger file (a missing one is an error: the site creates its budget explicitly)."""
    return PrivacyLedger.model_validate_json(Path(path).read_text(encoding="utf-8"))
