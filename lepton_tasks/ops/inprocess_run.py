"""One federated run over an embedded topology WITHOUT Airflow: the coordinator's and the sites' task
functions, called in-process in the order the DAGs call them.

The topology (:class:`~lepton_tasks.ops.topology.Topology`) provides the separate stacks (each its own
OpenBao + SeaweedFS; ``up(with_airflow=False)`` is enough) and the real enrollment (``enroll``: the
coordinator enrolls each site, the site imports its bundle and creates its signing key, the coordinator pins
it). Each organization then acts with what its own Airflow would hold (``Stack.airflow_settings``: Airflow's
S3 identity and Vault token, never the storage admin's), and the steps are the DAG tasks' library calls:

============================================  =====================================================
DAG task                                      here
============================================  =====================================================
site ``lepton_ingest``                        :func:`ingest_at_site`: the partner drops with its own
                                              credentials (``topology_demo.drop_at_site``), then
                                              ``ingest.stage.ingest_drop`` in the site's stack
``lepton_federated`` ``start``                ``federation.coordinator.start_run``
``<round>.send``                              ``coordinator.send_jobs`` (signed with the coordinator
                                              key, with its signer-only token)
site ``lepton_site`` ``jobs``/``verify``/     :func:`answer_site_jobs`: ``site.jobs.poll_jobs``,
``answer``                                    ``site.training.verify_job`` and ``answer_job`` with a
                                              :data:`~lepton_tasks.site.training.TrainerRunner`
``<round>.collect``                           ``coordinator.decide_round`` (no trigger: every site has
                                              answered when it is called)
``publish``                                   ``publish.publish_run``
============================================  =====================================================

What differs from the Airflow path: nothing waits (each site handles its job right after it was sent; a site
that sent nothing makes :func:`run_federated` fail with :class:`InProcessRunError` instead of waiting for
the round's deadline), and the trainer runs through the injected runner — by default
:func:`lepton_tasks.site.training.local_runner` (the trainer as a subprocess, the local runtime), not the
site DAG's Docker-based ``lepton_airflow.trainer.trainer_runner``.

:func:`local_only_baseline` is a REFERENCE for benchmarks, outside the protocol: every site trains a
local-only model on its own staged data (the trainer's ``local`` mode, ``local_only_epochs`` = local epochs ×
rounds) and every local-only model is scored on every site's holdout, the weights
copied between the sites' ``models`` buckets by the caller (no row moves; only score histograms come back).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.signing import TransitSigner
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.core.messages import RunMetrics, TrainerHParams
    from lepton_tasks.core.strategies import Strategy
    from lepton_tasks.federation.enrollment import SiteRegistry
    from lepton_tasks.federation.run_records import RoundRecord, RunSpec
    from lepton_tasks.ingest.stage import IngestResult
    from lepton_tasks.ops.embedded.stack import Stack
    from lepton_tasks.ops.topology import Topology
    from lepton_tasks.site.jobs import JobOutcome
    from lepton_tasks.site.training import Site, TrainerRunner

__all__ = [
    "Coordinator",
    "InProcessRunError",
    "InProcessRunResult",
    "LocalOnlyBaseline",
    "RunnerFactory",
    "answer_site_jobs",
    "ingest_at_site",
    "inprocess_runner",
    "local_only_baseline",
    "open_site",
    "run_federated",
]

log = logging.getLogger(__name__)

#: makes a site's trainer runner from the site's own settings, storage and Vault (``local_runner``'s shape)
RunnerFactory = Callable[["Settings", "Storage", "Vault"], "TrainerRunner"]


class InProcessRunError(RuntimeError):
    """A step of the in-process run did not complete; the message names the step and the organization."""


def _vault(settings: Settings) -> Vault:
    from lepton_tasks.adapters.vault import Vault

    return Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value(), settings.transit_mount)


@dataclass(frozen=True)
class Coordinator:
    """What the coordinator's Airflow tasks hold: its settings (Airflow's S3 identity: models and the
    exchange buckets; its Vault token signs with the coordinator key only), storage, registry and signer."""

    settings: Settings
    storage: Storage
    registry: SiteRegistry
    signer: TransitSigner

    @property
    def bucket(self) -> str:
        return self.settings.models_bucket

    @classmethod
    def of(cls, topo: Topology) -> Coordinator:
        from lepton_tasks.adapters.signing import TransitSigner
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.federation.enrollment import SiteRegistry

        s = topo.coordinator().airflow_settings()
        return cls(
            settings=s,
            storage=Storage.from_settings(s),
            registry=SiteRegistry(s.site_registry_file),
            signer=TransitSigner.from_vault(_vault(s), s.coordinator_key_name),
        )


def open_site(topo: Topology, name: str) -> Site:
    """The site ``name`` as its ``lepton_site`` tasks open it (its Airflow's settings and Vault token)."""
    from lepton_tasks.site.training import Site

    s = topo.site(name).airflow_settings()
    return Site.open(s, _vault(s))


def ingest_at_site(topo: Topology, site: str, frame_csv: bytes, *, dataset: str, key: str) -> IngestResult:
    """The site's partner drops ``frame_csv`` into its inbox with its own credentials (onboarded once, in the
    site's OWN stack), and the site ingests it as its ``lepton_ingest`` does: encrypted staging with the
    site's key. Dropping again under the same ``key`` supersedes the earlier drop (the latest per inbox file
    is what a job trains on). :class:`InProcessRunError` unless the drop was staged."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.topology_demo import drop_at_site

    stack: Stack = topo.site(site)
    partner, manifest = drop_at_site(stack, site, frame_csv, dataset=dataset, key=key)
    s = stack.airflow_settings()
    result = ingest_drop(s, Storage.from_settings(s), _vault(s), partner, key, allowed_datasets=[dataset])
    if result.status != "staged" or result.manifest_key != manifest:
        raise InProcessRunError(
            f"site {site}: {partner}/{key} was not staged ({result.status}: {result.error or result.reason})"
        )
    return result


def answer_site_jobs(site: Site, runner: TrainerRunner) -> list[JobOutcome]:
    """One ``lepton_site`` sweep: every job the site has not handled is verified, then answered (trained on
    the site's own data with ``runner``, signed, uploaded). A job the site rejects or refuses is returned
    with that outcome (the DAG fails that job's task; the coordinator sees the refusal or nothing); a job
    waiting for a person's approval is an :class:`InProcessRunError` (nobody approves here)."""
    from lepton_tasks.site.jobs import poll_jobs
    from lepton_tasks.site.training import JobNotAccepted, answer_job, verify_job

    doc = site.state.read()
    outcomes: list[JobOutcome] = []
    for key in poll_jobs(site.exchange, site.bucket, last_seen={*doc.handled, *doc.waiting}):
        try:
            verified = verify_job(site, key)
            if verified.status == "waiting":
                raise InProcessRunError(
                    f"site {site.policy.site}: job {verified.label} waits for the site's approver "
                    f"(until {verified.deadline}); an in-process run has none: enroll with approval off"
                )
            outcomes.append(answer_job(site, key, approved=None, runner=runner))
        except JobNotAccepted as exc:
            log.warning("site %s: %s", site.policy.site, exc)
            outcomes.append(exc.outcome)
    return outcomes


def inprocess_runner(settings: Settings, storage: Storage, vault: Vault) -> TrainerRunner:
    """A :data:`~lepton_tasks.site.training.TrainerRunner` that runs the trainer in THIS process
    (``trainer.__main__.run_job`` on ``site.local_run.trainer_job``'s job): faster than
    :func:`~lepton_tasks.site.training.local_runner` (no interpreter and TensorFlow start per job), same
    job, same trainer code; for benchmarks and tests only."""
    from lepton_tasks.site.training import TrainerRun

    def run(req: TrainerRun) -> None:
        from lepton_tasks.site.local_run import trainer_job
        from lepton_tasks.trainer.__main__ import run_job

        run_job(
            trainer_job(
                settings,
                storage,
                vault,
                run_id=req.run_id,
                partner=req.partner,
                mode=req.mode,
                round_number=req.round_number,
            )
        )

    return run


@dataclass
class InProcessRunResult:
    """What :func:`run_federated` did: the run's spec, each round's decision, and what ``publish`` wrote."""

    spec: RunSpec
    #: round → the coordinator's decision (``record.json``)
    records: dict[int, RoundRecord] = field(default_factory=dict)
    #: round → site → what the site did with its job (``answered``, ``refused``, ``rejected``)
    site_outcomes: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    #: ``publish_run``'s return value (version, report path and URL, model URL, exclusions)
    published: dict[str, Any] = field(default_factory=dict)
    #: the run's ``metrics.json`` (``final.overall`` is the federated model on the union of the holdouts)
    metrics: RunMetrics | None = None
    #: phase → seconds (wall clock)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.spec.run_id


def run_federated(
    topo: Topology,
    *,
    dataset: str,
    rounds: int,
    hparams: TrainerHParams,
    strategy: Strategy = "fedavg",
    min_partners: int | None = None,
    sites: Sequence[str] | None = None,
    run_name: str | None = None,
    runner: RunnerFactory | None = None,
    round_deadline_minutes: float = 60.0,
    progress: Callable[[str], None] = log.info,
) -> InProcessRunResult:
    """One whole ``lepton_federated`` run over ``topo`` (enrolled, its sites' data staged), in-process:
    start → statistics round → ``rounds`` train rounds → evaluation round → publish, each site answering its
    job between ``send`` and ``collect`` (see the module docstring). ``runner`` makes each site's trainer
    runner (default :func:`~lepton_tasks.site.training.local_runner`); ``min_partners`` defaults to every
    site; ``run_name`` is the "Airflow run id" (default: a fresh ``inprocess__<uuid>``)."""
    from lepton_tasks.core.messages import RunMetrics, load
    from lepton_tasks.federation.coordinator import RoundNotComplete, decide_round, send_jobs, start_run
    from lepton_tasks.federation.publish import publish_run
    from lepton_tasks.federation.run_records import run_prefix
    from lepton_tasks.site.training import local_runner

    make_runner: RunnerFactory = runner or local_runner
    chosen = list(sites or topo.sites)
    coordinator = Coordinator.of(topo)
    t0 = time.monotonic()
    spec = start_run(
        coordinator.storage,
        coordinator.bucket,
        coordinator.registry,
        airflow_run_id=run_name or f"inprocess__{uuid.uuid4().hex[:12]}",
        consortium=coordinator.settings.consortium,
        dataset=dataset,
        sites=chosen,
        rounds=rounds,
        strategy=strategy,
        min_partners=len(chosen) if min_partners is None else min_partners,
        round_deadline_minutes=round_deadline_minutes,
        hparams=hparams,
    )
    result = InProcessRunResult(spec=spec)
    site_handles = {name: open_site(topo, name) for name in spec.sites}
    runners = {name: make_runner(s.settings, s.storage, s.vault) for name, s in site_handles.items()}
    coordinator_key = coordinator.signer.public_key()
    result.timings["start"] = round(time.monotonic() - t0, 1)
    for round_ in range(0, spec.evaluation_round + 1):
        t_round = time.monotonic()
        mode = spec.mode_of(round_)
        send_jobs(
            coordinator.storage, coordinator.bucket, coordinator.signer, coordinator.registry, spec, round_
        )
        done: dict[str, list[str]] = {}
        for name, site in site_handles.items():
            outcomes = answer_site_jobs(site, runners[name])
            done[name] = [o.status.value for o in outcomes]
        result.site_outcomes[round_] = done
        try:
            record = decide_round(
                coordinator.storage,
                coordinator.bucket,
                coordinator.registry,
                spec.run_id,
                round_,
                coordinator_key=coordinator_key,
            )
        except RoundNotComplete as exc:  # a site sent nothing: the DAG would wait for the deadline
            raise InProcessRunError(f"round {round_} ({mode}): {exc}; the sites did {done}") from exc
        result.records[round_] = record
        excluded = "; ".join(f"{s}: {why}" for s, why in record.excluded.items())
        result.timings[f"round {round_} ({mode})"] = round(time.monotonic() - t_round, 1)
        progress(
            f"round {round_} ({mode}): accepted {', '.join(record.accepted)}"
            + (f"; excluded {excluded}" if excluded else "")
            + f" [{time.monotonic() - t_round:.0f} s]"
        )
    t_pub = time.monotonic()
    result.published = publish_run(
        coordinator.storage,
        coordinator.bucket,
        spec,
        report_dir=coordinator.settings.data_dir / "reports" / "federated" / spec.run_id,
    )
    metrics_key = run_prefix(spec.run_id) + "metrics.json"
    result.metrics = load(
        RunMetrics,
        coordinator.storage.get_bytes(coordinator.bucket, metrics_key),
        where=f"s3://{coordinator.bucket}/{metrics_key}",
    )
    result.timings["publish"] = round(time.monotonic() - t_pub, 1)
    result.timings["total"] = round(time.monotonic() - t0, 1)
    return result


# ------------------------------------------------------------------------------ reference: local-only models


@dataclass
class LocalOnlyBaseline:
    """Every site's local-only model scored on its own holdout and on the union of every site's holdout."""

    #: site → held-out metrics of its local-only model on its OWN holdout
    own: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: site → metrics of its local-only model on the union of the holdouts (merged score histograms)
    union: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mean_union_auc(self) -> float | None:
        """The mean over sites of each local-only model's AUC on the union of the holdouts."""
        aucs = [float(m["auc"]) for m in self.union.values() if m.get("auc") is not None]
        return sum(aucs) / len(aucs) if aucs else None

    @property
    def mean_own_auc(self) -> float | None:
        aucs = [float(m["auc"]) for m in self.own.values() if m.get("auc") is not None]
        return sum(aucs) / len(aucs) if aucs else None


def local_only_baseline(
    topo: Topology, run_id: str, *, sites: Iterable[str] | None = None, ttl: timedelta = timedelta(hours=1)
) -> LocalOnlyBaseline:
    """REFERENCE ONLY (see the module docstring), after :func:`run_federated` of ``run_id`` finished: each
    site trains a local-only model in its local run of ``run_id`` (same plan, drops, merged statistics and
    hyper-parameters as its federated training; ``local_only_epochs`` = local epochs × rounds), then every
    site scores every local-only model on its own holdout. Runs the trainer in this process."""
    from lepton_tasks.core.messages import EvalResult, load
    from lepton_tasks.core.metrics import merge_score_summaries
    from lepton_tasks.site.local_run import run_prefix, trainer_job
    from lepton_tasks.site.training import local_run_id
    from lepton_tasks.trainer.__main__ import run_job

    local_run = local_run_id(run_id)
    prefix = run_prefix(local_run)
    handles = {name: open_site(topo, name) for name in (sites or topo.sites)}
    partners = {name: s.partner for name, s in handles.items()}
    models: dict[str, bytes] = {}
    for name, s in handles.items():
        mb = s.settings.models_bucket
        job = trainer_job(
            s.settings, s.storage, s.vault, run_id=local_run, partner=s.partner, mode="local", round_number=0
        )
        run_job(job)
        models[name] = s.storage.get_bytes(mb, job.output_key)
    summaries: dict[str, list[dict[str, Any]]] = {name: [] for name in handles}
    baseline = LocalOnlyBaseline()
    for name, s in handles.items():
        mb = s.settings.models_bucket
        urls = {}
        for owner, blob in models.items():  # every site's local-only weights, beside this site's own
            key = f"{prefix}local/{partners[owner]}.npz"
            if owner != name:
                s.storage.put_bytes(mb, key, blob)
            urls[partners[owner]] = s.storage.presigned_get(mb, key, ttl)
        out_key = f"{prefix}local-only-eval/{s.partner}.json"
        job = trainer_job(
            s.settings,
            s.storage,
            s.vault,
            run_id=local_run,
            partner=s.partner,
            mode="evaluate",
            round_number=0,
        )
        job = job.model_copy(
            update={
                "local_models": urls,
                "output_key": out_key,
                "output_url": s.storage.presigned_put(mb, out_key, ttl),
            }
        )
        run_job(job)
        result = load(EvalResult, s.storage.get_bytes(mb, out_key), where=f"s3://{mb}/{out_key}")
        for owner in handles:
            block = dict(result.local_models[partners[owner]])
            summaries[owner].append(block.pop("score_summary"))
            if owner == name:
                baseline.own[owner] = block
    for owner, parts in summaries.items():
        union = merge_score_summaries(parts)
        baseline.union[owner] = {
            **{k: union.get(k) for k in ("auc", "pr_auc", "accuracy", "log_loss", "n")},
            "evaluated_by": len(parts),
        }
    return baseline
