"""The coordinator's DAG (``lepton_federated``) under ``dag.test()`` against real SeaweedFS exchange buckets
and real OpenBao signing keys, with three sites answering from a background thread.

Set-up (module fixture, like tests/integration/test_exchange_round.py's rig): the coordinator has its own
ed25519 key and a Vault token that can only sign with it (the DAG's ``lepton_vault`` connection carries that
token, so the DAG holds nothing that decrypts partner data); three sites are enrolled into a registry of the
coordinator's own data dir, import their bundles, create their keys and are pinned. Each site runs the SITE
LIBRARY (``site.jobs.run_pending``) with its own bucket-scoped credentials, its own signing token and a
numpy stand-in trainer (statistics → fixed counts, train → global + delta, evaluate → a score histogram):
the thing under test is the coordinator.

- ``fed-c`` allows only the median: its policy refuses every job of a fedavg run (a signed refusal);
- ``fed-b``'s answers to round 2 are edited in the bucket after signing (``n_samples`` raised to dominate
  the average): the coordinator rejects them (tampered_payload).

``dag.test()`` runs each ``collect`` task's deferral inline (Airflow 3.3: ``_run_task(run_triggerer=True)``
runs the trigger in process, then resumes ``execute_complete``), so the real trigger polls the real
exchange while the sites answer.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hvac
import numpy as np
import pytest

from lepton_tasks.adapters.signing import TransitSigner, signer_policy
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.core import weights
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.exchange import canonical_json
from lepton_tasks.core.features import NumericStats, SufficientStats
from lepton_tasks.core.messages import RoundAnswer, RoundJob
from lepton_tasks.core.metrics import score_summary
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.site_policy import Approval, DatasetGrant, load_policy
from lepton_tasks.federation.enrollment import (
    SiteRegistry,
    enroll_site,
    pin_site_key,
    read_bundle,
    remove_site,
    write_bundle,
)
from lepton_tasks.federation.run_records import exchange_run_id, read_record
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site.enrollment import exchange_storage, import_bundle
from lepton_tasks.site.jobs import run_pending
from lepton_tasks.site.state import SiteState
from tests.conftest import REPO
from tests.integration.waiting import wait_live

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONSORTIUM = "fed-dag"
TAMPERED_ROUND = 2


class TamperingStorage:
    """A site's exchange storage through which an attacker edits the site's answers to round 2 after the
    site signed them (what an attacker with write access to the bucket does), every other call untouched."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.tampered: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> str:
        if key.startswith("answers/") and key.endswith(".json") and f"/{TAMPERED_ROUND:04d}/" in key:
            doc = json.loads(data)
            answer = json.loads(base64.b64decode(doc["payload"]))
            answer["n_samples"] = 10**9  # to dominate the average
            doc["payload"] = base64.b64encode(canonical_json(answer)).decode()
            data = json.dumps(doc).encode()
            self.tampered.append(key)
        return self.inner.put_bytes(bucket, key, data, **kw)


@dataclass
class SimSite:
    name: str
    bucket: str
    storage: Any
    signer: TransitSigner
    policy: Any
    state: SiteState
    outbound: OutboundLog
    delta: float
    n: int
    answered: list[tuple[str, int, str]] = field(default_factory=list)

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        contract = load_contract(job.dataset)
        if job.mode == "statistics":
            stats = SufficientStats.empty(contract).model_copy(
                update={
                    "rows": self.n,
                    "numeric": {
                        "balance": NumericStats(count=self.n, sum=800.0 * self.n, sum_sq=0.0),
                        "income": NumericStats(count=self.n, sum=3e4 * self.n, sum_sq=0.0),
                    },
                    "label_counts": {"No": self.n - 1, "Yes": 1},
                }
            )
            return RoundAnswer(mode="statistics", n_samples=self.n, statistics=stats), None
        assert global_weights is not None and job.statistics is not None and job.feature_names
        arrays, _ = weights.loads(global_weights)
        if job.mode == "train":
            update = [a + np.float32(self.delta) for a in arrays]
            answer = RoundAnswer(mode="train", n_samples=self.n, metrics={"loss": round(1 / self.n, 6)})
            return answer, weights.dumps(update, {"site": self.name})
        rng = np.random.default_rng(self.n)
        y = (rng.random(200) < 0.3).astype(float)
        p = np.clip(0.3 * y + 0.7 * rng.random(200), 0.01, 0.99)
        evaluation = {"auc": 0.8, "n": 200, "score_summary": score_summary(y, p)}
        return RoundAnswer(mode="evaluate", n_samples=200, evaluation=evaluation), None

    def tick(self) -> None:
        for out in run_pending(
            self.storage,
            self.bucket,
            policy=self.policy,
            state=self.state,
            run_trainer=self.trainer,
            signer=self.signer,
            outbound_log=self.outbound,
        ):
            if out.header is not None:
                self.answered.append((out.header.run_id, out.header.round, out.status.value))


@dataclass
class Federation:
    settings: Any
    admin: Storage
    registry: SiteRegistry
    sites: dict[str, SimSite]
    env: dict[str, str]
    errors: list[BaseException] = field(default_factory=list)

    def site(self, letter: str) -> SimSite:
        return next(s for n, s in self.sites.items() if n.startswith(f"fed-{letter}-"))


@pytest.fixture(scope="module")
def federation(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[Federation]:
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    root_dir = tmp_path_factory.mktemp("federated")
    coordinator_dir = root_dir / "coordinator"
    contract = load_contract("banks")
    identities = SeaweedIdentities(services.seaweedfs.shell)
    tokens: list[str] = []
    policies: list[str] = []
    keys: list[str] = []

    def restricted(key_name: str, policy: str) -> tuple[str, TransitSigner]:
        token = root_vault.client.auth.token.create(
            policies=[policy], no_default_policy=True, ttl="30m", renewable=False
        )["auth"]["client_token"]
        tokens.append(token)
        return token, TransitSigner(hvac.Client(url=settings.vault_addr, token=token, timeout=30), key_name)

    coord_key = f"sgn-fedcoord-{suffix}"
    keys.append(coord_key)
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    root_vault.write_policy(f"fedcoord-{suffix}", signer_policy(root_vault.transit_mount, coord_key))
    policies.append(f"fedcoord-{suffix}")
    coord_token, coordinator = restricted(coord_key, f"fedcoord-{suffix}")
    registry = SiteRegistry(coordinator_dir / "sites.yaml")

    sites: dict[str, SimSite] = {}
    saved: dict[str, str | None] = {}
    try:
        for letter, delta, n, strategies in (
            ("a", 1.0, 100, ("fedavg", "median")),
            ("b", 2.0, 300, ("fedavg", "median")),
            ("c", 4.0, 600, ("median",)),
        ):
            name = f"fed-{letter}-{suffix}"
            bundle = enroll_site(
                admin_storage,
                identities,
                coordinator,
                registry=registry,
                consortium=CONSORTIUM,
                site=name,
                endpoint=settings.s3_endpoint,
            )
            site_dir = root_dir / name
            write_bundle(bundle, site_dir / "bundle.json")
            bundle = read_bundle(site_dir / "bundle.json")
            identity = import_bundle(
                bundle,
                root_vault,  # stands in for the site's own Vault
                policy_path=site_dir / "policy.yaml",
                confirmed_coordinator_fingerprint=coordinator.public_key().fingerprint,
                key_name=f"sgn-fedsite-{name}",
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256)],
                min_partners=1,
                allowed_strategies=strategies,
                approval=Approval(required=False),
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            storage: Any = exchange_storage(bundle)
            if letter == "b":
                storage = TamperingStorage(storage)
            sites[name] = SimSite(
                name=name,
                bucket=bundle.bucket,
                storage=storage,
                signer=restricted(identity.key_name, identity.vault_policy)[1],
                policy=load_policy(site_dir / "policy.yaml"),
                state=SiteState(site_dir / "state.json"),
                outbound=OutboundLog(site_dir / "outbound.jsonl"),
                delta=delta,
                n=n,
            )
        for site in sites.values():
            wait_live(lambda s=site: list(s.storage.list(s.bucket)))

        # the DAG's connections: the storage identity, and a Vault token that can only sign with its key
        conns = airflow_connections(settings)
        vault_conn = json.loads(conns["AIRFLOW_CONN_LEPTON_VAULT"])
        vault_conn["password"] = coord_token
        env = {
            **conns,
            "AIRFLOW_CONN_LEPTON_VAULT": json.dumps(vault_conn),
            "LEPTON_DATA_DIR": str(coordinator_dir),
            "LEPTON_CONSORTIUM": CONSORTIUM,
            "LEPTON_COORDINATOR_KEY_NAME": coord_key,
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        print(f"\nfederation ready in {time.monotonic() - started:.1f} s")
        yield Federation(settings, admin_storage, registry, sites, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name in sites:
            remove_site(registry, identities, name, admin_storage=admin_storage, delete_bucket=True)
        for token in tokens:
            root_vault.client.auth.token.revoke(token)
        for policy in policies:
            root_vault.delete_policy(policy)
        for key in keys:
            root_vault.delete_key(key)


@pytest.fixture(scope="module")
def federated_dag(federation):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.resetdb()
    # the DAGs a coordinator's Airflow loads; for the whole module: dag.test re-parses the DAG file
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEPTON_ROLE", "coordinator")
        bag = DagBag(dag_folder=str(REPO / "dags"))
        assert bag.import_errors == {}
        yield bag.get_dag("lepton_federated")


@pytest.fixture
def sites_running(federation) -> Iterator[Federation]:
    """The three sites poll their exchange buckets every 0.2 s while the DAG runs (a thread)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for site in federation.sites.values():
                try:
                    site.tick()
                except Exception as exc:  # noqa: BLE001 - recorded: the test fails on it below
                    federation.errors.append(exc)
            stop.wait(0.2)

    thread = threading.Thread(target=loop, name="sites", daemon=True)
    thread.start()
    try:
        yield federation
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not federation.errors, federation.errors


def _conf(min_partners: int) -> dict[str, Any]:
    return {
        "dataset": "banks",
        "rounds": 2,
        "strategy": "fedavg",
        "min_partners": min_partners,
        "round_deadline_minutes": 2,
        "poll_seconds": 0.3,
        "local_epochs": 1,
    }


def _task_states(run_id: str) -> dict[str, str | None]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        return {
            ti.task_id: ti.state for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run_id)
        }


def test_a_run_completes_with_the_remaining_quorum_and_the_report_names_both_exclusions(
    federated_dag, sites_running, capfd
):
    fed = sites_running
    a, b, c = fed.site("a"), fed.site("b"), fed.site("c")
    started = time.monotonic()
    run = federated_dag.test(run_conf=_conf(min_partners=1))
    elapsed = time.monotonic() - started
    logs = "".join(capfd.readouterr())
    print(f"federated run: {elapsed:.1f} s")

    states = _task_states(run.run_id)
    assert run.state == "success", {k: v for k, v in states.items() if v != "success"}
    for group in ("statistics", "round_1", "round_2", "evaluation"):
        assert [states[f"{group}.{t}"] for t in ("send", "collect")] == ["success"] * 2, group
    for k in range(3, 9):
        assert {states[f"round_{k}.{t}"] for t in ("send", "collect")} == {"skipped"}
    assert states["publish"] == "success"
    assert "running trigger in line" in logs  # each collect deferred to the trigger (run inline by dag.test)

    run_id = exchange_run_id(run.run_id)
    bucket = fed.settings.models_bucket
    records = {k: read_record(fed.admin, bucket, run_id, k) for k in range(4)}
    assert all(r is not None and r.quorum_met for r in records.values())
    accepted = {k: r.accepted for k, r in records.items() if r is not None}
    assert accepted == {0: [a.name, b.name], 1: [a.name, b.name], 2: [a.name], 3: [a.name, b.name]}
    for k, r in records.items():
        assert r is not None
        refusal = next(e for e in r.exclusions if e.site == c.name)
        assert (refusal.kind.value, refusal.code) == ("refused", "strategy_not_allowed"), k
        assert "strategy 'fedavg' is not allowed here (allowed: median)" in refusal.reason
    r2 = records[2]
    assert r2 is not None
    tampered = next(e for e in r2.exclusions if e.site == b.name)
    assert (tampered.kind.value, tampered.code) == ("verification_failed", "tampered_payload")
    assert len(b.storage.tampered) == 1 and tampered.reason.startswith(
        "its reply was rejected (tampered_payload"
    )

    # round 2's global weights are the initial model + a's delta only: b's forged 10^9 samples never counted
    w0, _ = weights.loads(fed.admin.get_bytes(bucket, f"federated/{run_id}/round-0000/global.npz"))
    w2, meta = weights.loads(fed.admin.get_bytes(bucket, f"federated/{run_id}/round-0002/global.npz"))
    shift = (a.delta * a.n + b.delta * b.n) / (a.n + b.n) + a.delta  # round 1: a and b; round 2: a alone
    for got, start in zip(w2, w0, strict=True):
        np.testing.assert_allclose(got, start + np.float32(shift), rtol=1e-5, atol=1e-5)
    from lepton_tasks.core.messages import GlobalWeightsMeta, RunMetrics, load

    assert load(GlobalWeightsMeta, meta, where="round 2's global weights").sites == [a.name]

    raw = fed.admin.get_bytes(bucket, f"federated/{run_id}/metrics.json")
    metrics = load(RunMetrics, raw, where="metrics.json")
    assert set(metrics.excluded) == {
        *(
            f"{c.name} (round {k}, {m})"
            for k, m in ((0, "statistics"), (1, "train"), (2, "train"), (3, "evaluate"))
        ),
        f"{b.name} (round 2, train)",
    }
    assert metrics.final.overall["n"] == 400 and set(metrics.final.per_partner) == {a.name, b.name}
    report = fed.admin.get_bytes(bucket, f"federated/{run_id}/report.html").decode()
    for text in (c.name, "strategy_not_allowed", b.name, "tampered_payload", "verification_failed"):
        assert text in report, text
    assert fed.admin.exists(bucket, f"federated/{run_id}/model/global.keras")
    assert f"EXCLUDED {b.name} (round 2, train): verification_failed (tampered_payload)" in logs
    # every site saw each of the 4 rounds once: nothing was sent twice
    for site in fed.sites.values():
        rounds = sorted(k for r, k, _ in site.answered if r == run_id)
        assert rounds == [0, 1, 2, 3], (site.name, site.answered)


def test_a_round_below_quorum_fails_the_run_with_one_error_and_the_rest_skips(
    federated_dag, sites_running, capfd
):
    fed = sites_running
    a, b, c = fed.site("a"), fed.site("b"), fed.site("c")
    run = federated_dag.test(run_conf=_conf(min_partners=2))
    logs = "".join(capfd.readouterr())

    states = _task_states(run.run_id)
    assert run.state == "failed"
    assert [t for t, s in states.items() if s == "failed"] == ["round_2.collect"]  # ONE error
    assert states["publish"] == "upstream_failed"  # marks the run failed; it never ran, it logs nothing
    assert {t for t, s in states.items() if s not in ("success", "skipped")} == {"round_2.collect", "publish"}
    for t in ("round_3.send", "round_3.collect", "round_4.send", "evaluation.send", "evaluation.collect"):
        assert states[t] == "skipped", t
    for group in ("statistics", "round_1"):
        assert states[f"{group}.collect"] == "success"

    message = (
        f"round 2 (train) is below quorum: 1 usable site(s) ({a.name}), min_partners=2. Excluded: "
        f"{b.name}: verification_failed (tampered_payload): its reply was rejected (tampered_payload"
    )
    assert message in logs
    assert f"{c.name}: refused (strategy_not_allowed): refused by the site: strategy_not_allowed" in logs
    assert (
        logs.count("is below quorum") >= 1 and "round 2 (train) did not complete" in logs
    )  # the skip pointer
    record = read_record(fed.admin, fed.settings.models_bucket, exchange_run_id(run.run_id), 2)
    assert record is not None and not record.quorum_met
    assert not fed.admin.exists(
        fed.settings.models_bucket, f"federated/{exchange_run_id(run.run_id)}/metrics.json"
    )


def test_the_trigger_gives_up_at_the_deadline_and_the_silent_sites_are_named(federation):
    """No site polls: the trigger polls the real exchange until the round's deadline, then fires once; the
    decision names every site as having missed it (and the quorum error says so)."""
    import asyncio

    from lepton_airflow.answers_trigger import AnswersTrigger
    from lepton_tasks.core.messages import TrainerHParams
    from lepton_tasks.federation.coordinator import QuorumError, decide_round, send_jobs, start_run
    from lepton_tasks.federation.run_records import read_spec, round_deadline

    fed = federation
    bucket = fed.settings.models_bucket
    hp = TrainerHParams(
        local_epochs=1, local_only_epochs=1, batch_size=8, learning_rate=0.1, seed=1, fedprox_mu=0
    )
    spec = start_run(
        fed.admin,
        bucket,
        fed.registry,
        airflow_run_id=f"manual__deadline-{uuid.uuid4().hex[:6]}",
        consortium=CONSORTIUM,
        dataset="banks",
        sites=None,
        rounds=1,
        strategy="fedavg",
        min_partners=2,
        round_deadline_minutes=0.05,  # 3 s
        hparams=hp,
    )
    signer = TransitSigner.connect(
        fed.settings.vault_addr,
        json.loads(fed.env["AIRFLOW_CONN_LEPTON_VAULT"])["password"],
        fed.env["LEPTON_COORDINATOR_KEY_NAME"],
    )
    sent = send_jobs(fed.admin, bucket, signer, fed.registry, read_spec(fed.admin, bucket, spec.run_id), 0)
    classpath, kwargs = AnswersTrigger(spec.run_id, 0, round_deadline(sent).isoformat(), 0.5).serialize()
    assert classpath == "lepton_airflow.answers_trigger.AnswersTrigger"
    trigger = AnswersTrigger(**kwargs)  # what the triggerer rebuilds from the serialized form

    async def first_event() -> Any:
        return await anext(trigger.run())

    started = time.monotonic()
    event = asyncio.run(first_event())
    assert 1.0 < time.monotonic() - started < 30
    assert event.payload["ended"] == "deadline" and event.payload["round"] == 0
    assert event.payload["statuses"] == dict.fromkeys(fed.sites, "missing")
    with pytest.raises(QuorumError) as err:
        decide_round(fed.admin, bucket, fed.registry, spec.run_id, 0, coordinator_key=signer.public_key())
    for name in fed.sites:
        assert f"{name}: deadline_missed: no answer or refusal before the job expired" in str(err.value)
    for site in fed.sites.values():  # the jobs are left for the sites' next poll; they are stale by now
        site.tick()
