"""A site's one-partner local run laid out directly in a test stack (what ``site.training.SiteTrainer``
writes before it runs the trainer): the plan over the partner's current drops and their merged statistics.
For tests that exercise the trainer's job (``site.local_run.trainer_job``) without a coordinator."""

from __future__ import annotations

from typing import Any

from lepton_tasks.adapters.manifest import read_manifest
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.features import GlobalStats, feature_names, merge
from lepton_tasks.core.messages import HParams, Plan, PlanDrop, dump
from lepton_tasks.ingest.stage import staged_manifests
from lepton_tasks.site.local_run import latest_per_source, plan_key, run_prefix


def write_local_plan(
    settings: Any, storage: Any, vault: Any, *, run_id: str, partner: str, dataset: str, hparams: HParams
) -> Plan:
    """Write ``plan.json`` and ``stats.json`` of local run ``run_id`` over ``partner``'s current drops (each
    manifest verified with the partner's key); returns the plan."""
    contract = load_contract(dataset)
    keys = staged_manifests(storage, settings, dataset, [partner]).get(partner, [])
    manifests = {k: read_manifest(storage, settings, vault, partner, k, dataset) for k in keys}
    current, _ = latest_per_source(manifests)
    if not current:
        raise ValueError(f"{partner} has no staged {dataset} drop")
    merged = merge([manifests[k].statistics_train for k in current])
    storage.put_json(
        settings.models_bucket, run_prefix(run_id) + "stats.json", merged.model_dump(mode="json")
    )
    plan = Plan(
        run_id=run_id,
        dataset=dataset,
        contract=contract.version_tag,
        contract_sha256=contract.sha256,
        partners=[partner],
        drops={partner: [PlanDrop.of(k, manifests[k]) for k in current]},
        hparams=hparams,
        feature_names=feature_names(contract, GlobalStats.from_stats(merged, contract)),
    )
    storage.put_json(settings.models_bucket, plan_key(run_id), dump(plan))
    return plan
