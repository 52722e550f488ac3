"""Server side of a federated run: plan, trainer jobs, aggregation with a quorum, final metrics.

Everything a run writes lives under ``models/<run_id>/`` and is keyed by run id and round, so re-running a
round (or clearing one partner's task) overwrites the same objects: idempotent.

    models/<run_id>/plan.json                 partners, their committed drops (hash, contract), hyper-parameters
    models/<run_id>/stats.json                merged federated statistics (train splits only)
    models/<run_id>/round-<k>/<partner>.update   a partner's weights (npz, no pickle) + n + local metrics
    models/<run_id>/round-<k>/global.npz      the aggregate of round k
    models/<run_id>/round-<k>/summary.json    who contributed, who was excluded, training metrics
    models/<run_id>/eval/<partner>.json       held-out metrics + score histograms (global and local-only)
    models/<run_id>/metrics.json, report.html, model/global.keras, model/VERSION.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.ingest.stage import read_manifest, staged_manifests

log = logging.getLogger(__name__)
STRATEGIES = ("fedavg", "fedprox", "median", "trimmed_mean", "krum")


class QuorumError(RuntimeError):
    """Fewer partner updates than ``min_partners`` arrived for a round."""


@dataclass(frozen=True)
class HParams:
    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 0.005
    strategy: str = "fedavg"
    min_partners: int = 2
    seed: int = 42
    fedprox_mu: float = 0.0
    trim_beta: float = 0.2
    krum_f: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.rounds < 1 or self.local_epochs < 1 or self.min_partners < 1:
            raise ValueError("rounds, local_epochs and min_partners must be >= 1")


def run_prefix(run_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.:+" else "_" for c in run_id)
    return f"{safe}/"


def _staged_at(manifest: dict[str, Any]) -> datetime:
    raw = manifest.get("staged_at")
    return datetime.fromisoformat(raw) if raw else datetime.min.replace(tzinfo=UTC)


def latest_per_source(manifests: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Of one partner's committed drops, those that count: the latest per inbox file.

    A partner that uploads a file again under the same inbox key (a corrected export, next month's refresh
    of the same file) replaces its earlier content, as an S3 overwrite does; different keys add up. Returns
    ``(current manifest keys, {superseded manifest key: manifest key that replaced it})``. "Latest" is the
    manifest's ``staged_at`` (ties: the manifest key, so the choice is deterministic); a manifest without a
    ``source`` key stands alone.
    """
    groups: dict[str, list[str]] = {}
    for key, m in manifests.items():
        source = (m.get("source") or {}).get("key") or f"manifest:{key}"
        groups.setdefault(source, []).append(key)
    current: list[str] = []
    old: dict[str, str] = {}
    for keys in groups.values():
        keys.sort(key=lambda k: (_staged_at(manifests[k]), k))
        current.append(keys[-1])
        old.update({k: keys[-1] for k in keys[:-1]})
    return sorted(current), old


def plan_run(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    *,
    run_id: str,
    dataset: str,
    partners: list[str] | None,
    hparams: HParams,
) -> dict[str, Any]:
    """Verify every committed drop's manifest, merge the partners' train statistics, write plan + stats."""
    from lepton_tasks.core.features import GlobalStats, SufficientStats, feature_names, merge

    contract = load_contract(dataset)
    found = staged_manifests(storage, settings, dataset, partners)
    if partners:
        missing = sorted(set(partners) - set(found))
        if missing:
            log.warning("no staged data for %s: excluded from this run", ", ".join(missing))
    stats: list[SufficientStats] = []
    plan_partners: dict[str, list[dict[str, Any]]] = {}
    superseded: dict[str, list[str]] = {}
    for partner, keys in found.items():
        manifests = {key: read_manifest(storage, settings, vault, partner, key) for key in keys}
        current, old = latest_per_source(manifests)
        for key, by in old.items():
            log.info("%s: %s is superseded by %s (the same inbox file uploaded again)", partner, key, by)
        if old:
            superseded[partner] = sorted(old)
        drops = []
        for key in current:
            m = manifests[key]
            if m["contract"] != contract.version_tag:
                log.warning("skipping %s: contract %s, run uses %s", key, m["contract"], contract.version_tag)
                continue
            stats.append(SufficientStats.model_validate(m["statistics_train"]))
            drops.append(
                {
                    "manifest": key,
                    "drop_sha256": m["drop_sha256"],
                    "rows": m["rows"],
                    "contract": m["contract"],
                    "objects": m["objects"],
                }
            )
        if drops:
            plan_partners[partner] = drops
    if len(plan_partners) < hparams.min_partners:
        raise QuorumError(
            f"only {len(plan_partners)} partner(s) have staged {dataset} data "
            f"({', '.join(plan_partners) or 'none'}); min_partners is {hparams.min_partners}"
        )
    merged = merge(stats)
    prefix = run_prefix(run_id)
    storage.put_json(settings.models_bucket, prefix + "stats.json", merged.model_dump(mode="json"))
    plan = {
        "run_id": run_id,
        "dataset": dataset,
        "contract": contract.version_tag,
        "partners": sorted(plan_partners),
        "drops": plan_partners,
        "superseded": superseded,
        "hparams": hparams.__dict__,
        "feature_names": feature_names(contract, GlobalStats.from_stats(merged, contract)),
    }
    storage.put_json(settings.models_bucket, prefix + "plan.json", plan)
    return plan


def trainer_job(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    *,
    run_id: str,
    partner: str,
    mode: str,
    round_number: int,
    ttl: timedelta = timedelta(hours=1),
) -> dict[str, Any]:
    """The job a partner's trainer receives (SECRET: presigned URLs and a scoped token; env only, never XCom).

    It holds only that partner's objects, a token that can decrypt/verify with only that partner's key, and
    a presigned PUT for its own output: no S3 credentials, no other partner's anything, no root token.
    """
    prefix = run_prefix(run_id)
    plan = storage.get_json(settings.models_bucket, prefix + "plan.json")
    if partner not in plan["drops"]:
        raise ValueError(f"partner {partner!r} is not part of run {run_id}")
    hp = HParams(**plan["hparams"])
    bucket = settings.staging_bucket
    drops = []
    for d in plan["drops"][partner]:
        drops.append(
            {
                "manifest_key": d["manifest"],
                "manifest_url": storage.presigned_get(bucket, d["manifest"], ttl),
                **{
                    split: {
                        "key": obj["key"],
                        "sha256": obj["sha256"],
                        "url": storage.presigned_get(bucket, obj["key"], ttl),
                    }
                    for split, obj in d["objects"].items()
                },
            }
        )
    mb = settings.models_bucket
    local_models: dict[str, str] = {}
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
        # every partner's local-only model (weights are shared in a federation; data never is), to measure how
        # each generalizes to the other partners' held-out data
        local_models = {
            p: storage.presigned_get(mb, f"{prefix}local/{p}.npz", ttl)
            for p in plan["partners"]
            if storage.exists(mb, f"{prefix}local/{p}.npz")
        }
    else:
        raise ValueError(f"unknown trainer mode {mode!r}")
    return {
        "mode": mode,
        "partner": partner,
        "dataset": plan["dataset"],
        "run_id": run_id,
        "round": round_number,
        "vault_addr": settings.vault_addr,
        "transit_mount": settings.transit_mount,
        "key_name": settings.transit_key(partner),
        "staging_bucket": bucket,
        "vault_token": vault.trainer_token(partner, ttl=f"{int(ttl.total_seconds())}s"),
        "drops": drops,
        "stats_url": storage.presigned_get(mb, prefix + "stats.json", ttl),
        "global_weights_url": storage.presigned_get(mb, prev, ttl) if prev else None,
        "output_url": storage.presigned_put(mb, out_key, ttl),
        "output_key": out_key,
        "local_models": local_models,
        "hparams": {
            "epochs": hp.local_epochs,
            "batch_size": hp.batch_size,
            "learning_rate": hp.learning_rate,
            "seed": hp.seed,
            "fedprox_mu": hp.fedprox_mu if hp.strategy == "fedprox" else 0.0,
            "local_only_epochs": hp.local_epochs * hp.rounds,
        },
    }


def last_round(storage: Storage, settings: Settings, run_id: str) -> int:
    prefix = run_prefix(run_id)
    rounds = [
        int(o.key.split("/")[-2].removeprefix("round-"))
        for o in storage.list(settings.models_bucket, prefix)
        if o.key.endswith("/global.npz")
    ]
    if not rounds:
        raise ValueError(f"run {run_id} has no aggregated round yet")
    return max(rounds)


def aggregate_round(
    settings: Settings, storage: Storage, *, run_id: str, round_number: int
) -> dict[str, Any]:
    """Aggregate the updates that arrived for ``round_number``; enforce the quorum; write global + summary."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.federation.aggregate import aggregate

    prefix = run_prefix(run_id)
    plan = storage.get_json(settings.models_bucket, prefix + "plan.json")
    hp = HParams(**plan["hparams"])
    rp = f"{prefix}round-{round_number}/"
    arrived = {p for p in plan["partners"] if storage.exists(settings.models_bucket, f"{rp}{p}.update")}
    excluded = sorted(set(plan["partners"]) - arrived)
    if len(arrived) < hp.min_partners:
        raise QuorumError(
            f"round {round_number}: only {len(arrived)} update(s) arrived ({', '.join(sorted(arrived)) or 'none'}; "
            f"missing {', '.join(excluded)}), fewer than min_partners={hp.min_partners}"
        )
    metrics: dict[str, Any] = {}
    prev_eval: dict[str, Any] = {}

    def updates():
        for p in sorted(arrived):
            arrays, meta = wio.loads(storage.get_bytes(settings.models_bucket, f"{rp}{p}.update"))
            metrics[p] = {**meta.get("metrics", {}), "n": int(meta["n_samples"])}
            if meta.get("global_prev_holdout"):
                prev_eval[p] = meta["global_prev_holdout"]
            yield p, arrays, int(meta["n_samples"])

    params: dict[str, Any] = {}
    if hp.strategy == "trimmed_mean":
        params["beta"] = hp.trim_beta
    elif hp.strategy == "krum":
        params["f"] = hp.krum_f
    global_w = aggregate(hp.strategy, updates(), **params)
    storage.put_bytes(
        settings.models_bucket,
        f"{rp}global.npz",
        wio.dumps(
            global_w,
            {"run_id": run_id, "round": round_number, "strategy": hp.strategy, "partners": sorted(arrived)},
        ),
    )
    summary = {"round": round_number, "strategy": hp.strategy, "partners": metrics, "excluded": excluded}
    if prev_eval:  # the previous round's global model, scored on each contributing partner's holdout
        from lepton_tasks.core.metrics import merge_score_summaries

        summaries = [v.pop("score_summary") for v in prev_eval.values() if "score_summary" in v]
        summary["global_prev_holdout"] = {
            "round": round_number - 1,
            "per_partner": prev_eval,
            "overall": merge_score_summaries(summaries) if summaries else {},
        }
    storage.put_json(settings.models_bucket, f"{rp}summary.json", summary)
    if excluded:
        log.warning("round %d: excluded %s (no update after retries)", round_number, ", ".join(excluded))
    return summary


def collect_metrics(settings: Settings, storage: Storage, *, run_id: str, runtime: str) -> dict[str, Any]:
    """metrics.json: per round, per partner held-out metrics (global vs local-only), pooled overall."""
    from lepton_tasks.core.metrics import merge_score_summaries

    prefix = run_prefix(run_id)
    mb = settings.models_bucket
    plan = storage.get_json(mb, prefix + "plan.json")
    rounds = []
    k = 1
    while storage.exists(mb, f"{prefix}round-{k}/summary.json"):
        rounds.append(storage.get_json(mb, f"{prefix}round-{k}/summary.json"))
        k += 1
    per_partner, g_summaries, missing = {}, [], []
    local_own: dict[str, dict] = {}
    local_union: dict[str, list] = {}
    for p in plan["partners"]:
        key = f"{prefix}eval/{p}.json"
        if not storage.exists(mb, key):
            missing.append(p)
            continue
        ev = storage.get_json(mb, key)
        g = ev["global"]
        g_summaries.append(g.pop("score_summary"))
        per_partner[p] = g
        for owner, lm in ev.get("local_models", {}).items():
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
    # evaluation, the last one from the final evaluation
    for i, r in enumerate(rounds):
        nxt = rounds[i + 1].get("global_prev_holdout") if i + 1 < len(rounds) else None
        if nxt:
            r["global"] = nxt["overall"]
        elif i + 1 == len(rounds) and g_summaries:
            r["global"] = merge_score_summaries(g_summaries)
    warnings = []
    if runtime != "docker":
        warnings.append(
            f"trainers ran with the {runtime.upper()} runtime (subprocesses), not Docker containers"
        )
    if missing:
        warnings.append(f"no held-out evaluation from {', '.join(missing)}")
    for r in rounds:
        if r.get("excluded"):
            warnings.append(f"round {r['round']}: excluded {', '.join(r['excluded'])}")
    hp = plan["hparams"]
    return {
        "run_id": run_id,
        "dataset": plan["dataset"],
        "contract_version": plan["contract"],
        "strategy": hp["strategy"],
        "hparams": hp,
        "runtime": runtime,
        "rounds": rounds,
        "final": {
            "per_partner": per_partner,
            "overall": merge_score_summaries(g_summaries) if g_summaries else {},
        },
        "local_only": {
            "per_partner": local_only,
            "overall": {
                "auc": sum(union_aucs) / len(union_aucs) if union_aucs else None,
                "note": "mean over partners of each local-only model's AUC on the union of "
                "all partners' held-out data (scored inside each partner's container)",
            },
        },
        "lineage": {
            "run_id": run_id,
            "rounds": len(rounds),
            "strategy": hp["strategy"],
            "contract": plan["contract"],
            "drops": {p: [d["drop_sha256"] for d in ds] for p, ds in plan["drops"].items()},
        },
        "warnings": warnings,
    }
