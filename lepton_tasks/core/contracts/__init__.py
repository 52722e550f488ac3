"""Dataset contracts: one YAML file per dataset, loaded into a typed :class:`Contract`.

A contract is the single source of truth for a dataset: its columns (dtype, role, nullability, ranges,
allowed values, uniqueness), the cleaning policy per column, the label, the deterministic split key,
row-count bounds, and the model the federation trains on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: where the contracts live: ``$LEPTON_CONTRACTS_DIR`` when set (a site's own folder), else the bundled ones
CONTRACTS_DIR = Path(os.environ.get("LEPTON_CONTRACTS_DIR") or Path(__file__).parent)

DType = Literal["int", "float", "string", "category", "timestamp", "bool"]
Role = Literal["feature", "label", "id", "timestamp", "ignore"]
#: drop the row | fill with the *federated* training mean (numeric) or mode (category) at normalization time
#: | fill with ``fill_value`` | fill with the federated mean and add a ``<col>__missing`` indicator column
MissingPolicy = Literal["drop", "mean", "mode", "constant", "indicator"]


class ColumnSpec(BaseModel):
    """One column of a dataset contract."""

    model_config = ConfigDict(extra="forbid")

    dtype: DType
    role: Role = "feature"
    nullable: bool = False
    unique: bool = False
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = None
    #: what cleaning does with a missing value (only meaningful when ``nullable``)
    missing: MissingPolicy = "drop"
    fill_value: float | str | None = None
    #: outlier clipping bounds applied by cleaning (values outside are clipped, and counted)
    clip: tuple[float, float] | None = None
    #: a failed expectation on a critical column quarantines the drop; otherwise it is a warning
    critical: bool = True
    #: a drop without a required column is rejected; a missing optional column is read as all-null
    required: bool = True
    description: str = ""

    def is_numeric(self) -> bool:
        """Numeric for statistics/normalization: int, float, bool (0/1) and timestamp (epoch seconds)."""
        return self.dtype in ("int", "float", "bool", "timestamp")


class RowBounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = 1
    max: int = 100_000_000


class ModelSpec(BaseModel):
    """The model trained by the federation on this dataset."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp", "sequence"]
    hidden: list[int] = Field(default_factory=lambda: [32, 16])
    dropout: float = 0.0
    l2: float = 0.0
    # sequence models (hashed id embeddings + GRU over each user's ordered history)
    user_column: str | None = None
    item_column: str | None = None
    timestamp_column: str | None = None
    sequence_length: int = 10
    hash_buckets: int = 1000
    embedding_dim: int = 16
    gru_units: int = 32


class TrainingDefaults(BaseModel):
    """The coordinator trigger form's defaults for a federated run on this dataset (a run overrides each)."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(5, ge=1, le=50)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.005, gt=0, le=1)


class Contract(BaseModel):
    """A dataset contract (see ``lepton_tasks/core/contracts/*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    description: str = ""
    task: Literal["binary_classification"] = "binary_classification"
    label: str
    positive_label: str
    row_key: list[str]
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    rows: RowBounds = Field(default_factory=RowBounds)
    allow_extra_columns: bool = False
    #: CSV cells that mean "missing" (matched exactly, before type coercion)
    null_values: list[str] = Field(default_factory=lambda: ["", "NA", "N/A", "NULL", "null", "NaN", "nan"])
    columns: dict[str, ColumnSpec]
    model: ModelSpec
    training: TrainingDefaults = Field(default_factory=lambda: TrainingDefaults())

    @model_validator(mode="after")
    def _check(self) -> Contract:
        if self.label not in self.columns:
            raise ValueError(f"contract {self.name}: label {self.label!r} is not a declared column")
        if self.columns[self.label].role != "label":
            raise ValueError(f"contract {self.name}: column {self.label!r} must have role 'label'")
        for key in self.row_key:
            if key not in self.columns:
                raise ValueError(f"contract {self.name}: row_key column {key!r} is not declared")
        return self

    @property
    def version_tag(self) -> str:
        return f"{self.name}@v{self.version}"

    def feature_columns(self) -> list[str]:
        return [c for c, s in self.columns.items() if s.role == "feature"]

    def columns_with_role(self, role: Role) -> list[str]:
        """Declared columns with ``role``, in contract order."""
        return [c for c, s in self.columns.items() if s.role == role]

    def required_columns(self) -> list[str]:
        return [c for c, s in self.columns.items() if s.required]

    def document(self) -> dict[str, Any]:
        """The contract as a JSON-ready dict (what travels with a trainer job)."""
        return self.model_dump(mode="json")

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`document`: names this exact contract across machines."""
        return contract_sha256(self.document())


#: parts of a contract that do not change what staged data means (prose and the trigger form's defaults):
#: editing them keeps the hash, so staged drops stay usable
_NOT_HASHED = ("description", "training")


def contract_sha256(document: dict[str, Any]) -> str:
    """SHA-256 (hex) of what a contract says about data and model, as canonical JSON (sorted keys, no spaces).

    Descriptions (of the contract and of each column) and the ``training`` defaults are left out: a new
    default learning rate or a reworded description does not strand staged drops; anything else does.
    """
    meaning = {k: v for k, v in document.items() if k not in _NOT_HASHED}
    meaning["columns"] = {
        name: {k: v for k, v in spec.items() if k != "description"}
        for name, spec in (document.get("columns") or {}).items()
    }
    canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def contract_from_document(document: dict[str, Any], expected_sha256: str) -> Contract:
    """The contract a job carries, after checking it is the one the job names (raises ``ValueError``)."""
    actual = contract_sha256(document)
    if actual != expected_sha256:
        raise ValueError(f"contract hash {actual[:12]}… does not match the job's {expected_sha256[:12]}…")
    return Contract.model_validate(document)


def available() -> list[str]:
    """Names of the datasets that have a contract."""
    return sorted(p.stem for p in CONTRACTS_DIR.glob("*.yaml"))


@cache
def load_contract(name: str) -> Contract:
    """Load the contract of dataset ``name``; raise ``KeyError`` naming the known datasets if unknown."""
    path = CONTRACTS_DIR / f"{name}.yaml"
    if not name.replace("_", "").replace("-", "").isalnum() or not path.is_file():
        raise KeyError(f"unknown dataset {name!r}: known datasets are {', '.join(available()) or '(none)'}")
    contract = Contract.model_validate(yaml.safe_load(path.read_text()))
    if contract.name != name:
        raise ValueError(f"{path}: the contract is named {contract.name!r}; rename the file or the contract")
    return contract
