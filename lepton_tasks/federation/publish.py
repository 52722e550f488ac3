"""Publish a finished run: ``metrics.json``, ``report.html`` (plots), and the versioned Keras model."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.core.messages import (
    MessageError,
    ModelVersion,
    RegistryEntry,
    RunMetrics,
    dump,
    load,
)
from lepton_tasks.federation.plan import collect_metrics, published_round, read_plan, run_prefix


class PublishError(RuntimeError):
    """The run is incomplete: nothing is published."""


def next_version(storage: Storage, settings: Settings, dataset: str, run_id: str) -> int:
    """Model versions count up per dataset; re-publishing the same run keeps its version (idempotent)."""
    prefix = f"_registry/{dataset}/"
    versions = {}
    for obj in storage.list(settings.models_bucket, prefix):
        where = f"s3://{settings.models_bucket}/{obj.key}"
        try:
            entry = load(RegistryEntry, storage.get_bytes(settings.models_bucket, obj.key), where=where)
        except MessageError as exc:
            raise PublishError(f"the model registry is damaged: {exc}") from None
        versions[entry.run_id] = entry.version
    return versions.get(run_id, max(versions.values(), default=0) + 1)


def publish_run(
    settings: Settings,
    storage: Storage,
    *,
    run_id: str,
    runtime: str,
    centralized: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish the run's best round: ``metrics.json``, ``report.html``, ``model/global.keras`` + VERSION.

    ``centralized`` is a pooled reference (the demo's, which pools data on one machine); production never has
    one. Returns where everything went and the metrics (as a JSON-ready dict).
    """
    from lepton_tasks.core import weights as wio
    from lepton_tasks.federation.report import render_report

    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    plan = read_plan(storage, settings, run_id)
    metrics = collect_metrics(settings, storage, run_id=run_id, runtime=runtime)
    if len(metrics.rounds) < plan.hparams.rounds:
        raise PublishError(
            f"run {run_id}: only {len(metrics.rounds)} of {plan.hparams.rounds} rounds completed; "
            "nothing published"
        )
    if not metrics.final.per_partner:
        raise PublishError(f"run {run_id}: no partner evaluation arrived; nothing published")
    version = next_version(storage, settings, plan.dataset, run_id)
    k = published_round(storage, settings, run_id)
    weights_blob = storage.get_bytes(mb, f"{prefix}round-{k}/global.npz")
    lineage = metrics.lineage.model_copy(
        update={
            "model_version": version,
            "global_weights_sha256": wio.sha256(weights_blob),
            "published_round": k,
        }
    )
    metrics = metrics.model_copy(update={"lineage": lineage, "centralized": centralized})
    metrics = RunMetrics.model_validate(dump(metrics))  # re-validate after the updates
    doc = dump(metrics)

    local_dir = settings.data_dir / "reports" / prefix.rstrip("/")
    local_dir.mkdir(parents=True, exist_ok=True)
    report = render_report(doc, local_dir)
    (local_dir / "metrics.json").write_text(json.dumps(doc, indent=2))
    storage.put_json(mb, prefix + "metrics.json", doc)
    storage.put_file(mb, prefix + "report.html", report, content_type="text/html")

    with tempfile.TemporaryDirectory() as tmp:
        model_path = _save_keras(plan.dataset, weights_blob, len(plan.feature_names), Path(tmp))
        storage.put_file(mb, prefix + "model/global.keras", model_path)
    version_doc = ModelVersion(
        version=version,
        dataset=plan.dataset,
        run_id=run_id,
        published_at=datetime.now(UTC),
        lineage=lineage,
    )
    storage.put_json(mb, prefix + "model/VERSION.json", dump(version_doc))
    storage.put_json(
        mb,
        f"_registry/{plan.dataset}/{version:06d}.json",
        dump(RegistryEntry(run_id=run_id, version=version)),
    )
    return {
        "version": version,
        "published_round": k,
        "report_path": str(report),
        "report_url": f"s3://{mb}/{prefix}report.html",
        "model_url": f"s3://{mb}/{prefix}model/global.keras",
        "metrics": doc,
    }


def _save_keras(dataset: str, weights_blob: bytes, n_features: int, out: Path) -> Path:
    """Rebuild the contract's model with the final global weights and save it as ``global.keras``."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.trainer.model import build_model

    arrays, _ = wio.loads(weights_blob)
    contract = load_contract(dataset)
    model = build_model(contract.model, n_features, seed=0)
    model.set_weights(arrays)
    path = out / "global.keras"
    model.save(path)
    return path
