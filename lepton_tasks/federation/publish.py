"""Publish a finished run: ``metrics.json``, ``report.html`` (plots), and the versioned Keras model."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.federation.plan import collect_metrics, last_round, run_prefix


class PublishError(RuntimeError):
    """The run is incomplete: nothing is published."""


def next_version(storage: Storage, settings: Settings, dataset: str, run_id: str) -> int:
    """Model versions count up per dataset; re-publishing the same run keeps its version (idempotent)."""
    prefix = f"_registry/{dataset}/"
    versions = {}
    for obj in storage.list(settings.models_bucket, prefix):
        entry = storage.get_json(settings.models_bucket, obj.key)
        versions[entry["run_id"]] = int(entry["version"])
    return versions.get(run_id, max(versions.values(), default=0) + 1)


def publish_run(
    settings: Settings, storage: Storage, *, run_id: str, runtime: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    from lepton_tasks.core import weights as wio
    from lepton_tasks.federation.report import render_report

    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    plan = storage.get_json(mb, prefix + "plan.json")
    metrics = collect_metrics(settings, storage, run_id=run_id, runtime=runtime)
    if len(metrics["rounds"]) < int(plan["hparams"]["rounds"]):
        raise PublishError(
            f"run {run_id}: only {len(metrics['rounds'])} of {plan['hparams']['rounds']} rounds "
            f"completed; nothing published"
        )
    if not metrics["final"]["per_partner"]:
        raise PublishError(f"run {run_id}: no partner evaluation arrived; nothing published")
    if extra:
        metrics.update(extra)
    version = next_version(storage, settings, plan["dataset"], run_id)
    metrics["lineage"]["model_version"] = version
    k = last_round(storage, settings, run_id)
    weights_blob = storage.get_bytes(mb, f"{prefix}round-{k}/global.npz")
    metrics["lineage"]["global_weights_sha256"] = wio.sha256(weights_blob)

    local_dir = settings.data_dir / "reports" / prefix.rstrip("/")
    local_dir.mkdir(parents=True, exist_ok=True)
    report = render_report(metrics, local_dir)
    (local_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    storage.put_json(mb, prefix + "metrics.json", metrics)
    storage.put_file(mb, prefix + "report.html", report, content_type="text/html")

    with tempfile.TemporaryDirectory() as tmp:
        model_path = _save_keras(plan["dataset"], weights_blob, len(plan["feature_names"]), Path(tmp))
        storage.put_file(mb, prefix + "model/global.keras", model_path)
    version_doc = {
        "version": version,
        "dataset": plan["dataset"],
        "run_id": run_id,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "lineage": metrics["lineage"],
    }
    storage.put_json(mb, prefix + "model/VERSION.json", version_doc)
    storage.put_json(
        mb, f"_registry/{plan['dataset']}/{version:06d}.json", {"run_id": run_id, "version": version}
    )
    return {
        "version": version,
        "report_path": str(report),
        "report_url": f"s3://{mb}/{prefix}report.html",
        "model_url": f"s3://{mb}/{prefix}model/global.keras",
        "metrics": metrics,
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
