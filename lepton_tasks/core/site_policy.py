"""A site's policy: what the site agrees to, written by the partner and enforced AT the site.

The policy file (YAML or TOML, :func:`load_policy`) names the one coordinator whose jobs the site accepts
(its Ed25519 public key and the fingerprint a human compared at enrollment), the consortium, the datasets the
site trains on with the exact contract each one is bound to, and the limits every job must respect. Example::

    schema_version: 1
    site: bank-a
    consortium: credit-risk
    coordinator:
      public_key: "MCowBQYDK2VwAyEA..."          # base64 of the 32-byte key, as Vault's read_key returns it
      fingerprint: "3f2a 9c41 ... 07be"          # sha256 of the raw key (lepton_tasks.core.signatures)
    datasets:
      - name: banks
        contract_sha256: "5d1c...e9"             # the contract the site reviewed; any other is refused
        privacy_budget: {epsilon: 3.0, delta: 1.0e-5}  # optional: this dataset's own (eps, delta) ledger
    min_partners: 3
    max_rounds: 20
    allowed_strategies: [fedavg, median]
    require_secure_aggregation: true
    privacy_budget: {epsilon: 8.0, delta: 1.0e-5}  # optional: one ledger for the datasets without their own
    approval: {required: true, deadline: PT24H}     # a human approves each job in the site's Airflow

Privacy budget. A dataset whose grant has a ``privacy_budget`` is accounted on its own ledger (declare it only
for data whose people are in no other dataset of the site); the top-level ``privacy_budget`` is ONE ledger
shared by every other granted dataset (the privacy unit is a person of the site, who may be in several of
them: see :mod:`lepton_tasks.core.privacy`). A dataset covered by either trains only with differential
privacy: a training job without DP-SGD settings is refused (``privacy_required``), and one whose DP-SGD charge
would take the ledger over its epsilon is refused by the site's ledger check (``budget_exhausted``,
:mod:`lepton_tasks.site.jobs`). Both fields are optional and default to no budget: a policy file written
before budgets existed keeps its meaning (no DP required) instead of refusing every job it accepted before.
Evaluation jobs of a DP run (the job carries DP settings) release their score histogram with Gaussian noise
and are charged to the same ledger (one ``GaussianDpEvent``; ``site.training.private_evaluation``,
``site.jobs``); on a budgeted dataset an evaluation job without DP settings is refused by the site
(``privacy_required``, ``site.jobs``: it would release an exact histogram), and so is one whose charge does
not fit (``budget_exhausted``). Statistics jobs are not yet noised: they are neither required to use DP nor
charged (their counts and sums are exact per site unless secure aggregation sums them).

:func:`check_job` compares a :class:`JobSummary` (what a job asks for) with the policy and returns EVERY
violation as a :class:`Refusal` (code, field, human-readable message), so the site can refuse once with all
its reasons. An empty list means the policy allows the job (approval, when required, is a separate step).
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from lepton_tasks.core.exchange import ID_PATTERN
from lepton_tasks.core.files import write_private
from lepton_tasks.core.signatures import PublicKey, fingerprint, load_public_key, normalize_fingerprint

__all__ = [
    "Approval",
    "BudgetScope",
    "DatasetGrant",
    "JobSummary",
    "PolicyError",
    "PrivacyBudget",
    "Refusal",
    "RefusalCode",
    "SitePolicy",
    "TrustedCoordinator",
    "approval_deadline",
    "check_job",
    "load_policy",
    "parse_policy",
    "refusal_codes",
    "render_yaml",
    "write_policy",
]

DATASET_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,62}$"
STRATEGY_PATTERN: Final = r"^[a-z][a-z0-9_]{0,62}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"

#: the name of the site-wide privacy ledger (not a dataset name: those match DATASET_PATTERN)
SITE_LEDGER: Final = "*"

StrategyName = Annotated[str, StringConstraints(pattern=STRATEGY_PATTERN)]


class PolicyError(ValueError):
    """The policy file cannot be used: names the file and the field."""


def _config() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True)


class TrustedCoordinator(BaseModel):
    """The coordinator key pinned at enrollment. The fingerprint must match the key: a typo in either is an
    error when the policy loads, not a silent trust of some other key."""

    model_config = _config()

    public_key: str
    fingerprint: str
    #: pin one version of the coordinator's transit key (``None``: the signature's version is not checked)
    key_version: int | None = Field(default=None, ge=1)
    key_name: str = "coordinator"

    @field_validator("public_key")
    @classmethod
    def _valid_key(cls, value: str) -> str:
        load_public_key(value)
        return value

    @field_validator("fingerprint")
    @classmethod
    def _canonical_fingerprint(cls, value: str) -> str:
        return normalize_fingerprint(value)

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> TrustedCoordinator:
        if fingerprint(self.public_key) != self.fingerprint:
            raise ValueError(
                f"fingerprint {self.fingerprint} does not match the public key (its fingerprint is "
                f"{fingerprint(self.public_key)}): re-check both with the coordinator"
            )
        return self

    def pinned_key(self) -> str | PublicKey:
        """What :func:`lepton_tasks.core.exchange.open_message` takes as ``public_key``."""
        if self.key_version is None:
            return self.public_key
        return PublicKey(self.key_name, self.key_version, self.public_key)


class PrivacyBudget(BaseModel):
    """The (ε, δ) a site allows over EVERY run and round on the data the budget covers; the site's ledger
    composes every DP-SGD charge (:mod:`lepton_tasks.core.privacy`, RDP) and refuses a job that would
    exceed ε. δ must be positive: DP-SGD's Gaussian noise gives no (ε, 0) guarantee."""

    model_config = _config()

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1, allow_inf_nan=False)


class DatasetGrant(BaseModel):
    """A dataset the site trains on, bound to the exact contract (sha256 of its canonical document), with
    an optional privacy budget of its own (``None``: the policy's site-wide budget, if any, applies)."""

    model_config = _config()

    name: str = Field(pattern=DATASET_PATTERN)
    contract_sha256: str = Field(pattern=SHA256_PATTERN)
    privacy_budget: PrivacyBudget | None = None


class BudgetScope(BaseModel):
    """Which ledger accounts a dataset: its own (``ledger`` = the dataset's name) or the site-wide one
    (``ledger`` = :data:`SITE_LEDGER`), and that ledger's budget."""

    model_config = _config()

    ledger: str
    budget: PrivacyBudget


class Approval(BaseModel):
    """Whether a human at the site approves each job, and how long the site waits before it refuses."""

    model_config = _config()

    required: bool
    #: ISO 8601 duration (``PT24H``) or seconds; required when ``required``
    deadline: timedelta | None = None

    @model_validator(mode="after")
    def _deadline(self) -> Approval:
        if self.required and self.deadline is None:
            raise ValueError("approval.deadline is required when approval.required is true (e.g. PT24H)")
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise ValueError("approval.deadline must be positive")
        return self


class SitePolicy(BaseModel):
    """The site's policy file (schema version 1)."""

    model_config = _config()

    schema_version: Literal[1]
    site: str = Field(pattern=ID_PATTERN)
    consortium: str = Field(pattern=ID_PATTERN)
    coordinator: TrustedCoordinator
    datasets: tuple[DatasetGrant, ...]
    #: a job must require at least this many partners in every round
    min_partners: int = Field(ge=1)
    #: a job may run at most this many rounds
    max_rounds: int = Field(ge=1)
    allowed_strategies: frozenset[StrategyName] = Field(min_length=1)
    require_secure_aggregation: bool
    privacy_budget: PrivacyBudget | None = None
    approval: Approval

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, value: tuple[DatasetGrant, ...]) -> tuple[DatasetGrant, ...]:
        names = [d.name for d in value]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"dataset {dupes[0]!r} is listed more than once")
        return value

    def dataset(self, name: str) -> DatasetGrant | None:
        return next((d for d in self.datasets if d.name == name), None)

    def budget_for(self, dataset: str) -> BudgetScope | None:
        """The ledger and budget that account training on ``dataset`` (``None``: no budget, DP optional)."""
        grant = self.dataset(dataset)
        if grant is not None and grant.privacy_budget is not None:
            return BudgetScope(ledger=grant.name, budget=grant.privacy_budget)
        if self.privacy_budget is not None:
            return BudgetScope(ledger=SITE_LEDGER, budget=self.privacy_budget)
        return None


class JobSummary(BaseModel):
    """What a job asks of the site, in the terms the policy speaks (the wiring builds it from the job)."""

    model_config = _config()

    consortium: str
    dataset: str
    contract_hash: str
    rounds: int = Field(ge=1)
    strategy: str
    min_partners: int = Field(ge=1)
    secure_aggregation: bool
    #: what the job does: only ``train`` jobs run DP-SGD (and need it where a budget applies)
    mode: Literal["statistics", "train", "evaluate"] = "train"
    #: whether the job trains with DP-SGD (its ``hparams.dp`` is set)
    differential_privacy: bool = False


class RefusalCode(StrEnum):
    """Why the site's policy refuses a job (stable codes: sent to the coordinator, shown in the UI)."""

    WRONG_CONSORTIUM = "wrong_consortium"
    DATASET_NOT_ALLOWED = "dataset_not_allowed"
    CONTRACT_MISMATCH = "contract_mismatch"
    TOO_MANY_ROUNDS = "too_many_rounds"
    STRATEGY_NOT_ALLOWED = "strategy_not_allowed"
    TOO_FEW_PARTNERS = "too_few_partners"
    SECURE_AGGREGATION_REQUIRED = "secure_aggregation_required"
    PRIVACY_REQUIRED = "privacy_required"
    #: the job's DP-SGD charge, composed with the site's ledger, exceeds its budget (the site's ledger check,
    #: :mod:`lepton_tasks.site.jobs`: it needs the site's sample count, which the policy does not know)
    BUDGET_EXHAUSTED = "budget_exhausted"


class Refusal(BaseModel):
    """One policy violation: a code, the job field at fault, and a sentence for humans."""

    model_config = _config()

    code: RefusalCode
    field: str
    message: str


def check_job(policy: SitePolicy, job: JobSummary) -> list[Refusal]:
    """Every way ``job`` violates ``policy`` (empty: allowed), in the order of the job's fields."""
    out: list[Refusal] = []

    def refuse(code: RefusalCode, field: str, message: str) -> None:
        out.append(Refusal(code=code, field=field, message=message))

    if job.consortium != policy.consortium:
        refuse(
            RefusalCode.WRONG_CONSORTIUM,
            "consortium",
            f"the job is for consortium {job.consortium!r}; this site belongs to {policy.consortium!r}",
        )
    grant = policy.dataset(job.dataset)
    if grant is None:
        allowed = ", ".join(sorted(d.name for d in policy.datasets)) or "none"
        refuse(
            RefusalCode.DATASET_NOT_ALLOWED,
            "dataset",
            f"dataset {job.dataset!r} is not one this site trains on (allowed: {allowed})",
        )
    elif job.contract_hash != grant.contract_sha256:
        refuse(
            RefusalCode.CONTRACT_MISMATCH,
            "contract_hash",
            f"the job's contract for {job.dataset!r} has hash {job.contract_hash[:12]}…; the site accepted "
            f"{grant.contract_sha256[:12]}… (a changed contract needs the site's review first)",
        )
    if job.rounds > policy.max_rounds:
        refuse(
            RefusalCode.TOO_MANY_ROUNDS,
            "rounds",
            f"the job runs {job.rounds} rounds; this site allows at most {policy.max_rounds}",
        )
    if job.strategy not in policy.allowed_strategies:
        refuse(
            RefusalCode.STRATEGY_NOT_ALLOWED,
            "strategy",
            f"strategy {job.strategy!r} is not allowed here "
            f"(allowed: {', '.join(sorted(policy.allowed_strategies))})",
        )
    if job.min_partners < policy.min_partners:
        refuse(
            RefusalCode.TOO_FEW_PARTNERS,
            "min_partners",
            f"the job would aggregate with as few as {job.min_partners} partners; "
            f"this site requires at least {policy.min_partners}",
        )
    if policy.require_secure_aggregation and not job.secure_aggregation:
        refuse(
            RefusalCode.SECURE_AGGREGATION_REQUIRED,
            "secure_aggregation",
            "this site sends updates only under secure aggregation, and the job has it off",
        )
    scope = policy.budget_for(job.dataset) if grant is not None else None
    if scope is not None and job.mode == "train" and not job.differential_privacy:
        where = "its" if scope.ledger != SITE_LEDGER else "the site's"
        refuse(
            RefusalCode.PRIVACY_REQUIRED,
            "hparams.dp",
            f"this site trains {job.dataset!r} only with differential privacy ({where} budget: "
            f"ε ≤ {scope.budget.epsilon:g}, δ = {scope.budget.delta:g}); the job declares no DP-SGD settings",
        )
    return out


def approval_deadline(policy: SitePolicy, received_at: datetime) -> datetime | None:
    """When an unapproved job received at ``received_at`` is refused (``None``: no approval needed)."""
    if not policy.approval.required:
        return None
    assert policy.approval.deadline is not None  # Approval guarantees it
    return received_at + policy.approval.deadline


# ----------------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------------


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"field {loc}: {err['msg']}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


def parse_policy(document: Any, *, where: str = "policy") -> SitePolicy:
    """Validate an already parsed policy document; :class:`PolicyError` naming ``where`` and the field."""
    if not isinstance(document, dict):
        raise PolicyError(f"{where}: the policy must be a mapping of fields")
    if document.get("schema_version") != 1:
        raise PolicyError(
            f"{where}: field schema_version is {document.get('schema_version')!r}; "
            "this Lepton reads version 1"
        )
    try:
        return SitePolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(f"{where}: {_errors(exc)}") from None


def load_policy(path: Path, *, check_permissions: bool = True) -> SitePolicy:
    """Read the policy file (``.yaml``/``.yml`` or ``.toml``).

    The policy is the site's trust anchor: with ``check_permissions`` a file that group or others may write
    is refused (``chmod 600`` or ``644`` it).
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PolicyError(f"{path}: the policy is not a regular file")
    if check_permissions and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyError(
            f"{path}: group or others may modify the policy (mode {st.st_mode & 0o777:o}): chmod 600"
        )
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            document = yaml.safe_load(text)
        elif suffix == ".toml":
            document = tomllib.loads(text)
        else:
            raise PolicyError(f"{path}: a policy file ends with .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    return parse_policy(document, where=str(path))


def _plain(policy: SitePolicy) -> dict[str, Any]:
    doc = policy.model_dump(mode="json", exclude_none=True)
    doc["allowed_strategies"] = sorted(policy.allowed_strategies)
    if policy.approval.deadline is not None:
        doc["approval"]["deadline"] = _iso_duration(policy.approval.deadline)
    return doc


def _iso_duration(value: timedelta) -> str:
    if value.microseconds:
        return f"PT{value.total_seconds()!r}S"
    seconds = int(value.total_seconds())
    return f"PT{seconds // 3600}H" if seconds % 3600 == 0 else f"PT{seconds}S"


def render_yaml(policy: SitePolicy) -> str:
    """The policy as YAML that :func:`load_policy` reads back to an equal policy (enrollment writes it)."""
    return yaml.safe_dump(_plain(policy), sort_keys=False, allow_unicode=True)


def write_policy(policy: SitePolicy, path: Path) -> None:
    """Write ``render_yaml(policy)`` to ``path``, mode 0600, replacing it atomically."""
    write_private(path, render_yaml(policy).encode("utf-8"))


def refusal_codes(refusals: Sequence[Refusal]) -> list[str]:
    """The codes of ``refusals`` (for logs and assertions)."""
    return [r.code.value for r in refusals]
