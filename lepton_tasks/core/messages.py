"""Every object that crosses a process boundary, as a typed, versioned message.

Ingest writes a :class:`SignedManifest` per drop; a site's local run writes a one-partner :class:`Plan`;
each trainer container receives a :class:`TrainerJob` and answers with :class:`UpdateMeta` (inside the
weights file), :class:`LocalModelMeta` or an :class:`EvalResult`; the coordinator and the sites exchange a
:class:`RoundJob` and a :class:`RoundAnswer` (or a :class:`RoundRefusal`), a site's update carrying an
:class:`ExchangeUpdateMeta`; the coordinator writes :class:`MergedStatistics` (``stats.json``), a
:class:`GlobalWeightsMeta` inside every round's global weights, and on publish :class:`RunMetrics`
(``metrics.json``), a :class:`ModelVersion` and a :class:`RegistryEntry`; quarantine writes a
:class:`QuarantineReason`. Writers build the model and dump it with :func:`dump`; readers go through
:func:`load`, which fails with a :class:`MessageError` naming the object, where it was read from and the
field: a missing, unknown or mistyped field never reaches the code that uses it.

Each model carries ``schema_version``; a reader accepts exactly the versions it knows. The JSON Schemas
(``lepton schemas export``, committed under ``docs/schemas/``) are what a partner's engineers read.

This module sits in ``core`` because the trainer image needs it; it imports nothing outside ``core``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lepton_tasks.core.features import SufficientStats
from lepton_tasks.core.strategies import Strategy

TrainerMode = Literal["train", "local", "evaluate"]
#: what a round of a federated run asks of the sites (round 0: statistics, 1..R: train, R+1: evaluate)
RoundMode = Literal["statistics", "train", "evaluate"]
#: a SHA-256 hex digest
SHA256_PATTERN = r"^[0-9a-f]{64}$"

#: metric blocks (``auc``, ``pr_auc``, ``accuracy``, ``log_loss``, ``n``, ``score_summary`` …) are produced
#: and read by ``core.metrics`` only; their keys are documented there.
MetricBlock = dict[str, Any]


class MessageError(ValueError):
    """A boundary object failed validation: names the object, where it came from and the field."""


class Message(BaseModel):
    """Base of every boundary object: unknown fields are errors, every object carries its schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1


M = TypeVar("M", bound=Message)


def load(model: type[M], raw: bytes | str | dict[str, Any], *, where: str) -> M:
    """Validate ``raw`` (JSON text/bytes or an already parsed dict) as ``model``.

    ``where`` says where the object came from (an S3 URL, ``LEPTON_JOB``…); it leads the error message.
    """
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise MessageError(f"{where}: invalid {model.__name__}: {problems}{more}") from None


def dump(message: Message) -> dict[str, Any]:
    """The JSON-ready dict of ``message`` (what writers put in object storage)."""
    return message.model_dump(mode="json")


# ----------------------------------------------------------------------------------------------------------
# ingest → staging (stays at the partner's site)
# ----------------------------------------------------------------------------------------------------------


class SourceObject(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    key: str
    etag: str
    size: int


class StagedObject(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Encryption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["tink-streaming-aead/AES256_GCM_HKDF_1MB+vault-transit"]
    key_name: str
    key_version: int


class RowCounts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int = Field(ge=0)
    holdout: int = Field(ge=0)


class Manifest(Message):
    """A committed drop: what was staged, under which contract, encrypted how (written last: the commit)."""

    format: Literal["lepton-manifest/1"] = "lepton-manifest/1"
    partner: str
    dataset: str
    drop_id: str
    drop_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source: SourceObject
    contract: str = Field(description="the contract's version tag, e.g. banks@v1")
    contract_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: RowCounts
    cleaning: dict[str, Any] = Field(description="the cleaning report (counts per rule); stays at the site")
    statistics_train: SufficientStats
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    encryption: Encryption
    objects: dict[Literal["train", "holdout"], StagedObject]
    staged_at: datetime


class SignedManifest(Message):
    """``manifest.json`` in staging: the manifest and its HMAC under the partner's transit key."""

    manifest: Manifest
    hmac: str = Field(pattern=r"^vault:v\d+:")


class QuarantineReason(Message):
    """``reason.json`` beside a quarantined original: what was wrong, where, and how to fix it."""

    code: str
    file: str | None = None
    row: int | None = None
    column: str | None = None
    message: str
    fix: str | None = None
    samples: list[Any] | None = None
    details: dict[str, Any] | None = None
    partner: str
    object_key: str
    object_keys: list[str] = Field(
        default_factory=list, description="every inbox key these same bytes arrived under"
    )
    drop_id: str
    original: str
    quarantined_at: datetime


# ----------------------------------------------------------------------------------------------------------
# run settings (DP, hyper-parameters) and a site's local run: plan, trainer job, trainer outputs
# ----------------------------------------------------------------------------------------------------------


#: the smallest DP-SGD noise multiplier a run may ask for: below it one round's epsilon runs into the
#: hundreds (no meaningful guarantee) and the RDP accountant's orders grid is outside its good regime
MIN_NOISE_MULTIPLIER = 0.3


class DPTraining(BaseModel):
    """Record-level DP-SGD of a site's local training (:mod:`lepton_tasks.trainer.dp_sgd`): each example's
    gradient is clipped to ``l2_clip`` and Gaussian noise of std ``noise_multiplier x l2_clip`` is added to
    the sum of a Poisson-sampled batch. The privacy unit is one record of the site's training data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(ge=MIN_NOISE_MULTIPLIER, allow_inf_nan=False)
    l2_clip: float = Field(1.0, gt=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta at which epsilon is reported")
    evaluation_epsilon: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="through sites: what the evaluation round's one Gaussian release of a site's score "
        "histogram may cost (epsilon at delta); each site calibrates that release's noise from it "
        "(core.privacy.evaluation_sigma) and reserves it in its budget when it trains",
    )
    statistics_epsilon: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="through sites: what the statistics round's one Gaussian release of a site's counts, "
        "sums and sums of squares may cost (epsilon at delta); each site calibrates that release's noise "
        "from it (federation.private_statistics.statistics_sigma) and charges it to its budget",
    )


class PrivacyCharge(BaseModel):
    """What one DP-SGD training cost the site: ``steps`` Poisson-sampled Gaussian steps (the parameters of a
    :class:`lepton_tasks.core.privacy.Charge`) and their epsilon at ``delta`` (RDP accountant,
    :func:`lepton_tasks.core.privacy.epsilon_spent`) for this training alone: a site's ledger composes every
    charge; summing these epsilons over-states the total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sampling_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    sampling: Literal["poisson", "shuffle"] = "poisson"
    l2_clip: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    epsilon_this_update: float = Field(ge=0, allow_inf_nan=False)


class BudgetStatus(BaseModel):
    """A site's privacy ledger right after it charged an answer (:mod:`lepton_tasks.core.privacy`): every
    charge on that ledger composed at the budget's delta, this answer's included. The site tells the
    coordinator its totals only, never the other runs it trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ledger: str = Field(description="the dataset whose ledger this is, or '*' for the site-wide ledger")
    epsilon_limit: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    epsilon_spent: float = Field(ge=0, allow_inf_nan=False)
    epsilon_remaining: float = Field(ge=0, allow_inf_nan=False)


class HParams(Message):
    """A run's hyper-parameters (from the trigger form; defaults from the dataset's contract)."""

    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.005, gt=0, le=1)
    strategy: Strategy = "fedavg"
    min_partners: int = Field(2, ge=1)
    seed: int = Field(42, ge=0)
    fedprox_mu: float = Field(0.0, ge=0)
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    krum_f: int = Field(0, ge=0)
    dp_noise_multiplier: float | None = Field(
        None,
        ge=MIN_NOISE_MULTIPLIER,
        allow_inf_nan=False,
        description="record-level DP-SGD at every site: the Gaussian noise multiplier sigma (noise std = "
        "sigma x dp_l2_clip); None trains without differential privacy",
    )
    dp_l2_clip: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="DP-SGD: each example's gradient is clipped to this norm"
    )
    dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="DP-SGD: the delta at which each update's epsilon is reported"
    )

    def dp_training(self) -> DPTraining | None:
        """The DP-SGD settings the trainers get, or None when the run trains without DP."""
        if self.dp_noise_multiplier is None:
            return None
        return DPTraining(
            noise_multiplier=self.dp_noise_multiplier, l2_clip=self.dp_l2_clip, delta=self.dp_delta
        )


class PlanDrop(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str = Field(description="the manifest's key in the staging bucket")
    drop_id: str
    drop_sha256: str
    rows: RowCounts
    contract: str
    objects: dict[Literal["train", "holdout"], StagedObject]

    @classmethod
    def of(cls, key: str, manifest: Manifest) -> PlanDrop:
        """The plan's entry for the staged drop whose manifest ``manifest`` was read at ``key``."""
        return cls(
            manifest=key,
            drop_id=manifest.drop_id,
            drop_sha256=manifest.drop_sha256,
            rows=manifest.rows,
            contract=manifest.contract,
            objects=manifest.objects,
        )


class Plan(Message):
    """``models/<run>/plan.json``: immutable once written (a cleared ``plan`` task reuses it)."""

    run_id: str
    dataset: str
    contract: str
    contract_sha256: str
    partners: list[str]
    drops: dict[str, list[PlanDrop]]
    superseded: dict[str, list[str]] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(
        default_factory=dict, description="drop manifest key → why it was left out (verification, contract)"
    )
    hparams: HParams
    feature_names: list[str]

    @model_validator(mode="after")
    def _partners_have_drops(self) -> Plan:
        if sorted(self.drops) != sorted(self.partners):
            raise ValueError(f"partners {self.partners} and drops {sorted(self.drops)} disagree")
        return self


class TrainerHParams(BaseModel):
    """What the trainer needs of the run's hyper-parameters (the names the trainer uses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_epochs: int = Field(ge=1)
    local_only_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    seed: int = Field(ge=0)
    fedprox_mu: float = Field(ge=0)
    dp: DPTraining | None = Field(None, description="record-level DP-SGD settings; None: no DP")


class JobObject(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    sha256: str
    url: str = Field(repr=False)


class JobDrop(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_key: str
    manifest_url: str = Field(repr=False)
    train: JobObject
    holdout: JobObject


class TrainerJob(Message):
    """One trainer container's job (SECRET: presigned URLs and a scoped token; environment only, never XCom).

    The contract travels with the job (``contract`` + its ``contract_sha256``), so a new dataset never needs
    a new image; the trainer refuses a contract whose hash does not match.
    """

    mode: TrainerMode
    partner: str
    dataset: str
    run_id: str
    round: int = Field(ge=0)
    contract: dict[str, Any]
    contract_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    vault_addr: str
    transit_mount: str
    key_name: str
    staging_bucket: str
    vault_token: str = Field(repr=False, description="a single-use response-wrapping token, or a plain token")
    vault_token_wrapped: bool = False
    drops: list[JobDrop]
    stats_url: str = Field(repr=False)
    global_weights_url: str | None = Field(None, repr=False)
    output_url: str = Field(repr=False)
    output_key: str
    local_models: dict[str, str] = Field(default_factory=dict, repr=False)
    hparams: TrainerHParams


class UpdateMeta(Message):
    """The metadata inside a partner's ``round-<k>/<partner>.update`` weights file."""

    kind: Literal["update"] = "update"
    partner: str
    round: int = Field(ge=1)
    run_id: str
    n_samples: int = Field(gt=0)
    metrics: dict[str, float | int | None]
    drops: list[str] = Field(description="SHA-256 of every drop that fed this update")
    global_prev_holdout: MetricBlock | None = None
    privacy: PrivacyCharge | None = Field(None, description="the DP-SGD charge of this update; None: no DP")


class LocalModelMeta(Message):
    """The metadata inside ``local/<partner>.npz`` (a model trained on that partner's data alone)."""

    kind: Literal["local-only"] = "local-only"
    partner: str
    run_id: str
    n_samples: int = Field(gt=0)
    metrics: dict[str, float | int | None]
    privacy: PrivacyCharge | None = Field(
        None, description="the DP-SGD charge of this model (it leaves the site for evaluation); None: no DP"
    )


class EvalRows(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int
    holdout: int


class EvalResult(Message):
    """``eval/<partner>.json``: held-out metrics + score histograms of the global and local-only models."""

    partner: str
    run_id: str
    global_: MetricBlock = Field(alias="global")
    local_models: dict[str, MetricBlock] = Field(default_factory=dict)
    rows: EvalRows

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)


# ---------------------------------------------------------------------------------------------------------
# the coordinator's objects (``federation.coordinator``, ``federation.publish``, in its own object storage)
# ---------------------------------------------------------------------------------------------------------


class MergedStatistics(Message):
    """``federated/<run>/stats.json``: the statistics round's merged statistics, the feature names derived
    from them (the model's input order) and the sites merged."""

    statistics: SufficientStats
    feature_names: list[str]
    sites: list[str]


class GlobalWeightsMeta(Message):
    """The metadata inside ``federated/<run>/round-<kkkk>/global.npz`` (round 0: the initial weights)."""

    kind: Literal["global"] = "global"
    run_id: str
    round: int = Field(ge=0)
    strategy: Strategy
    sites: list[str] = Field(description="the sites whose statistics (round 0) or updates built the weights")


class ExclusionKind(StrEnum):
    """Why a site is not in a round (what the report groups by)."""

    DEADLINE_MISSED = "deadline_missed"  # nothing valid before the job expired
    REFUSED = "refused"  # the site's signed refusal (policy, approval, budget, weights check)
    VERIFICATION_FAILED = "verification_failed"  # its reply failed verification (signature, tampering…)
    TRAINING_FAILED = "training_failed"  # the site reported that its trainer failed
    UNUSABLE = "unusable"  # a verified answer the round cannot use (wrong mode, shapes, statistics)
    UNREADABLE = "unreadable"  # the coordinator could not read the site's replies (storage)


class RunExclusion(BaseModel):
    """One site left out of one round of a run, as ``metrics.json`` lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    round: int = Field(ge=0)
    mode: RoundMode
    kind: ExclusionKind
    code: str | None = Field(None, description="the machine-readable code (a refusal's, a rejection's…)")
    reason: str


class RoundMetrics(BaseModel):
    """One round of a run in ``metrics.json``: the sites that took part with their metrics, who was left out
    and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    partners: dict[str, MetricBlock] = Field(
        description="accepted site → its sample count ``n`` (absent under secure aggregation) and, in a "
        "train round, its local training metrics"
    )
    excluded: dict[str, str] = Field(default_factory=dict, description="site → why it is not in this round")
    samples_total: int | None = Field(
        None, ge=0, description="secure aggregation: the round's total sample count, from the unmasked sum"
    )


class FinalMetrics(BaseModel):
    """The evaluation round: the final global model on each site's held-out split, and overall (the merged
    score histograms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_partner: dict[str, MetricBlock]
    overall: MetricBlock


class Lineage(BaseModel):
    """Where a published model came from: the run, its rounds and strategy, the contract, the sites that
    trained it and the global weights published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    rounds: int = Field(ge=1)
    strategy: Strategy
    contract: str = Field(description="the contract's version tag, e.g. banks@v1")
    sites: list[str] = Field(description="every site whose update is in some train round's aggregate")
    published_round: int = Field(ge=1, description="the train round whose global weights were published")
    global_weights_sha256: str = Field(pattern=SHA256_PATTERN)


class SitePrivacy(BaseModel):
    """What DP-SGD cost one site in one run (built by :func:`lepton_tasks.core.privacy.run_privacy` from the
    site's answers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds_charged: int = Field(
        ge=0, description="answers of this run that carried a DP charge (statistics, train, evaluation)"
    )
    delta: float = Field(gt=0, lt=1, description="the delta of the epsilons below (the site's budget's)")
    epsilon_run: float = Field(ge=0, description="this run's charges composed (RDP), at delta")
    noise_multiplier: float | None = Field(None, gt=0)
    l2_clip: float | None = Field(None, gt=0)
    epsilon_limit: float | None = Field(None, description="the site's budget (None: it reported none)")
    epsilon_spent: float | None = Field(None, description="the site's ledger after its last answer")
    epsilon_remaining: float | None = None


class RunPrivacy(BaseModel):
    """What protected a run: secure aggregation, record-level DP and each site's budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secure_aggregation: bool
    dropouts_recovered: int | None = Field(
        None, ge=0, description="sites recovered after masking (None: secure aggregation not used)"
    )
    dp: DPTraining | None = Field(None, description="the run's DP-SGD settings; None: no DP")
    evaluation_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="through sites under DP: the noise multiplier of the evaluation's release, calibrated "
        "from dp.evaluation_epsilon (None: not recorded, or no DP)",
    )
    sites: dict[str, SitePrivacy] = Field(default_factory=dict)


class RunMetrics(Message):
    """``federated/<run>/metrics.json`` (and the report's input): per round the sites that took part and
    their metrics, every exclusion with its kind and reason, the final held-out metrics per site and
    overall, the lineage, what protected the run, the warnings."""

    run_id: str = Field(description="the exchange run id")
    airflow_run_id: str
    consortium: str
    dataset: str
    contract_version: str = Field(description="the contract's version tag, e.g. banks@v1")
    contract_sha256: str = Field(pattern=SHA256_PATTERN)
    strategy: Strategy
    min_partners: int = Field(ge=1)
    runtime: Literal["sites"] = Field("sites", description="training ran at the sites, over the exchange")
    created_at: datetime
    partners: list[str] = Field(description="the run's sites")
    statistics_round: RoundMetrics = Field(description="round 0: the sites whose statistics were merged")
    rounds: list[RoundMetrics] = Field(description="the train rounds 1..R, in order")
    final: FinalMetrics
    excluded: dict[str, str] = Field(
        default_factory=dict, description="'<site> (round <k>, <mode>)' → why (the report's exclusions table)"
    )
    exclusions: list[RunExclusion] = Field(default_factory=list)
    lineage: Lineage
    privacy: RunPrivacy
    warnings: list[str] = Field(default_factory=list)
    model_version: int | None = Field(None, ge=1, description="set when the run is published")


class ModelVersion(Message):
    """``model/VERSION.json`` beside a published model."""

    version: int = Field(ge=1)
    dataset: str
    run_id: str
    published_at: datetime
    lineage: Lineage


class RegistryEntry(Message):
    """``_registry/<dataset>/<version>.json``: which run a model version came from."""

    run_id: str
    version: int = Field(ge=1)


# ---------------------------------------------------------------------------------------------------------
# coordinator ↔ site exchange payloads (inside a signed envelope, see core.exchange)
# ---------------------------------------------------------------------------------------------------------


class BlobRef(BaseModel):
    """A large object (weights) written beside a message in the same exchange bucket; the signed payload
    carries its SHA-256, so a swapped or tampered blob is detected by the reader."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ExchangeUpdateMeta(Message):
    """The metadata inside a site's weights update in the exchange (``answers/<run>/<round>/<id>.update``,
    the :class:`BlobRef` of a train :class:`RoundAnswer`): the coordinator's run and round and the sample
    count; the trainer's :class:`UpdateMeta` (partner, drops, metrics) stays at the site."""

    kind: Literal["exchange-update"] = "exchange-update"
    run_id: str
    round: int = Field(ge=1)
    n_samples: int = Field(gt=0)


class RoundJob(Message):
    """``lepton-round-job/1``: what the coordinator asks one site to do in one round of one run."""

    payload_schema: ClassVar[str] = "lepton-round-job/1"

    mode: Literal["statistics", "train", "evaluate"]
    dataset: str
    contract: dict[str, Any]
    contract_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    strategy: Strategy
    rounds: int = Field(ge=1)
    min_partners: int = Field(ge=1)
    secure_aggregation: bool = False
    hparams: TrainerHParams
    global_weights: BlobRef | None = None
    feature_names: list[str] = Field(default_factory=list)
    statistics: SufficientStats | None = Field(None, description="the merged statistics (train/evaluate)")


class RoundAnswer(Message):
    """``lepton-round-answer/1``: a site's answer to a :class:`RoundJob` (never rows, never keys)."""

    payload_schema: ClassVar[str] = "lepton-round-answer/1"

    mode: Literal["statistics", "train", "evaluate"]
    n_samples: int | None = Field(
        None,
        ge=0,
        description="the site's sample count (FedAvg weights with it); None under secure aggregation, where "
        "it crosses only masked, inside the sum",
    )
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    update: BlobRef | None = Field(None, description="the weights update (train)")
    statistics: SufficientStats | None = Field(None, description="additive statistics (statistics round)")
    evaluation: MetricBlock | None = Field(None, description="held-out metrics + score histogram (evaluate)")
    privacy: PrivacyCharge | None = Field(None, description="the DP-SGD charge of this update; None: no DP")
    budget: BudgetStatus | None = Field(
        None, description="the site's privacy ledger after this answer's charge (sites with a budget)"
    )


class RoundRefusal(Message):
    """``lepton-round-refusal/1``: why a site will not run a job (policy, approval, budget, verification)."""

    payload_schema: ClassVar[str] = "lepton-round-refusal/1"

    reasons: list[dict[str, str]] = Field(min_length=1, description="code, field and message of each reason")


#: a dataset name as it travels in a message and an object-key segment (the contracts' file names)
DATASET_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class StagedAnnouncement(Message):
    """``lepton-staged-announcement/1``: a site tells the coordinator it staged new data for a dataset.

    Which dataset, under which contract, and when: nothing about the data itself (no row count, no drop,
    no value). Sealed in the signed envelope of ``core.announcements``, bound to consortium, site and
    dataset."""

    payload_schema: ClassVar[str] = "lepton-staged-announcement/1"

    dataset: str = Field(pattern=DATASET_PATTERN)
    contract_version: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,62}@v[1-9][0-9]{0,5}$", description="the contract's tag: <dataset>@v<N>"
    )
    contract_sha256: str = Field(pattern=SHA256_PATTERN)
    announced_at: AwareDatetime

    @model_validator(mode="after")
    def _contract_of_dataset(self) -> StagedAnnouncement:
        if self.contract_version.split("@v")[0] != self.dataset:
            raise ValueError(
                f"contract_version {self.contract_version!r} is not a contract of {self.dataset!r}"
            )
        return self


#: every boundary model, by the name its JSON Schema is exported under
BOUNDARY_MODELS: dict[str, type[Message]] = {
    "manifest": SignedManifest,
    "quarantine-reason": QuarantineReason,
    "plan": Plan,
    "trainer-job": TrainerJob,
    "update-meta": UpdateMeta,
    "local-model-meta": LocalModelMeta,
    "eval-result": EvalResult,
    "merged-statistics": MergedStatistics,
    "global-weights-meta": GlobalWeightsMeta,
    "run-metrics": RunMetrics,
    "model-version": ModelVersion,
    "registry-entry": RegistryEntry,
    "round-job": RoundJob,
    "round-answer": RoundAnswer,
    "round-refusal": RoundRefusal,
    "exchange-update-meta": ExchangeUpdateMeta,
    "staged-announcement": StagedAnnouncement,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every boundary model (what ``lepton schemas export`` writes)."""
    return {name: model.model_json_schema(by_alias=True) for name, model in BOUNDARY_MODELS.items()}
