"""A federated run's records in the coordinator's object storage: what each one is, where it lives, how it
is read back.

Everything lives in the coordinator's own object storage, keyed by run and round, so a retried or cleared
task finds what an earlier try wrote (sending and deciding are idempotent)::

    <bucket>/federated/<run>/run.json                the run's immutable spec (RunSpec)
    <bucket>/federated/<run>/round-<kkkk>/sent.json  the headers of the jobs sent (what answers bind to)
    <bucket>/federated/<run>/round-<kkkk>/record.json  the round's decision (RoundRecord)
    <bucket>/federated/<run>/round-<kkkk>/global.npz   global weights after the round (0: initial), with a
                                                     GlobalWeightsMeta
    <bucket>/federated/<run>/stats.json              the merged statistics (round 0, MergedStatistics)
    <bucket>/federated/<run>/round-<kkkk>/secagg.json  the round's secure aggregation (AggregationState,
                                                     :mod:`lepton_tasks.federation.secagg_driver`)

Each of them is written from its model (``core.messages`` or the models below) and read back through it:
:mod:`lepton_tasks.federation.coordinator` writes the spec, the jobs sent and the rounds' decisions, weights
and statistics. What a published run adds: :mod:`lepton_tasks.federation.publish`. No Airflow import here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from lepton_tasks.core import weights as wio
from lepton_tasks.core.exchange import RUN_ID_PATTERN, JobHeader
from lepton_tasks.core.messages import (
    ExclusionKind,
    GlobalWeightsMeta,
    MergedStatistics,
    TrainerHParams,
    load,
)
from lepton_tasks.core.strategies import Strategy

if TYPE_CHECKING:
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core.features import SufficientStats

__all__ = [
    "STATISTICS_ROUND",
    "Exclusion",
    "Mode",
    "RoundRecord",
    "RunSpec",
    "exchange_run_id",
    "read_record",
    "read_sent",
    "read_spec",
    "round_deadline",
    "round_prefix",
    "run_prefix",
]

Mode = Literal["statistics", "train", "evaluate"]

#: the statistics round's number (train rounds are 1..R, the evaluation round R+1)
STATISTICS_ROUND: Final = 0
PREFIX: Final = "federated"


# ----------------------------------------------------------------------------------------------------
# typed records
# ----------------------------------------------------------------------------------------------------


class Exclusion(BaseModel):
    """One site left out of one round, with the kind, the machine-readable code and the human reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    round: int = Field(ge=0)
    kind: ExclusionKind
    code: str | None = None
    reason: str

    def describe(self) -> str:
        code = f" ({self.code})" if self.code else ""
        return f"{self.kind.value}{code}: {self.reason}"


class RunSpec(BaseModel):
    """A run's immutable plan (``run.json``), written once by
    :func:`~lepton_tasks.federation.coordinator.start_run`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    run_id: str = Field(pattern=RUN_ID_PATTERN, description="the exchange run id")
    airflow_run_id: str
    consortium: str
    dataset: str
    contract: str = Field(description="the contract's version tag")
    contract_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sites: list[str] = Field(min_length=1)
    rounds: int = Field(ge=1)
    strategy: Strategy
    min_partners: int = Field(ge=1)
    round_deadline_minutes: float = Field(gt=0)
    hparams: TrainerHParams
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    krum_f: int = Field(0, ge=0)
    secure_aggregation: bool = False
    created_at: AwareDatetime

    @property
    def evaluation_round(self) -> int:
        return self.rounds + 1

    def mode_of(self, round_: int) -> Mode:
        if round_ == STATISTICS_ROUND:
            return "statistics"
        if 1 <= round_ <= self.rounds:
            return "train"
        if round_ == self.evaluation_round:
            return "evaluate"
        raise ValueError(f"run {self.run_id} has rounds 0..{self.evaluation_round}; {round_} is none of them")

    @property
    def deadline(self) -> timedelta:
        return timedelta(minutes=self.round_deadline_minutes)


class RoundRecord(BaseModel):
    """A decided round (``record.json``): who took part, who did not and why, what came out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    run_id: str
    round: int = Field(ge=0)
    mode: Mode
    quorum_met: bool
    accepted: list[str]
    exclusions: list[Exclusion]
    #: per accepted site: its n_samples and training metrics (train), held-out metrics (evaluate); under
    #: secure aggregation a site's training sample count is not known (no ``n``): see ``samples_total``
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: secure aggregation (statistics and train rounds): the round's total sample count, from the unmasked
    #: sum (the only count the coordinator learns then)
    samples_total: int | None = Field(None, ge=0)
    #: evaluate: the merged held-out metrics of every accepted site's score histogram
    overall: dict[str, Any] | None = None
    #: message ids of the valid replies (replay protection for the later rounds)
    reply_ids: list[str] = Field(default_factory=list)
    global_weights_sha256: str | None = None
    #: train: each accepted site's DP-SGD charge and privacy ledger as it reported them (``privacy``,
    #: ``budget`` of its answer; sites training without DP are absent) — the report's "what protected it"
    charges: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: secure aggregation: the aggregation's id, the sites in the sum (``survivors``), those recovered after
    #: they dropped out (``recovered``), survivors that did not reveal, and the decoding's error bound
    secure_aggregation: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    decided_at: AwareDatetime

    @property
    def excluded(self) -> dict[str, str]:
        """Site → why it is not in this round (the report's wording)."""
        return {e.site: e.describe() for e in self.exclusions}

    def brief(self) -> dict[str, Any]:
        """A small JSON summary (XCom)."""
        return {
            "round": self.round,
            "mode": self.mode,
            "quorum_met": self.quorum_met,
            "accepted": self.accepted,
            "excluded": self.excluded,
        }


# ----------------------------------------------------------------------------------------------------
# where things live
# ----------------------------------------------------------------------------------------------------


def exchange_run_id(airflow_run_id: str) -> str:
    """A run id the exchange envelope accepts (letters, digits, ``._-``, ≤ 128), stable for one Airflow
    run id: ``manual__2026-01-01T00:00:00+00:00`` → ``manual__2026-01-01T00-00-00-00-00-<8 hex of its
    sha256>`` (the hash keeps two ids that clean up alike apart)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", airflow_run_id).strip("-._") or "run"
    digest = hashlib.sha256(airflow_run_id.encode()).hexdigest()[:8]
    return f"{cleaned[:110]}-{digest}"


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}/{run_id}/"


def round_prefix(run_id: str, round_: int) -> str:
    return f"{run_prefix(run_id)}round-{round_:04d}/"


def _spec_key(run_id: str) -> str:
    return run_prefix(run_id) + "run.json"


def _sent_key(run_id: str, round_: int) -> str:
    return round_prefix(run_id, round_) + "sent.json"


def _record_key(run_id: str, round_: int) -> str:
    return round_prefix(run_id, round_) + "record.json"


def _global_key(run_id: str, round_: int) -> str:
    return round_prefix(run_id, round_) + "global.npz"


def _secagg_key(run_id: str, round_: int) -> str:
    return f"{round_prefix(run_id, round_)}secagg.json"


def _stats_key(run_id: str) -> str:
    return run_prefix(run_id) + "stats.json"


def read_spec(storage: Storage, bucket: str, run_id: str) -> RunSpec:
    return RunSpec.model_validate_json(storage.get_bytes(bucket, _spec_key(run_id)))


def read_sent(storage: Storage, bucket: str, run_id: str, round_: int) -> dict[str, JobHeader]:
    """The headers of the jobs sent for ``round_`` (what the answers are bound to)."""
    doc = storage.get_json(bucket, _sent_key(run_id, round_))
    # headers are strict models: validated from JSON, as the exchange reads them
    return {site: JobHeader.model_validate_json(json.dumps(h)) for site, h in doc["jobs"].items()}


def read_record(storage: Storage, bucket: str, run_id: str, round_: int) -> RoundRecord | None:
    key = _record_key(run_id, round_)
    if not storage.exists(bucket, key):
        return None
    return RoundRecord.model_validate_json(storage.get_bytes(bucket, key))


def round_deadline(sent: Mapping[str, JobHeader]) -> datetime:
    """When the last job of the round expires: after it, a silent site is *missing*."""
    return max(h.expires_at for h in sent.values())


def _merged_statistics(storage: Storage, bucket: str, run_id: str) -> tuple[SufficientStats, list[str]]:
    key = _stats_key(run_id)
    doc = load(MergedStatistics, storage.get_bytes(bucket, key), where=f"s3://{bucket}/{key}")
    return doc.statistics, list(doc.feature_names)


def _global_weights(
    storage: Storage, bucket: str, run_id: str, round_: int
) -> tuple[bytes, list[np.ndarray], GlobalWeightsMeta]:
    """Round ``round_``'s global weights (the blob, its arrays and its :class:`GlobalWeightsMeta`)."""
    key = _global_key(run_id, round_)
    blob = storage.get_bytes(bucket, key)
    arrays, meta = wio.loads(blob)
    return blob, arrays, load(GlobalWeightsMeta, meta, where=f"s3://{bucket}/{key}")
