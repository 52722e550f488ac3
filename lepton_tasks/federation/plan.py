"""Server side of a federated run: plan, trainer jobs, aggregation with a quorum, final metrics.

Everything a run writes lives under ``models/<run_id>/`` and is keyed by run id and round, so re-running a
round (or clearing one partner's task) overwrites the same objects: idempotent.

    models/<run_id>/plan.json                 partners, committed drops (hash, contract), hyper-parameters
    models/<run_id>/stats.json                merged federated statistics (train splits only)
    models/<run_id>/round-<k>/<partner>.update   a partner's weights (npz, no pickle) + n + local metrics
    models/<run_id>/round-<k>/global.npz      the aggregate of round k
    models/<run_id>/round-<k>/summary.json    who contributed, who was excluded, training metrics
    models/<run_id>/eval/<partner>.json       held-out metrics + score histograms (global and local-only)
    models/<run_id>/metrics.json, report.html, model/global.keras, model/VERSION.json
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from lepton_tasks.adapters.manifest import ManifestError, read_manifest
from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.messages import (
    EvalResult,
    FinalMetrics,
    GlobalWeightsMeta,
    HParams,
    JobDrop,
    JobObject,
    Lineage,
    LocalOnlyMetrics,
    Manifest,
    MessageError,
    Plan,
    PlanDrop,
    RoundSummary,
    RunMetrics,
    TrainerHParams,
    TrainerJob,
    TrainerMode,
    UpdateMeta,
    dump,
    load,
)
from lepton_tasks.core.strategies import STRATEGIES
from lepton_tasks.ingest.stage import staged_manifests

log = logging.getLogger(__name__)
__all__ = [
    "STRATEGIES",
    "HParams",
    "QuorumError",
    "aggregate_round",
    "plan_run",
    "read_manifest",
    "trainer_job",
]


class QuorumError(RuntimeError):
    """Fewer partners (or updates) than ``min_partners``: the run cannot go on, retrying does not help."""


def run_prefix(run_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.:+" else "_" for c in run_id)
    return f"{safe}/"


def plan_key(run_id: str) -> str:
    return run_prefix(run_id) + "plan.json"


def failure_key(run_id: str, mode: str, round_number: int, partner: str) -> str:
    """Where a trainer task records why it failed (read by ``aggregate`` and the report)."""
    return f"{run_prefix(run_id)}failures/{mode}-{round_number}/{partner}.json"


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


def read_plan(storage: Storage, settings: Settings, run_id: str) -> Plan:
    key = plan_key(run_id)
    return load(
        Plan, storage.get_bytes(settings.models_bucket, key), where=f"s3://{settings.models_bucket}/{key}"
    )


def plan_run(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    *,
    run_id: str,
    dataset: str,
    partners: list[str] | None,
    hparams: HParams,
) -> Plan:
    """Verify every committed drop's manifest, merge the partners' train statistics, write plan + stats.

    A run's plan is immutable: when ``plan.json`` already exists (the task was cleared or retried) it is
    returned as written, so every round of a run trains on the same drops. A drop whose manifest does not
    verify (tampered, replayed under another partner's prefix) or was staged under another contract is left
    out with its reason in ``plan.excluded``; the run goes on with the rest. Fewer partners than
    ``min_partners`` is a :class:`QuorumError`.
    """
    from lepton_tasks.core.features import GlobalStats, SufficientStats, feature_names, merge

    if storage.exists(settings.models_bucket, plan_key(run_id)):
        existing = read_plan(storage, settings, run_id)
        log.info("run %s already has a plan (written before a retry or clear): reusing it unchanged", run_id)
        return existing
    contract = load_contract(dataset)
    found = staged_manifests(storage, settings, dataset, partners)
    if partners:
        missing = sorted(set(partners) - set(found))
        if missing:
            log.warning("no staged data for %s: excluded from this run", ", ".join(missing))
    stats: list[SufficientStats] = []
    plan_partners: dict[str, list[PlanDrop]] = {}
    superseded: dict[str, list[str]] = {}
    excluded: dict[str, str] = {}
    for partner, keys in found.items():
        manifests: dict[str, Manifest] = {}
        for key in keys:
            try:
                manifests[key] = read_manifest(storage, settings, vault, partner, key, dataset)
            except ManifestError as exc:
                log.error("excluding %s: %s", key, exc)
                excluded[key] = str(exc)
        current, old = latest_per_source(manifests)
        for key, by in old.items():
            log.info("%s: %s is superseded by %s (the same inbox file uploaded again)", partner, key, by)
        if old:
            superseded[partner] = sorted(old)
        drops = []
        for key in current:
            m = manifests[key]
            if m.contract != contract.version_tag or m.contract_sha256 != contract.sha256:
                reason = (
                    f"staged under contract {m.contract} ({m.contract_sha256[:12]}…); this run uses "
                    f"{contract.version_tag} ({contract.sha256[:12]}…): re-validate it with "
                    f"`lepton contracts restage --dataset {dataset}`"
                )
                log.warning("skipping %s: %s", key, reason)
                excluded[key] = reason
                continue
            stats.append(m.statistics_train)
            drops.append(PlanDrop.of(key, m))
        if drops:
            plan_partners[partner] = drops
    if len(plan_partners) < hparams.min_partners:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(excluded.items()))
        raise QuorumError(
            f"only {len(plan_partners)} partner(s) have usable staged {dataset} data "
            f"({', '.join(plan_partners) or 'none'}); min_partners is {hparams.min_partners}"
            + (f". Excluded drops: {why}" if why else "")
        )
    merged = merge(stats)
    prefix = run_prefix(run_id)
    storage.put_json(settings.models_bucket, prefix + "stats.json", merged.model_dump(mode="json"))
    plan = Plan(
        run_id=run_id,
        dataset=dataset,
        contract=contract.version_tag,
        contract_sha256=contract.sha256,
        partners=sorted(plan_partners),
        drops=plan_partners,
        superseded=superseded,
        excluded=excluded,
        hparams=hparams,
        feature_names=feature_names(contract, GlobalStats.from_stats(merged, contract)),
    )
    storage.put_json(settings.models_bucket, plan_key(run_id), dump(plan))  # last: the plan's commit
    return plan


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
    """The job a partner's trainer receives (SECRET: presigned URLs and a scoped token; env only, never XCom).

    It holds only that partner's objects, a token that can decrypt/verify with only that partner's key, and
    a presigned PUT for its own output: no S3 credentials, no other partner's anything, no root token. The
    dataset's contract travels with it (hash-checked by the trainer), so the image never bakes one in.
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
        best = published_round(storage, settings, run_id)
        out_key = f"{prefix}eval/{partner}.json"
        prev = f"{prefix}round-{best}/global.npz"
        # every partner's local-only model (weights are shared in a federation; data never is), to measure how
        # each generalizes to the other partners' held-out data
        local_models = {
            p: storage.presigned_get(mb, f"{prefix}local/{p}.npz", ttl)
            for p in plan.partners
            if storage.exists(mb, f"{prefix}local/{p}.npz")
        }
    else:
        raise ValueError(f"unknown trainer mode {mode!r}")
    job = TrainerJob(
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
    return job


def last_round(storage: Storage, settings: Settings, run_id: str) -> int:
    prefix = run_prefix(run_id)
    rounds = [
        int(o.key.split("/")[-2].removeprefix("round-"))
        for o in storage.list(settings.models_bucket, prefix)
        if o.key.endswith("/global.npz") and "/round-" in o.key
    ]
    if not rounds:
        raise ValueError(f"run {run_id} has no aggregated round yet")
    return max(rounds)


def read_round_summaries(storage: Storage, settings: Settings, run_id: str) -> list[RoundSummary]:
    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    rounds = []
    k = 1
    while storage.exists(mb, f"{prefix}round-{k}/summary.json"):
        key = f"{prefix}round-{k}/summary.json"
        rounds.append(load(RoundSummary, storage.get_bytes(mb, key), where=f"s3://{mb}/{key}"))
        k += 1
    return rounds


def published_round(storage: Storage, settings: Settings, run_id: str) -> int:
    """The round whose global model is published: the best by federated held-out AUC (keep the best round).

    Round k's global model is scored by every contributing partner at the start of round k+1, so rounds
    1..K-1 have a held-out score and the last round K has none before the final evaluation. Policy: the best
    scored round (ties: the earliest); when that is K-1, training was still improving at the end, so K is
    published (the final evaluation then scores it); with no scored round (one round), K.
    """
    summaries = read_round_summaries(storage, settings, run_id)
    scores: dict[int, float | None] = {}
    for s in summaries[1:]:
        auc = ((s.global_prev_holdout or {}).get("overall") or {}).get("auc")
        scores[s.round - 1] = float(auc) if auc is not None else None
    return choose_published_round(scores, last_round(storage, settings, run_id))


def choose_published_round(scores: dict[int, float | None], last: int) -> int:
    """The policy of :func:`published_round` over ``{round: held-out AUC}`` of rounds 1..last-1 (pure)."""
    from lepton_tasks.federation.aggregate import best_round

    if not any(v is not None for v in scores.values()):
        return last
    best = best_round(scores)
    return last if best == last - 1 else best


def read_failures(
    storage: Storage, settings: Settings, run_id: str, mode: str, round_number: int
) -> dict[str, str]:
    """``partner → reason`` of the trainer tasks that failed in ``mode``/``round_number``."""
    prefix = f"{run_prefix(run_id)}failures/{mode}-{round_number}/"
    out = {}
    for obj in storage.list(settings.models_bucket, prefix):
        doc = storage.get_json(settings.models_bucket, obj.key)
        out[obj.key.rsplit("/", 1)[-1].removesuffix(".json")] = str(doc.get("reason", ""))
    return out


def record_failure(
    settings: Settings,
    storage: Storage,
    *,
    run_id: str,
    mode: str,
    round_number: int,
    partner: str,
    reason: str,
) -> None:
    """Remember why a partner's trainer task failed, for ``aggregate`` and the report (no secrets in it)."""
    storage.put_json(
        settings.models_bucket,
        failure_key(run_id, mode, round_number, partner),
        {
            "partner": partner,
            "mode": mode,
            "round": round_number,
            "reason": reason[-2000:],
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def aggregate_round(settings: Settings, storage: Storage, *, run_id: str, round_number: int) -> RoundSummary:
    """Aggregate the updates that arrived for ``round_number``; enforce the quorum; write global + summary.

    A partner without an update is excluded with the reason its trainer task recorded (a security failure's
    exact message, a training error) or "no update arrived". An update whose metadata does not validate, or
    that claims another partner, round or run, is excluded with that reason too.
    """
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.metrics import merge_score_summaries
    from lepton_tasks.federation.aggregate import aggregate

    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    plan = read_plan(storage, settings, run_id)
    hp = plan.hparams
    rp = f"{prefix}round-{round_number}/"
    failures = read_failures(storage, settings, run_id, "train", round_number)
    excluded: dict[str, str] = {}
    updates: list[tuple[str, list[Any], int]] = []
    metas: dict[str, UpdateMeta] = {}
    for p in plan.partners:
        key = f"{rp}{p}.update"
        if not storage.exists(mb, key):
            excluded[p] = failures.get(p) or "no update arrived (trainer task did not finish)"
            continue
        try:
            arrays, raw_meta = wio.loads(storage.get_bytes(mb, key))
            meta = load(UpdateMeta, raw_meta, where=f"s3://{mb}/{key}")
            if (meta.partner, meta.round, meta.run_id) != (p, round_number, run_id):
                raise MessageError(
                    f"s3://{mb}/{key}: update claims {meta.partner}/round {meta.round}/{meta.run_id}, "
                    f"expected {p}/round {round_number}/{run_id}"
                )
        except (MessageError, ValueError, KeyError) as exc:
            excluded[p] = f"invalid update: {exc}"
            continue
        metas[p] = meta
        updates.append((p, arrays, meta.n_samples))
    if len(updates) < hp.min_partners:
        reasons = "; ".join(f"{p}: {why}" for p, why in sorted(excluded.items()))
        raise QuorumError(
            f"round {round_number}: only {len(updates)} update(s) arrived "
            f"({', '.join(sorted(metas)) or 'none'}), fewer than min_partners={hp.min_partners}. "
            f"Excluded: {reasons or 'none'}"
        )
    params: dict[str, Any] = {}
    if hp.strategy == "trimmed_mean":
        params["beta"] = hp.trim_beta
    elif hp.strategy == "krum":
        params["f"] = hp.krum_f
    global_w = aggregate(hp.strategy, iter(updates), **params)
    meta_out = GlobalWeightsMeta(
        run_id=run_id, round=round_number, strategy=hp.strategy, partners=sorted(metas)
    )
    storage.put_bytes(mb, f"{rp}global.npz", wio.dumps(global_w, dump(meta_out)))
    partners_metrics = {p: {**m.metrics, "n": m.n_samples} for p, m in metas.items()}
    for p, m in metas.items():  # this update's epsilon alone: a site's ledger composes them (never sum them)
        if m.privacy is not None:
            partners_metrics[p]["dp_epsilon"] = m.privacy.epsilon_this_update
    prev_eval = {p: dict(m.global_prev_holdout) for p, m in metas.items() if m.global_prev_holdout}
    global_prev_holdout = None
    if prev_eval:  # the previous round's global model, scored on each contributing partner's holdout
        summaries = [v.pop("score_summary") for v in prev_eval.values() if "score_summary" in v]
        global_prev_holdout = {
            "round": round_number - 1,
            "per_partner": prev_eval,
            "overall": merge_score_summaries(summaries) if summaries else {},
        }
    summary = RoundSummary(
        round=round_number,
        strategy=hp.strategy,
        partners=partners_metrics,
        excluded=excluded,
        global_prev_holdout=global_prev_holdout,
    )
    storage.put_json(mb, f"{rp}summary.json", dump(summary))
    for p, why in excluded.items():
        log.warning("round %d: excluded %s: %s", round_number, p, why)
    return summary


def collect_metrics(settings: Settings, storage: Storage, *, run_id: str, runtime: str) -> RunMetrics:
    """metrics.json: per round, per partner held-out metrics (global vs local-only), pooled overall."""
    from lepton_tasks.core.metrics import merge_score_summaries

    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    plan = read_plan(storage, settings, run_id)
    rounds = [r.model_dump(by_alias=True) for r in read_round_summaries(storage, settings, run_id)]
    best = published_round(storage, settings, run_id) if rounds else None
    per_partner: dict[str, dict[str, Any]] = {}
    g_summaries: list[dict[str, Any]] = []
    eval_failures = read_failures(storage, settings, run_id, "evaluate", 0)
    missing: dict[str, str] = {}
    local_own: dict[str, dict[str, Any]] = {}
    local_union: dict[str, list[dict[str, Any]]] = {}
    for p in plan.partners:
        key = f"{prefix}eval/{p}.json"
        if not storage.exists(mb, key):
            missing[p] = eval_failures.get(p) or "no held-out evaluation arrived"
            continue
        ev = load(EvalResult, storage.get_bytes(mb, key), where=f"s3://{mb}/{key}")
        g = dict(ev.global_)
        g_summaries.append(g.pop("score_summary"))
        per_partner[p] = g
        for owner, lm_raw in ev.local_models.items():
            lm = dict(lm_raw)
            local_union.setdefault(owner, []).append(lm.pop("score_summary"))
            if owner == p:
                local_own[p] = lm
    local_only = {}
    for owner, summaries in local_union.items():
        union = merge_score_summaries(summaries)
        # per partner: the local-only model on its OWN holdout (comparable with the global model's per-partner
        # numbers), plus how it does on the union of every partner's holdout
        local_only[owner] = {
            **local_own.get(owner, {}),
            "union": {
                **{k: union.get(k) for k in ("auc", "pr_auc", "accuracy", "log_loss", "n")},
                "evaluated_by": len(summaries),
            },
        }
    union_aucs = [v["union"]["auc"] for v in local_only.values() if v["union"].get("auc") is not None]
    # held-out metrics of the global model after each round: round k's comes from round k+1's federated
    # evaluation, the published one from the final evaluation
    for i, r in enumerate(rounds):
        nxt = rounds[i + 1].get("global_prev_holdout") if i + 1 < len(rounds) else None
        if nxt:
            r["global"] = nxt["overall"]
        elif r["round"] == best and g_summaries:
            r["global"] = merge_score_summaries(g_summaries)
    warnings = []
    if runtime != "docker":
        warnings.append(
            f"trainers ran with the {runtime.upper()} runtime (subprocesses), not Docker containers"
        )
    excluded: dict[str, str] = {}
    for key, why in plan.excluded.items():
        excluded[f"drop {key}"] = why
    for r in rounds:
        for p, why in (r.get("excluded") or {}).items():
            excluded[f"{p} (round {r['round']})"] = why
    for p, why in missing.items():
        excluded[f"{p} (final evaluation)"] = why
    if excluded:
        warnings.append(f"{len(excluded)} exclusion(s): see the exclusions table")
    # lineage: only what fed the published model (partners that contributed to a round up to it)
    fed: set[str] = set()
    for r in rounds:
        if best is None or r["round"] <= best:
            fed.update(r["partners"])
    return RunMetrics(
        run_id=run_id,
        dataset=plan.dataset,
        contract_version=plan.contract,
        strategy=plan.hparams.strategy,
        hparams=plan.hparams,
        runtime=runtime,
        rounds=[RoundSummary.model_validate(r) for r in rounds],
        final=FinalMetrics(
            per_partner=per_partner,
            overall=merge_score_summaries(g_summaries) if g_summaries else {},
        ),
        local_only=LocalOnlyMetrics(
            per_partner=local_only,
            overall={
                "auc": sum(union_aucs) / len(union_aucs) if union_aucs else None,
                "note": "mean over partners of each local-only model's AUC on the union of "
                "all partners' held-out data (scored inside each partner's container)",
            },
        ),
        lineage=Lineage(
            run_id=run_id,
            rounds=len(rounds),
            strategy=plan.hparams.strategy,
            contract=plan.contract,
            drops={p: [d.drop_sha256 for d in ds] for p, ds in plan.drops.items() if p in fed},
            published_round=best,
        ),
        excluded=excluded,
        warnings=warnings,
    )
