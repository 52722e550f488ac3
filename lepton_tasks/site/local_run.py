"""A site's local run: the one-partner plan its trainer works from, and the trainer's job built from it.

The site never trains a second way: for each coordinator run it lays out, in its OWN ``models`` bucket, what
the trainer (``python -m lepton_tasks.trainer``) reads — a one-partner :class:`Plan`, the merged statistics
and the job's global weights (:class:`lepton_tasks.site.training.SiteTrainer` writes them) — and
:func:`trainer_job` turns that layout into the trainer's :class:`TrainerJob`:

    models/<local run>/plan.json                 the site's partner, its committed drops, hyper-parameters
    models/<local run>/stats.json                the merged statistics the coordinator's job carries
    models/<local run>/round-<k>/global.npz      the global weights of exchange round k (as the site got them)
    models/<local run>/round-<k>/<partner>.update   the trainer's update (``train``)
    models/<local run>/local/<partner>.npz       a local-only model (``local``: benchmarks' reference only)
    models/<local run>/eval/<partner>.json       held-out metrics + score histograms (``evaluate``)

Everything is keyed by the local run id and round, so a retried task overwrites the same objects. Which of a
partner's drops count is :func:`latest_per_source` (a file uploaded again under the same inbox key replaces
its earlier content).
"""

from __future__ import annotations

from datetime import timedelta

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.messages import (
    JobDrop,
    JobObject,
    Manifest,
    Plan,
    TrainerHParams,
    TrainerJob,
    TrainerMode,
    load,
)

__all__ = ["last_round", "latest_per_source", "plan_key", "read_plan", "run_prefix", "trainer_job"]


def run_prefix(run_id: str) -> str:
    """The folder of local run ``run_id`` in the site's ``models`` bucket (characters outside a safe set
    become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_.:+" else "_" for c in run_id)
    return f"{safe}/"


def plan_key(run_id: str) -> str:
    return run_prefix(run_id) + "plan.json"


def read_plan(storage: Storage, settings: Settings, run_id: str) -> Plan:
    key = plan_key(run_id)
    return load(
        Plan, storage.get_bytes(settings.models_bucket, key), where=f"s3://{settings.models_bucket}/{key}"
    )


def latest_per_source(manifests: dict[str, Manifest]) -> tuple[list[str], dict[str, str]]:
    """Of one partner's committed drops, those that count: the latest per inbox file.

    A partner that uploads a file again under the same inbox key (a corrected export, next month's refresh
    of the same file) replaces its earlier content, as an S3 overwrite does; different keys add up. Returns
    ``(current manifest keys, {superseded manifest key: manifest key that replaced it})``. "Latest" is the
    manifest's ``staged_at`` (ties: the manifest key, so the choice is deterministic).
    """
    groups: dict[str, list[str]] = {}
    for key, m in manifests.items():
        groups.setdefault(m.source.key, []).append(key)
    current: list[str] = []
    old: dict[str, str] = {}
    for keys in groups.values():
        keys.sort(key=lambda k: (manifests[k].staged_at, k))
        current.append(keys[-1])
        old.update({k: keys[-1] for k in keys[:-1]})
    return sorted(current), old


def last_round(storage: Storage, settings: Settings, run_id: str) -> int:
    """The highest ``k`` with a ``round-<k>/global.npz`` in local run ``run_id``; ``ValueError`` when none."""
    prefix = run_prefix(run_id)
    rounds = [
        int(o.key.split("/")[-2].removeprefix("round-"))
        for o in storage.list(settings.models_bucket, prefix)
        if o.key.endswith("/global.npz") and "/round-" in o.key
    ]
    if not rounds:
        raise ValueError(f"run {run_id} has no global weights yet")
    return max(rounds)


def trainer_job(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    *,
    run_id: str,
    partner: str,
    mode: TrainerMode,
    round_number: int,
    ttl: timedelta = timedelta(hours=1),
) -> TrainerJob:
    """The job the site's trainer receives (SECRET: presigned URLs and a scoped token; env only, never XCom).

    It holds only ``partner``'s objects of local run ``run_id``, a token that can decrypt/verify with only
    that partner's key, and a presigned PUT for its own output: no S3 credentials, no root token. The
    dataset's contract travels with it (hash-checked by the trainer), so the image never bakes one in.
    ``train`` round ``k`` starts from ``round-<k-1>/global.npz`` (none in round 1); ``evaluate`` scores the
    latest global weights (and every local-only model present). Preconditions (``ValueError``): the plan
    names ``partner``, the contract on this machine is the plan's, and ``evaluate`` has the plan's rounds.
    """
    prefix = run_prefix(run_id)
    plan = read_plan(storage, settings, run_id)
    if partner not in plan.drops:
        raise ValueError(f"partner {partner!r} is not part of run {run_id}")
    contract = load_contract(plan.dataset)
    if contract.sha256 != plan.contract_sha256:
        raise ValueError(
            f"run {run_id} was planned under {plan.contract} ({plan.contract_sha256[:12]}…) but the contract "
            f"on this machine is now {contract.version_tag} ({contract.sha256[:12]}…): start a new run"
        )
    hp = plan.hparams
    bucket = settings.staging_bucket
    drops = [
        JobDrop(
            manifest_key=d.manifest,
            manifest_url=storage.presigned_get(bucket, d.manifest, ttl),
            train=JobObject(
                key=d.objects["train"].key,
                sha256=d.objects["train"].sha256,
                url=storage.presigned_get(bucket, d.objects["train"].key, ttl),
            ),
            holdout=JobObject(
                key=d.objects["holdout"].key,
                sha256=d.objects["holdout"].sha256,
                url=storage.presigned_get(bucket, d.objects["holdout"].key, ttl),
            ),
        )
        for d in plan.drops[partner]
    ]
    mb = settings.models_bucket
    local_models: dict[str, str] = {}
    prev: str | None
    if mode == "train":
        out_key = f"{prefix}round-{round_number}/{partner}.update"
        prev = f"{prefix}round-{round_number - 1}/global.npz" if round_number > 1 else None
    elif mode == "local":
        out_key, prev = f"{prefix}local/{partner}.npz", None
    elif mode == "evaluate":
        done = last_round(storage, settings, run_id)
        if done < hp.rounds:
            raise ValueError(
                f"run {run_id}: round {done + 1} of {hp.rounds} did not complete; nothing to evaluate"
            )
        out_key = f"{prefix}eval/{partner}.json"
        prev = f"{prefix}round-{done}/global.npz"
        # every partner's local-only model present (weights are shared in a federation; data never is)
        local_models = {
            p: storage.presigned_get(mb, f"{prefix}local/{p}.npz", ttl)
            for p in plan.partners
            if storage.exists(mb, f"{prefix}local/{p}.npz")
        }
    else:
        raise ValueError(f"unknown trainer mode {mode!r}")
    return TrainerJob(
        mode=mode,
        partner=partner,
        dataset=plan.dataset,
        run_id=run_id,
        round=round_number,
        contract=contract.document(),
        contract_sha256=contract.sha256,
        vault_addr=settings.vault_addr,
        transit_mount=settings.transit_mount,
        key_name=settings.transit_key(partner),
        staging_bucket=bucket,
        vault_token=vault.trainer_token(partner, ttl=f"{int(ttl.total_seconds())}s"),
        drops=drops,
        stats_url=storage.presigned_get(mb, prefix + "stats.json", ttl),
        global_weights_url=storage.presigned_get(mb, prev, ttl) if prev else None,
        output_url=storage.presigned_put(mb, out_key, ttl),
        output_key=out_key,
        local_models=local_models,
        hparams=TrainerHParams(
            local_epochs=hp.local_epochs,
            local_only_epochs=hp.local_epochs * hp.rounds,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            seed=hp.seed,
            fedprox_mu=hp.fedprox_mu if hp.strategy == "fedprox" else 0.0,
            dp=hp.dp_training(),
        ),
    )
