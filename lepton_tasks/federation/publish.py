"""Publishing a finished run: its metrics, its report and its last global weights as a versioned model.

What ``lepton_federated``'s ``publish`` task calls (:func:`publish_run`), from the run's decided rounds
(:mod:`lepton_tasks.federation.run_records`), into the coordinator's own object storage::

    <bucket>/federated/<run>/metrics.json, report.html   RunMetrics (:func:`run_metrics`), the report
    <bucket>/federated/<run>/model/global.npz, model/global.keras, model/VERSION.json
                                                       the published model and its ModelVersion
    <bucket>/_registry/<dataset>/<version:06d>.json      RegistryEntry: one version sequence per dataset

No Airflow import here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lepton_tasks.core import weights as wio
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.messages import (
    FinalMetrics,
    Lineage,
    ModelVersion,
    RoundAnswer,
    RoundMetrics,
    RunExclusion,
    RunMetrics,
    RunPrivacy,
    dump,
    load,
)
from lepton_tasks.federation.coordinator import CoordinatorError
from lepton_tasks.federation.run_records import (
    STATISTICS_ROUND,
    RoundRecord,
    RunSpec,
    _global_weights,
    _merged_statistics,
    read_record,
    run_prefix,
)

if TYPE_CHECKING:
    from lepton_tasks.adapters.storage import Storage

__all__ = ["publish_run", "run_metrics"]


def _round_metrics(record: RoundRecord) -> RoundMetrics:
    return RoundMetrics(
        round=record.round,
        partners=record.metrics,
        excluded=record.excluded,
        samples_total=record.samples_total,
    )


#: the smaller class's merged held-out count must be this many noise sds to make the merged metrics worth
#: reading (below it the overall AUC of a DP run can be far off or undefined: docs/benchmarks.md)
NOISE_DOMINATED_SDS: Final = 4.0


def evaluation_noise_warning(
    per_site: Mapping[str, Mapping[str, Any]], overall: Mapping[str, Any]
) -> str | None:
    """The warning for a DP run whose merged held-out metrics are dominated by the evaluation's noise, or
    ``None``. Each site's noisy histogram (its block's ``dp``: noise multiplier σ_s on ``bins_per_class``
    bins) adds noise of variance σ_s² x bins to each merged class total; when the smaller class's noisy
    total is under :data:`NOISE_DOMINATED_SDS` of that noise's sd (e.g. banks: 67 positives against sd 57
    at the default evaluation ε), the consortium should not read the overall AUC as the model's quality."""
    variance, noisy_sites = 0.0, 0
    for block in per_site.values():
        dp = block.get("dp")
        if not isinstance(dp, Mapping):
            continue
        sigma, bins = dp.get("noise_multiplier"), dp.get("bins_per_class")
        if isinstance(sigma, (int, float)) and isinstance(bins, int):
            variance += float(sigma) ** 2 * bins
            noisy_sites += 1
    if noisy_sites == 0:
        return None
    sd = math.sqrt(variance)
    n, positives = overall.get("n"), overall.get("positives")
    smaller = min(positives, n - positives) if isinstance(n, int) and isinstance(positives, int) else None
    if smaller is not None and smaller >= NOISE_DOMINATED_SDS * sd:
        return None
    count = "undefined" if smaller is None else str(smaller)
    return (
        f"the held-out metrics are dominated by the evaluation's noise: the smaller class's merged noisy "
        f"count is {count}, against noise of sd {sd:.0f} ({noisy_sites} noisy histograms); the overall AUC "
        "can be far off or undefined: raise dp_evaluation_epsilon or evaluate on more held-out rows"
    )


def run_metrics(storage: Storage, bucket: str, spec: RunSpec) -> RunMetrics:
    """The run's metrics (``metrics.json``, the report's input): per round the sites that took part and
    their metrics, every exclusion with its kind and reason, the final held-out metrics per site and
    overall, and what protected the run (``core.privacy.run_privacy`` over the DP-SGD charges the sites
    reported)."""
    from lepton_tasks.core.privacy import run_privacy

    records = []
    for k in range(STATISTICS_ROUND, spec.evaluation_round + 1):
        record = read_record(storage, bucket, spec.run_id, k)
        if record is None or not record.quorum_met:
            raise CoordinatorError(f"run {spec.run_id}: round {k} was not decided with its quorum")
        records.append(record)
    train = [r for r in records if r.mode == "train"]
    final = records[-1]
    excluded = {f"{e.site} (round {r.round}, {r.mode})": e.describe() for r in records for e in r.exclusions}
    exclusions = [
        RunExclusion(site=e.site, round=e.round, mode=r.mode, kind=e.kind, code=e.code, reason=e.reason)
        for r in records
        for e in r.exclusions
    ]
    warnings = [w for r in records for w in r.warnings]
    privacy = run_privacy(
        {
            s: [RoundAnswer(mode=r.mode, n_samples=1, **r.charges[s]) for r in records if s in r.charges]
            for s in spec.sites
        },
        dp=spec.hparams.dp,
        secure_aggregation=spec.secure_aggregation,
        dropouts_recovered=sum(
            len(r.secure_aggregation.get("recovered", [])) for r in records if r.secure_aggregation
        ),
    )
    if excluded:
        warnings.append(f"{len(excluded)} exclusion(s): see the exclusions table")
    if (noisy := evaluation_noise_warning(final.metrics, final.overall or {})) is not None:
        warnings.append(noisy)
    last = train[-1]
    if last.global_weights_sha256 is None:  # a train round decided with its quorum wrote its weights
        raise CoordinatorError(f"run {spec.run_id}: round {last.round} recorded no global weights")
    return RunMetrics(
        run_id=spec.run_id,
        airflow_run_id=spec.airflow_run_id,
        consortium=spec.consortium,
        dataset=spec.dataset,
        contract_version=spec.contract,
        contract_sha256=spec.contract_sha256,
        strategy=spec.strategy,
        min_partners=spec.min_partners,
        created_at=spec.created_at,
        partners=spec.sites,
        statistics_round=_round_metrics(records[0]),
        rounds=[_round_metrics(r) for r in train],
        final=FinalMetrics(per_partner=final.metrics, overall=final.overall or {}),
        excluded=excluded,
        exclusions=exclusions,
        lineage=Lineage(
            run_id=spec.run_id,
            rounds=spec.rounds,
            strategy=spec.strategy,
            contract=spec.contract,
            sites=sorted({s for r in train for s in r.accepted}),
            published_round=last.round,
            global_weights_sha256=last.global_weights_sha256,
        ),
        privacy=_with_evaluation_noise(privacy),
        warnings=warnings,
    )


def _with_evaluation_noise(privacy: RunPrivacy) -> RunPrivacy:
    """``privacy`` with the evaluation release's sigma, calibrated from the run's evaluation epsilon as every
    site calibrates it (``core.privacy.evaluation_sigma``), for the report; unchanged without DP."""
    from lepton_tasks.core.privacy import evaluation_sigma

    if privacy.dp is None:
        return privacy
    return privacy.model_copy(update={"evaluation_noise_multiplier": evaluation_sigma(privacy.dp)})


def publish_run(
    storage: Storage,
    bucket: str,
    spec: RunSpec,
    *,
    report_dir: Path,
    save_keras: bool = True,
) -> dict[str, Any]:
    """Publish a finished run: ``metrics.json``, ``report.html`` (every excluded site and why), the last
    round's global weights as a versioned model (``model/global.npz``, ``model/global.keras`` when the
    contract's model can be rebuilt, ``model/VERSION.json`` and a ``_registry/<dataset>/`` entry: one
    version sequence per dataset across runs). Idempotent: re-publishing keeps the run's version."""
    from lepton_tasks.core.messages import RegistryEntry
    from lepton_tasks.federation.report import render_report

    metrics = run_metrics(storage, bucket, spec)
    prefix = run_prefix(spec.run_id)
    version = _next_version(storage, bucket, spec.dataset, spec.run_id)
    metrics = metrics.model_copy(update={"model_version": version})
    report = render_report(metrics, report_dir)
    (report_dir / "metrics.json").write_text(json.dumps(dump(metrics), indent=2), encoding="utf-8")
    storage.put_json(bucket, prefix + "metrics.json", dump(metrics))
    storage.put_file(bucket, prefix + "report.html", report, content_type="text/html")

    last = metrics.lineage.published_round
    blob, _, _ = _global_weights(storage, bucket, spec.run_id, last)
    storage.put_bytes(bucket, prefix + "model/global.npz", blob)
    model_url = f"s3://{bucket}/{prefix}model/global.npz"
    if save_keras:
        import tempfile

        _, names = _merged_statistics(storage, bucket, spec.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = _save_keras(spec.dataset, blob, len(names), Path(tmp))
            storage.put_file(bucket, prefix + "model/global.keras", path)
        model_url = f"s3://{bucket}/{prefix}model/global.keras"
    model_version = ModelVersion(
        version=version,
        dataset=spec.dataset,
        run_id=spec.run_id,
        published_at=datetime.now(UTC),
        lineage=metrics.lineage,
    )
    storage.put_json(bucket, prefix + "model/VERSION.json", dump(model_version))
    storage.put_json(
        bucket,
        f"_registry/{spec.dataset}/{version:06d}.json",
        dump(RegistryEntry(run_id=spec.run_id, version=version)),
    )
    return {
        "version": version,
        "published_round": last,
        "report_path": str(report),
        "report_url": f"s3://{bucket}/{prefix}report.html",
        "model_url": model_url,
        "excluded": metrics.excluded,
    }


def _next_version(storage: Storage, bucket: str, dataset: str, run_id: str) -> int:
    from lepton_tasks.core.messages import RegistryEntry

    versions: dict[str, int] = {}
    for obj in storage.list(bucket, f"_registry/{dataset}/"):
        entry = load(RegistryEntry, storage.get_bytes(bucket, obj.key), where=f"s3://{bucket}/{obj.key}")
        versions[entry.run_id] = entry.version
    return versions.get(run_id, max(versions.values(), default=0) + 1)


def _save_keras(dataset: str, blob: bytes, n_features: int, out: Path) -> Path:
    from lepton_tasks.trainer.model import build_model

    arrays, _ = wio.loads(blob)
    model = build_model(load_contract(dataset).model, n_features, seed=0)
    model.set_weights(arrays)
    path = out / "global.keras"
    model.save(path)
    return path
