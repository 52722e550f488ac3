"""The Assets Lepton's DAGs exchange (light module: imported at DAG parse time)."""

from __future__ import annotations

from airflow.sdk import Asset

from lepton_tasks.core.contracts import available

#: every dataset with a contract in the contracts folder: a new dataset is one YAML file
DATASETS: tuple[str, ...] = tuple(available())


def staged_asset(dataset: str) -> Asset:
    """New committed staged data for ``dataset`` (emitted by ingest, consumed by training)."""
    return Asset(name=f"lepton-staged-{dataset}", uri=f"s3://staging/{dataset}/")


def model_asset(dataset: str) -> Asset:
    return Asset(name=f"lepton-model-{dataset}", uri=f"s3://models/{dataset}/")
