"""Secure aggregation through the exchange: the coordinator's phases, and the ring layouts both sides share.

The protocol (:mod:`lepton_tasks.federation.secagg`, Bonawitz et al. 2017 / SecAgg+) runs as four
job → answer exchanges per aggregation, each through the sites' exchange buckets with the signed messages of
:mod:`lepton_tasks.core.secagg_messages`. The coordinator never connects to a site and holds no key that
decrypts a share; it learns only the sum over the sites whose masked input arrived (``U3``)::

    start     SecAggSetup to every planned site                   phase KEYS
    advance   keys → U1, SecAggRoster to U1                       phase SHARES
    advance   shares → U2, SecAggInbox (shares for it) to U2      phase MASKED
    advance   masked inputs → U3, SecAggSurvivors to U3           phase REVEAL
    finish    reveals → secagg.unmask → exactly sum_{U3} x_u, decoded (FedAvg mean, or statistics)

Between the calls the coordinator keeps an :class:`AggregationState` (JSON: what a task hands the next one);
:func:`collect` reads the current phase's replies and judges each site as
:func:`lepton_tasks.federation.exchange.collect_answers` does (accepted, refused with the site's signed
reasons, rejected with the reason code and field, missing after the phase's deadline — the job's expiry —
or pending before it). One site's bad reply never fails the aggregation: it is excluded with its reason,
and a site excluded after it shared its keys is a dropout the protocol recovers from. Only when fewer than
``threshold`` sites remain does :class:`SecAggRoundFailed` end it, naming every lost site and why.

Layouts (what the ring vector means; public, carried in the setup):

* **update** (:class:`UpdateCodec`): weighted FedAvg under masking. A site with ``n`` samples masks
  ``FixedPoint.encode_weighted(w, n) = [n q(w), n]`` (its arrays flattened in order); the coordinator unmasks
  ``[sum n_i q(w_i), sum n_i]`` and divides: the mean is within ``step / 2`` (``FixedPoint.error_bound(1)``)
  of the exact weighted mean of the sites' updates, and the sample counts stay hidden too. A site whose
  update exceeds ``clip`` refuses (it would be clipped silently otherwise).
* **statistics** (:class:`StatisticsCodec`): the additive :class:`~lepton_tasks.core.features.SufficientStats`
  in the 64-bit ring. Counts (rows, labels, nulls, categories over the contract's full vocabulary: allowed
  values, or every hashed bucket) are exact ring integers; each numeric feature's sum and sum of squares is a
  fixed-point number scaled by its public bound (``max_rows x R`` and ``max_rows x R^2``, ``R`` the largest
  absolute value of the declared range, :func:`statistics_layout`), with ``2^40`` levels per bound: error
  ``n_sites x bound x 2^-41`` per sum. Zero counts are dropped on decoding, so the result equals the plain
  ``features.merge`` of the same sites exactly in every count.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

import numpy as np
from minio.error import S3Error
from pydantic import UUID4, BaseModel, ConfigDict, Field

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.exchange import (
    AnswerHeader,
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RefusalHeader,
    RejectReason,
    job_ref,
    object_key,
    parse_object_key,
    prefix_for,
    sha256_hex,
)
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
from lepton_tasks.core.messages import BlobRef, RoundRefusal
from lepton_tasks.core.secagg_messages import (
    MASKED_SUFFIX,
    AdvertisedKey,
    EncryptedShareModel,
    Purpose,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggPayload,
    SecAggReveal,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSurvivors,
    StatisticsLayout,
    UpdateLayout,
    aggregation_round_id,
    open_payload,
    seal_job,
)
from lepton_tasks.core.signatures import Signer
from lepton_tasks.federation import secagg
from lepton_tasks.federation.enrollment import EnrollmentError, SiteEntry, SiteRegistry
from lepton_tasks.federation.exchange import Rejection, SiteStatus

__all__ = [
    "DEFAULT_PHASE_TTL",
    "AggregationState",
    "CoordinatorExchange",
    "Phase",
    "PhaseIncomplete",
    "PhaseReplies",
    "PhaseReply",
    "SecAggResult",
    "SecAggRoundFailed",
    "StatisticsCodec",
    "UpdateCodec",
    "advance",
    "collect",
    "default_threshold",
    "finish",
    "read_masked",
    "round_config",
    "start",
    "statistics_layout",
    "vector_length",
]

log = logging.getLogger(__name__)

#: how long each phase's job stays valid: a site that has not answered by then is a dropout of that phase
DEFAULT_PHASE_TTL: Final = timedelta(hours=1)


# ====================================================================================================
# layouts: what the ring vector means (shared by the site and the coordinator)
# ====================================================================================================


def round_config(setup: SecAggSetup | AggregationState) -> secagg.RoundConfig:
    """The protocol's :class:`~lepton_tasks.federation.secagg.RoundConfig` for an aggregation; raises
    ``ValueError`` for parameters the protocol forbids (fewer than 3 sites, a threshold not above half)."""
    round_id = aggregation_round_id(
        setup.consortium, setup.run_id, setup.round, setup.purpose, setup.aggregation_id
    )
    return secagg.RoundConfig(
        round_id, tuple(setup.sites), setup.threshold, bits=setup.bits, degree=setup.degree
    )


def default_threshold(n_sites: int, degree: int | None = None) -> int:
    """The smallest threshold the protocol allows: more than half of a site's shareholders (itself and its
    neighbours). It tolerates the most dropouts; a larger one tolerates fewer."""
    holders = (n_sites - 1 if degree is None else degree) + 1
    return holders // 2 + 1


class UpdateCodec:
    """Model update ↔ ring vector ``[n q(w), n]`` for weighted FedAvg under masking (module docstring)."""

    def __init__(self, layout: UpdateLayout, max_sites: int, bits: int = 32) -> None:
        self.layout = layout
        self.fixed = secagg.FixedPoint(
            clip=layout.clip, max_sites=max_sites, bits=bits, max_samples=layout.max_samples
        )

    @property
    def length(self) -> int:
        """Ring words: every parameter, then the sample count."""
        return self.layout.size + 1

    def error_bound(self) -> float:
        """Per coordinate: ``|decoded mean - exact weighted mean of the updates|`` at most this."""
        return self.fixed.error_bound(1)

    def encode(self, arrays: Sequence[np.ndarray], n_samples: int) -> np.ndarray:
        """The ring vector a site masks. ``ValueError`` (never a silent change) when the shapes differ from
        the layout's, a value is not finite or beyond ``clip``, or ``n_samples`` exceeds ``max_samples``."""
        shapes = [list(np.shape(a)) for a in arrays]
        if shapes != self.layout.shapes:
            raise ValueError(f"the update's shapes {shapes} are not the aggregation's {self.layout.shapes}")
        flat = np.concatenate([np.ravel(np.asarray(a)) for a in arrays])
        if not np.issubdtype(flat.dtype, np.floating) and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"the update is not real-valued (dtype {flat.dtype})")
        if not np.isfinite(flat).all():
            raise ValueError("the update holds a non-finite value")
        beyond = int(np.count_nonzero(np.abs(flat) > self.layout.clip))
        if beyond:
            raise ValueError(
                f"{beyond} of the update's {flat.size} values exceed the aggregation's clip bound "
                f"{self.layout.clip:g}: they would be clipped; the coordinator must choose a larger clip"
            )
        return self.fixed.encode_weighted(flat, n_samples)

    def decode(self, total: np.ndarray, n_sites: int) -> tuple[list[np.ndarray], int]:
        """``(weighted mean as float64 arrays of the layout's shapes, total samples)`` from the unmasked sum
        of ``n_sites`` encoded updates."""
        if total.size != self.length:
            raise ValueError(f"the sum has {total.size} words, the layout {self.length}")
        mean, n_total = self.fixed.decode_weighted_mean(total, n_sites)
        out, start = [], 0
        for shape in self.layout.shapes:
            size = math.prod(shape)
            out.append(mean[start : start + size].reshape(shape))
            start += size
        return out, n_total


def statistics_layout(
    contract: Contract, *, max_rows: int | None = None, bounds: Mapping[str, float] | None = None
) -> StatisticsLayout:
    """The public layout of ``contract``'s statistics: ``max_rows`` defaults to the contract's ``rows.max``;
    a numeric feature's bound is ``bounds[c]`` when given, else 1 for a bool, else the largest absolute
    value of its declared range (``clip``, else ``min``/``max``). A feature with neither is a
    ``ValueError`` naming it: its sums cannot be scaled without a public bound."""
    given = dict(bounds or {})
    numeric = numeric_features(contract)
    if stray := sorted(set(given) - set(numeric)):
        raise ValueError(
            f"bounds for columns that are not numeric features of {contract.version_tag}: {stray}"
        )
    out: dict[str, float] = {}
    for c in numeric:
        spec = contract.columns[c]
        if c in given:
            out[c] = float(given[c])
            continue
        if spec.dtype == "bool":
            out[c] = 1.0
            continue
        lo, hi = declared_range(spec)
        if lo is None or hi is None:
            raise ValueError(
                f"numeric feature {c!r} of {contract.version_tag} declares no range (clip, or min and max): "
                "give its bound (the largest absolute value a row may hold) to aggregate it securely"
            )
        out[c] = max(abs(lo), abs(hi)) or 1.0
    return StatisticsLayout(
        dataset=contract.name,
        contract_version=contract.version,
        contract_sha256=contract.sha256,
        max_rows=max_rows if max_rows is not None else contract.rows.max,
        bounds=out,
    )


class StatisticsCodec:
    """:class:`SufficientStats` ↔ a 64-bit ring vector: exact integer counts, then each numeric feature's
    sum and sum of squares in fixed point scaled by its public bound (module docstring)."""

    def __init__(self, contract: Contract, layout: StatisticsLayout, max_sites: int) -> None:
        if (contract.name, contract.version, contract.sha256) != (
            layout.dataset,
            layout.contract_version,
            layout.contract_sha256,
        ):
            raise ValueError(
                f"the layout is for {layout.dataset}@v{layout.contract_version} "
                f"({layout.contract_sha256[:12]}…), not {contract.version_tag} ({contract.sha256[:12]}…)"
            )
        self.contract, self.layout = contract, layout
        self.numeric = numeric_features(contract)
        self.categorical = categorical_features(contract)
        if set(layout.bounds) != set(self.numeric):
            raise ValueError(
                f"the layout bounds {sorted(layout.bounds)}, the numeric features are {self.numeric}"
            )
        if max_sites * layout.max_rows >= 1 << 63:
            raise ValueError(f"{max_sites} sites x {layout.max_rows} rows overflow the 64-bit ring")
        self.max_sites = max_sites
        self.labels = declared_labels(contract)
        self.vocab = {c: category_vocabulary(contract, c) for c in self.categorical}
        ints = ["rows", "label_other_count", *(f"label={v}" for v in self.labels)]
        for c in self.numeric:
            ints += [f"{c}.count", f"{c}.null_count"]
        for c in self.categorical:
            ints += [f"{c}={k}" for k in self.vocab[c]] + [f"{c}.other_count", f"{c}.null_count"]
        self.int_entries: list[str] = ints
        self.real_entries: list[str] = [f"{c}.{part}" for c in self.numeric for part in ("sum", "sum_sq")]
        self.real_bounds = np.array(
            [layout.max_rows * layout.bounds[c] ** p for c in self.numeric for p in (1, 2)], np.float64
        )
        # every real coordinate is x / bound in [-1, 1], quantized with 2^40 levels
        self.fixed = secagg.FixedPoint(clip=1.0, max_sites=max_sites, bits=64)

    @property
    def length(self) -> int:
        return len(self.int_entries) + len(self.real_entries)

    def error_bounds(self, n_sites: int) -> dict[str, float]:
        """Per real entry (``<column>.sum``, ``<column>.sum_sq``): the bound on its decoded error."""
        unit = self.fixed.error_bound(n_sites)
        return {name: unit * float(b) for name, b in zip(self.real_entries, self.real_bounds, strict=True)}

    def encode(self, stats: SufficientStats) -> np.ndarray:
        """The ring vector of one site's statistics; ``ValueError`` naming the entry (never its value) for
        anything outside the layout: another contract or feature set, an unknown category, a count above
        ``max_rows``, a sum beyond its bound."""
        if (stats.dataset, stats.contract_version) != (self.layout.dataset, self.layout.contract_version):
            raise ValueError(
                f"statistics of {stats.dataset}@v{stats.contract_version}, the layout is "
                f"{self.layout.dataset}@v{self.layout.contract_version}"
            )
        if set(stats.numeric) != set(self.numeric) or set(stats.categorical) != set(self.categorical):
            raise ValueError("the statistics cover another feature set than the layout")
        ints: dict[str, int] = {"rows": stats.rows, "label_other_count": stats.label_other_count}
        if stray := sorted(set(stats.label_counts) - set(self.labels)):
            raise ValueError(f"label counts outside the declared labels ({len(stray)} keys)")
        ints.update({f"label={v}": stats.label_counts.get(v, 0) for v in self.labels})
        for c in self.numeric:
            ints[f"{c}.count"], ints[f"{c}.null_count"] = stats.numeric[c].count, stats.numeric[c].null_count
        for c in self.categorical:
            cs = stats.categorical[c]
            if set(cs.counts) - set(self.vocab[c]):
                raise ValueError(f"categorical feature {c!r} has counts under keys outside its vocabulary")
            ints.update({f"{c}={k}": cs.counts.get(k, 0) for k in self.vocab[c]})
            ints[f"{c}.other_count"], ints[f"{c}.null_count"] = cs.other_count, cs.null_count
        out = np.empty(self.length, np.uint64)
        for i, name in enumerate(self.int_entries):
            value = ints[name]
            if not 0 <= value <= self.layout.max_rows:
                raise ValueError(f"count {name!r} is outside [0, max_rows = {self.layout.max_rows}]")
            out[i] = value
        reals = np.array([getattr(stats.numeric[c], p) for c in self.numeric for p in ("sum", "sum_sq")])
        if reals.size:
            scaled = reals / self.real_bounds
            if not np.isfinite(scaled).all():
                raise ValueError("a sum is not finite")
            if bad := [n for n, s in zip(self.real_entries, scaled, strict=True) if abs(s) > 1.0]:
                raise ValueError(
                    f"{', '.join(bad)} exceed the layout's bound (max_rows x the column's bound)"
                )
            out[len(self.int_entries) :] = self.fixed.quantize(scaled)
        return out

    def decode(self, total: np.ndarray, n_sites: int) -> SufficientStats:
        """The merged statistics of ``n_sites`` encoded vectors from their unmasked ring sum."""
        if total.dtype != np.uint64 or total.shape != (self.length,):
            raise ValueError(f"expected {self.length} uint64 words, got {total.shape} {total.dtype}")
        n_int = len(self.int_entries)
        limit = n_sites * self.layout.max_rows
        counts = {name: int(v) for name, v in zip(self.int_entries, total[:n_int], strict=True)}
        if bad := [name for name, v in counts.items() if v > limit]:
            raise ValueError(f"decoded counts {bad[:3]} exceed {n_sites} x max_rows: not a sum of encodings")
        reals: dict[str, float] = {}
        if self.real_entries:
            values = self.fixed.dequantize(total[n_int:], n_sites) * self.real_bounds
            reals = {name: float(v) for name, v in zip(self.real_entries, values, strict=True)}
        numeric = {
            c: NumericStats(
                count=counts[f"{c}.count"],
                sum=reals[f"{c}.sum"],
                sum_sq=reals[f"{c}.sum_sq"],
                null_count=counts[f"{c}.null_count"],
            )
            for c in self.numeric
        }
        categorical = {
            c: CategoricalStats(
                counts={k: counts[f"{c}={k}"] for k in self.vocab[c] if counts[f"{c}={k}"] > 0},
                other_count=counts[f"{c}.other_count"],
                null_count=counts[f"{c}.null_count"],
            )
            for c in self.categorical
        }
        return SufficientStats(
            dataset=self.layout.dataset,
            contract_version=self.layout.contract_version,
            rows=counts["rows"],
            numeric=numeric,
            categorical=categorical,
            label_counts={v: counts[f"label={v}"] for v in self.labels if counts[f"label={v}"] > 0},
            label_other_count=counts["label_other_count"],
        )


def vector_length(
    purpose: Purpose,
    update: UpdateLayout | None,
    statistics: StatisticsLayout | None,
    n_sites: int,
    contract: Contract | None = None,
) -> int:
    """Ring words of an aggregation's masked vectors (statistics: ``contract``, loaded by name when
    ``None``, must be the layout's); ``ValueError`` when the layout does not fit the contract or the ring."""
    if purpose == "update":
        if update is None:
            raise ValueError("an update aggregation needs an update layout")
        return update.size + 1
    if statistics is None:
        raise ValueError("a statistics aggregation needs a statistics layout")
    contract = contract or load_contract(statistics.dataset)
    return StatisticsCodec(contract, statistics, n_sites).length


# ====================================================================================================
# the coordinator's phases
# ====================================================================================================


class Phase(StrEnum):
    """The phase whose replies the coordinator is waiting for."""

    KEYS = "keys"  # SecAggSetup sent, SecAggKeys expected
    SHARES = "shares"  # SecAggRoster sent, SecAggShares expected
    MASKED = "masked"  # SecAggInbox sent, SecAggMasked expected
    REVEAL = "reveal"  # SecAggSurvivors sent, SecAggReveal expected


_ANSWER: Final[dict[Phase, type[SecAggPayload]]] = {
    Phase.KEYS: SecAggKeys,
    Phase.SHARES: SecAggShares,
    Phase.MASKED: SecAggMasked,
    Phase.REVEAL: SecAggReveal,
}
#: replies to other jobs in the same folder (the round's train answer, another phase's): not this phase's
_NOT_MINE: Final = frozenset({RejectReason.WRONG_PAYLOAD_SCHEMA, RejectReason.UNBOUND_ANSWER})


class SecAggRoundFailed(RuntimeError):
    """Fewer than ``threshold`` sites remain at ``phase``: the aggregation ends without a sum (never a
    wrong one). ``lost`` names every site that left and why."""

    def __init__(
        self, phase: Phase, message: str, *, remaining: Sequence[str], lost: Mapping[str, str]
    ) -> None:
        detail = "; ".join(f"{site}: {why}" for site, why in sorted(lost.items())) or "none"
        super().__init__(f"secure aggregation failed at {phase.value}: {message}. Sites lost: {detail}")
        self.phase = phase
        self.remaining = tuple(remaining)
        self.lost = dict(lost)


class PhaseIncomplete(ValueError):
    """:func:`advance` or :func:`finish` was called while sites are still pending (before the deadline)."""


@dataclass(frozen=True)
class CoordinatorExchange:
    """What the coordinator's phases need: its own object storage (the sites' exchange buckets), its signer
    and the registry of enrolled sites with their pinned keys."""

    storage: Storage
    signer: Signer
    registry: SiteRegistry
    consortium: str


class AggregationState(BaseModel):
    """What the coordinator keeps between the phases of one aggregation (JSON, e.g. in XCom): the public
    parameters, the jobs of the current phase, U1 (advertised keys), U2, U3 (masked-input blobs) and why each
    excluded site left. Never a share or a mask."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    consortium: str
    run_id: str
    round: int
    aggregation_id: UUID4
    purpose: Purpose
    sites: list[str]
    threshold: int
    degree: int | None = None
    bits: Literal[32, 64] = 32
    update: UpdateLayout | None = None
    statistics: StatisticsLayout | None = None
    ttl_seconds: float = Field(gt=0)
    #: ring words of every masked vector (:func:`vector_length`)
    vector_length: int = Field(ge=1)
    phase: Phase
    #: the current phase's job per site (what the replies must answer)
    jobs: dict[str, JobHeader]
    advertised: dict[str, AdvertisedKey] = Field(default_factory=dict)
    shared: list[str] = Field(default_factory=list)
    masked: dict[str, BlobRef] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(default_factory=dict)
    reply_ids: set[UUID4] = Field(default_factory=set)

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.ttl_seconds)

    def remaining(self) -> list[str]:
        """The sites still in the aggregation (not excluded)."""
        return [s for s in self.sites if s not in self.excluded]


@dataclass(frozen=True)
class PhaseReply:
    """One site's reply in one phase."""

    site: str
    status: SiteStatus
    payload: SecAggPayload | None = None
    reply: AnswerHeader | RefusalHeader | None = None
    reasons: tuple[dict[str, str], ...] = ()
    rejection: Rejection | None = None
    #: why the site leaves the aggregation here (``None`` when accepted or pending)
    reason: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PhaseReplies:
    """Every site's reply in ``phase``."""

    phase: Phase
    sites: Mapping[str, PhaseReply] = field(default_factory=dict)

    @property
    def accepted(self) -> dict[str, SecAggPayload]:
        return {
            s: r.payload
            for s, r in sorted(self.sites.items())
            if r.status is SiteStatus.ACCEPTED and r.payload
        }

    @property
    def excluded(self) -> dict[str, str]:
        """Site → why it leaves here (refused, rejected, missing)."""
        return {s: r.reason or r.status.value for s, r in sorted(self.sites.items()) if r.reason}

    @property
    def pending(self) -> list[str]:
        return sorted(s for s, r in self.sites.items() if r.status is SiteStatus.PENDING)

    @property
    def complete(self) -> bool:
        """Every site has answered, refused, failed or missed the deadline: the phase can advance."""
        return not self.pending

    @property
    def reply_ids(self) -> set[uuid.UUID]:
        return {r.reply.message_id for r in self.sites.values() if r.reply is not None}


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of an aggregation: the exact ring sum over ``survivors`` (U3) and its decoding."""

    aggregation_id: uuid.UUID
    purpose: Purpose
    #: U3: the sites whose inputs are in the sum
    survivors: tuple[str, ...]
    #: U2 \\ U3: shared their keys, then dropped out; their pairwise masks were removed from the sum
    recovered: tuple[str, ...]
    #: survivors that did not reveal (their self-mask was rebuilt from the others' shares)
    unrevealed: tuple[str, ...]
    excluded: dict[str, str]
    total: np.ndarray
    #: update: the weighted mean (float64, the layout's shapes), the total samples, the per-value bound
    weights: list[np.ndarray] | None = None
    n_samples: int | None = None
    error_bound: float | None = None
    #: statistics: the merged statistics and the bound of each decoded sum
    statistics: SufficientStats | None = None
    statistics_error: dict[str, float] | None = None


def _entries(exchange: CoordinatorExchange, sites: Iterable[str]) -> dict[str, SiteEntry]:
    """The registry entries of ``sites``; each must be enrolled in the consortium with its key pinned."""
    entries = exchange.registry.load()
    out = {}
    for site in sites:
        entry = entries.get(site)
        if entry is None:
            raise EnrollmentError(f"site {site!r} is not enrolled; enrolled: {', '.join(sorted(entries))}")
        if entry.consortium != exchange.consortium:
            raise EnrollmentError(
                f"site {site!r} is enrolled in {entry.consortium!r}, not {exchange.consortium!r}"
            )
        entry.pinned_key()
        out[site] = entry
    return out


def _send(
    exchange: CoordinatorExchange,
    state: AggregationState,
    payloads: Mapping[str, SecAggPayload],
    now: datetime,
) -> dict[str, JobHeader]:
    entries = _entries(exchange, payloads)
    sent = {}
    for site, payload in sorted(payloads.items()):
        header, raw = seal_job(
            payload, bucket=entries[site].bucket, signer=exchange.signer, ttl=state.ttl, now=now
        )
        exchange.storage.put_bytes(
            entries[site].bucket, object_key(header), raw, content_type="application/json"
        )
        sent[site] = header
    return sent


def _common(state: AggregationState, site: str) -> dict[str, Any]:
    return {
        "consortium": state.consortium,
        "run_id": state.run_id,
        "round": state.round,
        "site": site,
        "aggregation_id": state.aggregation_id,
    }


def start(
    exchange: CoordinatorExchange,
    *,
    run_id: str,
    round: int,
    purpose: Purpose,
    sites: Sequence[str],
    update: UpdateLayout | None = None,
    statistics: StatisticsLayout | None = None,
    threshold: int | None = None,
    degree: int | None = None,
    bits: Literal[32, 64] = 32,
    for_jobs: Mapping[str, JobHeader] | None = None,
    contract: Contract | None = None,
    ttl: timedelta = DEFAULT_PHASE_TTL,
    now: datetime | None = None,
) -> AggregationState:
    """Begin an aggregation: draw its id and send every planned site its :class:`SecAggSetup`.

    ``threshold`` defaults to :func:`default_threshold`; every parameter is checked (protocol rules, layout,
    enrollment and pinned keys of every site) before anything is written. ``for_jobs``: site → the round's
    job whose result is aggregated (bound into the setup). ``contract``: the run's contract, for a
    statistics layout (loaded by name when ``None``). ``ttl``: each phase's deadline.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    sites = sorted(sites)
    threshold = threshold if threshold is not None else default_threshold(len(sites), degree)
    state = AggregationState(
        consortium=exchange.consortium,
        run_id=run_id,
        round=round,
        aggregation_id=uuid.uuid4(),
        purpose=purpose,
        sites=sites,
        threshold=threshold,
        degree=degree,
        bits=bits,
        update=update,
        statistics=statistics,
        ttl_seconds=ttl.total_seconds(),
        vector_length=vector_length(purpose, update, statistics, len(sites), contract),
        phase=Phase.KEYS,
        jobs={},
    )
    round_config(state)  # raises on parameters the protocol forbids
    setups = {
        site: SecAggSetup(
            **_common(state, site),
            purpose=purpose,
            for_job=job_ref(for_jobs[site]) if for_jobs and site in for_jobs else None,
            sites=sites,
            threshold=threshold,
            degree=degree,
            bits=bits,
            update=update,
            statistics=statistics,
        )
        for site in sites
    }
    _entries(exchange, sites)
    state.jobs = _send(exchange, state, setups, now)
    return state


# ---------------------------------------------------------------------------------------------------- collect


def _check_reply(
    storage: Storage, state: AggregationState, site: str, job: JobHeader, payload: SecAggPayload, key: str
) -> Rejection | None:
    """The phase's checks beyond the schema: what a reply may contain for this aggregation."""
    config = round_config(state)
    malformed = RejectReason.MALFORMED.value
    if isinstance(payload, SecAggKeys):
        try:
            secagg.AdvertisedKeys(site, payload.c_pk, payload.s_pk)
        except ValueError as exc:
            return Rejection(malformed, str(exc), key, "payload")
    elif isinstance(payload, SecAggShares):
        want = config.shareholders(site) & set(state.advertised)
        have = {s.recipient for s in payload.shares}
        if have != want:
            return Rejection(
                malformed,
                f"shares for {sorted(have)}; {site!r}'s advertised shareholders are {sorted(want)}",
                key,
                "payload.shares",
            )
    elif isinstance(payload, SecAggMasked):
        return _check_masked(storage, state, job, payload, key)
    elif isinstance(payload, SecAggReveal):
        u3 = set(state.masked)
        dropped = set(state.shared) - u3
        for what, shares, allowed in (("b", payload.b_shares, u3), ("s_sk", payload.s_sk_shares, dropped)):
            for owner, share in shares.items():
                if (
                    owner not in allowed
                    or site not in config.shareholders(owner)
                    or share.index != config.share_index(owner, site)
                ):
                    return Rejection(
                        malformed,
                        f"a {what} share of {owner!r} that {site!r} must not hold or reveal",
                        key,
                        f"payload.{what}_shares.{owner}",
                    )
    return None


def _check_masked(
    storage: Storage, state: AggregationState, job: JobHeader, payload: SecAggMasked, key: str
) -> Rejection | None:
    if payload.bits != state.bits:
        return Rejection(
            RejectReason.MALFORMED.value,
            f"a {payload.bits}-bit vector, the ring is {state.bits}",
            key,
            "payload.bits",
        )
    want = state.vector_length
    if payload.length != want:
        return Rejection(
            RejectReason.MALFORMED.value,
            f"{payload.length} ring words, the layout has {want}",
            key,
            "payload.length",
        )
    ref = payload.masked
    folder = prefix_for(MessageKind.ANSWER, job.run_id, job.round)
    rest = ref.key[len(folder) :] if ref.key.startswith(folder) else ""
    if not rest or "/" in rest or not rest.endswith(MASKED_SUFFIX):
        return Rejection(
            RejectReason.MOVED.value,
            f"the masked input {ref.key!r} is not a masked blob of this round ({folder}*{MASKED_SUFFIX})",
            key,
            "payload.masked.key",
        )
    try:
        _blob(storage, job.bucket, ref)
    except ValueError as exc:
        return Rejection(RejectReason.TAMPERED_PAYLOAD.value, str(exc), key, "payload.masked.sha256")
    except (S3Error, StorageError) as exc:
        return Rejection(
            "unreadable", f"cannot read the masked input {ref.key}: {exc}", key, "payload.masked.key"
        )
    return None


def _blob(storage: Storage, bucket: str, ref: BlobRef) -> bytes:
    """The blob ``ref`` names, checked against its signed size and SHA-256 (``ValueError`` otherwise)."""
    if not storage.exists(bucket, ref.key):
        raise ValueError(f"the masked input {ref.key} the signed answer names is not in the bucket")
    data = storage.get_bytes(bucket, ref.key)
    if len(data) != ref.size or sha256_hex(data) != ref.sha256:
        raise ValueError(
            f"the masked input {ref.key} ({len(data)} bytes, sha256 {sha256_hex(data)[:12]}…) is not the "
            f"one the signed answer names ({ref.size} bytes, sha256 {ref.sha256[:12]}…)"
        )
    return data


def _refusal_text(reasons: Sequence[Mapping[str, str]]) -> str:
    parts = [f"{r.get('code', '?')} ({r.get('field', '?')}): {r.get('message', '')}" for r in reasons]
    return "refused by the site: " + "; ".join(parts)


def _collect_site(
    exchange: CoordinatorExchange,
    state: AggregationState,
    site: str,
    job: JobHeader,
    entry: SiteEntry | None,
    now: datetime,
) -> PhaseReply:
    phase = state.phase
    model = _ANSWER[phase]

    def rejected(rejection: Rejection, warnings: Sequence[str] = ()) -> PhaseReply:
        return PhaseReply(
            site,
            SiteStatus.REJECTED,
            rejection=rejection,
            reason=f"{phase.value}: its reply was rejected ({rejection.describe()})",
            warnings=tuple(warnings),
        )

    if entry is None:
        return rejected(Rejection("not_enrolled", f"site {site!r} is no longer enrolled"))
    if entry.bucket != job.bucket:
        return rejected(
            Rejection("moved", f"the site's bucket is now {entry.bucket}, the job went to {job.bucket}")
        )
    try:
        public_key = entry.pinned_key()
        keys = sorted(
            obj.key
            for kind in (MessageKind.ANSWER, MessageKind.REFUSAL)
            for obj in exchange.storage.list(job.bucket, prefix_for(kind, job.run_id, job.round))
        )
    except EnrollmentError as exc:
        return rejected(Rejection("not_pinned", str(exc)))
    except (S3Error, StorageError) as exc:
        return rejected(Rejection("unreadable", f"cannot list {job.bucket}: {exc}"))

    answers: list[tuple[AnswerHeader, SecAggPayload]] = []
    refusals: list[tuple[RefusalHeader, RoundRefusal]] = []
    rejections: list[Rejection] = []
    warnings: list[str] = []
    for key in keys:
        try:
            parse_object_key(key)
        except ValueError:
            continue  # blobs are read through the answer that names them
        try:
            raw = exchange.storage.get_bytes(job.bucket, key)
            header, payload = open_payload(
                raw,
                model,
                expected=Expectation.for_reply(job, object_key=key),
                public_key=public_key,
                seen_ids=state.reply_ids,
                aggregation_id=state.aggregation_id,
                allow_refusal=True,
                now=now,
            )
        except StorageError as exc:
            warnings.append(f"cannot read {key}: {exc}")
            continue
        except MessageRejected as exc:
            if exc.reason_code not in _NOT_MINE:
                rejections.append(Rejection(exc.reason_code.value, exc.message, key, exc.field))
            continue
        if isinstance(payload, RoundRefusal):
            assert isinstance(header, RefusalHeader)
            refusals.append((header, payload))
            continue
        assert isinstance(header, AnswerHeader)
        if (problem := _check_reply(exchange.storage, state, site, job, payload, key)) is not None:
            rejections.append(problem)
            continue
        answers.append((header, payload))

    if refusals or answers:
        warnings += [f"a reply was rejected beside a valid one ({r.describe()})" for r in rejections]
    if refusals:
        header_r, refusal = min(refusals, key=lambda r: (r[0].created_at, str(r[0].message_id)))
        reasons = tuple(refusal.reasons)
        return PhaseReply(
            site,
            SiteStatus.REFUSED,
            reply=header_r,
            reasons=reasons,
            reason=f"{phase.value}: {_refusal_text(reasons)}",
            warnings=tuple(warnings),
        )
    if answers:
        header_a, payload_a = min(answers, key=lambda a: (a[0].created_at, str(a[0].message_id)))
        if len(answers) > 1:
            warnings.append(f"{len(answers)} valid answers; the earliest ({header_a.message_id}) is used")
        return PhaseReply(
            site, SiteStatus.ACCEPTED, payload=payload_a, reply=header_a, warnings=tuple(warnings)
        )
    if rejections:
        return rejected(
            rejections[0],
            [*warnings, *(f"another reply was rejected too ({r.describe()})" for r in rejections[1:])],
        )
    if now < job.expires_at:
        return PhaseReply(site, SiteStatus.PENDING, warnings=tuple(warnings))
    return PhaseReply(
        site,
        SiteStatus.MISSING,
        reason=f"{phase.value}: no reply before the phase's deadline {job.expires_at.isoformat()}",
        warnings=tuple(warnings),
    )


def collect(
    exchange: CoordinatorExchange, state: AggregationState, *, now: datetime | None = None
) -> PhaseReplies:
    """Read and judge every site's reply to the current phase's jobs; never raises for one site's fault
    (calling it again, as a polling trigger does, gives the same outcome)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    entries = exchange.registry.load()
    out = {}
    for site, job in sorted(state.jobs.items()):
        reply = _collect_site(exchange, state, site, job, entries.get(site), now)
        if reply.reason:
            log.warning(
                "secure aggregation %s: site %s excluded: %s", state.aggregation_id, site, reply.reason
            )
        out[site] = reply
    return PhaseReplies(state.phase, out)


# ---------------------------------------------------------------------------------------------------- advance


def _ready(state: AggregationState, replies: PhaseReplies) -> None:
    if replies.phase is not state.phase:
        raise ValueError(f"replies of phase {replies.phase.value}, the aggregation is in {state.phase.value}")
    if not replies.complete:
        raise PhaseIncomplete(
            f"phase {state.phase.value}: still waiting for {', '.join(replies.pending)} (deadline not passed)"
        )


def _fail_below(state: AggregationState, members: Sequence[str], what: str) -> None:
    if len(members) < state.threshold:
        raise SecAggRoundFailed(
            state.phase,
            f"{len(members)} of {len(state.sites)} sites {what} ({', '.join(members) or 'none'}), "
            f"the threshold is {state.threshold}",
            remaining=members,
            lost=state.excluded,
        )


def advance(
    exchange: CoordinatorExchange,
    state: AggregationState,
    replies: PhaseReplies,
    *,
    now: datetime | None = None,
) -> AggregationState:
    """Close the current phase with its (complete) ``replies`` and send the next phase's jobs; returns the
    new state. KEYS → rosters to U1; SHARES → each U2 site's inbox of the shares addressed to it (relayed
    unread); MASKED → the survivors U3 to U3. Raises :class:`SecAggRoundFailed` when fewer than
    ``threshold`` sites remain, :class:`PhaseIncomplete` while sites are pending."""
    _ready(state, replies)
    if state.phase is Phase.REVEAL:
        raise ValueError("the reveal phase ends with finish(), not advance()")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    new = state.model_copy(deep=True)
    new.excluded.update(replies.excluded)
    new.reply_ids |= replies.reply_ids
    accepted = replies.accepted
    config = round_config(state)
    payloads: dict[str, SecAggPayload] = {}
    if state.phase is Phase.KEYS:
        keys = {s: p for s, p in accepted.items() if isinstance(p, SecAggKeys)}
        new.advertised = {s: AdvertisedKey(site=s, c_pk=p.c_pk, s_pk=p.s_pk) for s, p in keys.items()}
        _fail_below(new, sorted(keys), "advertised keys")
        for u in sorted(keys):
            holders = sorted(config.shareholders(u) & set(keys))
            if len(holders) < state.threshold:
                raise SecAggRoundFailed(
                    state.phase,
                    f"only {len(holders)} of {u!r}'s shareholders advertised keys ({', '.join(holders)}), "
                    f"the threshold is {state.threshold}",
                    remaining=sorted(keys),
                    lost=new.excluded,
                )
        roster = [new.advertised[s] for s in sorted(keys)]
        payloads = {s: SecAggRoster(**_common(state, s), keys=roster) for s in sorted(keys)}
        new.phase = Phase.SHARES
    elif state.phase is Phase.SHARES:
        shares = {s: p for s, p in accepted.items() if isinstance(p, SecAggShares)}
        new.shared = sorted(shares)
        _fail_below(new, new.shared, "shared their keys")
        inbox: dict[str, list[EncryptedShareModel]] = {s: [] for s in new.shared}
        for sender in new.shared:
            for share in shares[sender].shares:
                if share.recipient in inbox:  # shares for sites that dropped before sharing are discarded
                    inbox[share.recipient].append(share)
        payloads = {
            s: SecAggInbox(**_common(state, s), shared=new.shared, shares=inbox[s]) for s in new.shared
        }
        new.phase = Phase.MASKED
    elif state.phase is Phase.MASKED:
        masked = {s: p for s, p in accepted.items() if isinstance(p, SecAggMasked)}
        new.masked = {s: p.masked for s, p in sorted(masked.items())}
        survivors = sorted(masked)
        _fail_below(new, survivors, "sent a masked input")
        payloads = {s: SecAggSurvivors(**_common(state, s), survivors=survivors) for s in survivors}
        new.phase = Phase.REVEAL
    new.jobs = _send(exchange, new, payloads, now)
    return new


# ---------------------------------------------------------------------------------------------------- finish


def read_masked(storage: Storage, state: AggregationState) -> dict[str, np.ndarray]:
    """The survivors' masked vectors (U3), each checked again against its signed size and SHA-256."""
    entries = {s: h.bucket for s, h in state.jobs.items()}
    dtype = np.dtype(np.uint32 if state.bits == 32 else np.uint64)
    out = {}
    for site, ref in sorted(state.masked.items()):
        data = _blob(storage, entries[site], ref)
        out[site] = np.frombuffer(data, dtype.newbyteorder("<")).astype(dtype)
    return out


def finish(
    exchange: CoordinatorExchange,
    state: AggregationState,
    replies: PhaseReplies,
    *,
    contract: Contract | None = None,
) -> SecAggResult:
    """Close the reveal phase: rebuild the survivors' self-mask seeds and the dropouts' mask keys from the
    revealed shares, and unmask (:func:`lepton_tasks.federation.secagg.unmask`) the exact sum over U3, then
    decode it. ``contract``: the run's contract, for statistics (loaded by name when ``None``; its version
    and hash must match the layout's). Raises :class:`SecAggRoundFailed` naming the sites when a secret
    cannot be rebuilt (fewer than ``threshold`` shares of it revealed)."""
    _ready(state, replies)
    if state.phase is not Phase.REVEAL:
        raise ValueError(f"finish() closes the reveal phase; the aggregation is in {state.phase.value}")
    excluded = {**state.excluded, **replies.excluded}
    config = round_config(state)
    reveals = {s: p for s, p in replies.accepted.items() if isinstance(p, SecAggReveal)}
    survivors = sorted(state.masked)
    lost = dict(excluded)
    if len(reveals) < state.threshold:
        raise SecAggRoundFailed(
            Phase.REVEAL,
            f"{len(reveals)} of the {len(survivors)} survivors revealed their shares "
            f"({', '.join(sorted(reveals)) or 'none'}), the threshold is {state.threshold}",
            remaining=sorted(reveals),
            lost=lost,
        )
    advertised = {s: secagg.AdvertisedKeys(s, k.c_pk, k.s_pk) for s, k in state.advertised.items()}
    revealed = [
        secagg.RevealedShares(
            config.round_id,
            site,
            {u: secagg.Share(sh.index, sh.value) for u, sh in p.b_shares.items()},
            {u: secagg.Share(sh.index, sh.value) for u, sh in p.s_sk_shares.items()},
        )
        for site, p in sorted(reveals.items())
    ]
    masked = read_masked(exchange.storage, state)
    try:
        total = secagg.unmask(config, advertised, state.shared, masked, revealed)
    except ValueError as exc:
        raise SecAggRoundFailed(
            Phase.REVEAL, f"cannot unmask: {exc}", remaining=sorted(reveals), lost=lost
        ) from None
    result = SecAggResult(
        aggregation_id=state.aggregation_id,
        purpose=state.purpose,
        survivors=tuple(survivors),
        recovered=tuple(sorted(set(state.shared) - set(survivors))),
        unrevealed=tuple(sorted(set(survivors) - set(reveals))),
        excluded=excluded,
        total=total,
    )
    n = len(survivors)
    if state.update is not None:
        codec = UpdateCodec(state.update, len(state.sites), state.bits)
        weights, n_samples = codec.decode(total, n)
        return replace(result, weights=weights, n_samples=n_samples, error_bound=codec.error_bound())
    assert state.statistics is not None
    if contract is None:
        contract = load_contract(state.statistics.dataset)
    stats_codec = StatisticsCodec(contract, state.statistics, len(state.sites))
    return replace(
        result, statistics=stats_codec.decode(total, n), statistics_error=stats_codec.error_bounds(n)
    )
