"""Secure aggregation in the coordinator's DAG (``lepton_federated`` with ``secure_aggregation``) under
``dag.test()``, against real SeaweedFS exchange buckets and real OpenBao keys, with four sites answering
from a background thread through the SITE LIBRARY (``site.jobs.handle_job`` with each site's
``site.secagg.SiteExchange``: its own signing token, and its round secrets and held input encrypted under
an ``aes256-gcm96`` transit key of its own, through a token that may only encrypt and decrypt with it).

Set-up as in tests/integration/test_federated_dag.py: the coordinator signs with a token restricted to its
key; four sites are enrolled, import their bundles and are pinned; one OpenBao stands in for every
organization's Vault. The numpy stand-in trainer: statistics → fixed counts, train → global + the site's
delta, evaluate → a score histogram.

- ``sec-a``'s policy requires secure aggregation: it answers the secure run and refuses a plain one;
- ``sec-d`` goes silent in round 2 after it sent its shares (before masking): the round completes with a,
  b, c once d's masking deadline passed, the coordinator removes d's masks (a dropout recovered, reported in
  metrics.json), and d is back for the evaluation;
- the global weights after each train round are the plain weighted FedAvg of the surviving sites' updates
  within the update codec's documented bound, and no site's update, statistics or ``.update`` blob is in
  any exchange bucket;
- a strategy that needs individual updates (median) under secure aggregation fails ``start`` with one
  clear message, before any job is sent.
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
from lepton_tasks.core.exchange import parse_object_key
from lepton_tasks.core.features import NumericStats, SufficientStats
from lepton_tasks.core.messages import RoundAnswer, RoundJob
from lepton_tasks.core.metrics import score_summary
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.site_policy import Approval, DatasetGrant, load_policy
from lepton_tasks.federation.coordinator import send_jobs, start_run
from lepton_tasks.federation.enrollment import SiteRegistry, enroll_site, pin_site_key, remove_site
from lepton_tasks.federation.run_records import exchange_run_id, read_record, read_spec
from lepton_tasks.federation.secagg import FixedPoint
from lepton_tasks.federation.secagg_driver import SECAGG_UPDATE_CLIP
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site.enrollment import exchange_storage, import_bundle
from lepton_tasks.site.jobs import JobStatus, handle_job, poll_jobs
from lepton_tasks.site.secagg import SiteExchange, SiteStepStatus, VaultSecretBox
from lepton_tasks.site.state import SiteState
from tests.conftest import REPO
from tests.integration.waiting import wait_live

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONSORTIUM = "sec-dag"
DROP_ROUND = 2


@dataclass
class SimSite:
    name: str
    bucket: str
    storage: Any
    signer: TransitSigner
    policy: Any
    state: SiteState
    outbound: OutboundLog
    secagg: SiteExchange
    delta: float
    n: int
    #: the round after whose shares the site answers no more job of that round (a dropout before masking)
    stop_after_shares: int | None = None
    stopped: bool = False
    outcomes: list[tuple[str, int, str, str]] = field(default_factory=list)

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
        """One poll of the exchange, as ``site.jobs.run_pending`` does it — except that a site that dropped
        out of a round's aggregation leaves that round's later jobs unanswered (back for the next round)."""
        handled = self.state.read().handled
        for key in poll_jobs(self.storage, self.bucket, last_seen=handled):
            if self.stopped and parse_object_key(key).round == self.stop_after_shares:
                continue
            out = handle_job(
                self.storage.get_bytes(self.bucket, key),
                key=key,
                policy=self.policy,
                state=self.state,
                run_trainer=self.trainer,
                signer=self.signer,
                storage=self.storage,
                bucket=self.bucket,
                outbound_log=self.outbound,
                secagg=self.secagg,
            )
            if out.header is None:
                continue
            what = out.secagg.phase.value if out.secagg is not None else "job"
            self.outcomes.append((out.header.run_id, out.header.round, what, out.status.value))
            if (
                out.secagg is not None
                and out.secagg.phase.value == "shares"
                and out.secagg.status is SiteStepStatus.ANSWERED
                and out.header.round == self.stop_after_shares
            ):
                self.stopped = True


@dataclass
class Federation:
    settings: Any
    admin: Storage
    registry: SiteRegistry
    coordinator: TransitSigner
    sites: dict[str, SimSite]
    errors: list[BaseException] = field(default_factory=list)

    def site(self, letter: str) -> SimSite:
        return next(s for n, s in self.sites.items() if n.startswith(f"sec-{letter}-"))


@pytest.fixture(scope="module")
def federation(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[Federation]:
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    root_dir = tmp_path_factory.mktemp("secure-federated")
    coordinator_dir = root_dir / "coordinator"
    contract = load_contract("banks")
    identities = SeaweedIdentities(services.seaweedfs.shell)
    tokens: list[str] = []
    policies: list[str] = []
    keys: list[str] = []

    def restricted(policy: str) -> tuple[str, hvac.Client]:
        token = root_vault.client.auth.token.create(
            policies=[policy], no_default_policy=True, ttl="30m", renewable=False
        )["auth"]["client_token"]
        tokens.append(token)
        return token, hvac.Client(url=settings.vault_addr, token=token, timeout=30)

    coord_key = f"sgn-seccoord-{suffix}"
    keys.append(coord_key)
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    root_vault.write_policy(f"seccoord-{suffix}", signer_policy(root_vault.transit_mount, coord_key))
    policies.append(f"seccoord-{suffix}")
    coord_token, coord_client = restricted(f"seccoord-{suffix}")
    coordinator = TransitSigner(coord_client, coord_key)
    registry = SiteRegistry(coordinator_dir / "sites.yaml")

    sites: dict[str, SimSite] = {}
    saved: dict[str, str | None] = {}
    try:
        for letter, delta, n in (("a", 1.0, 100), ("b", 2.0, 300), ("c", 4.0, 600), ("d", 8.0, 1000)):
            name = f"sec-{letter}-{suffix}"
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
            identity = import_bundle(
                bundle,
                root_vault,  # stands in for the site's own Vault
                policy_path=site_dir / "policy.yaml",
                confirmed_coordinator_fingerprint=coordinator.public_key().fingerprint,
                key_name=f"sgn-secsite-{name}",
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256)],
                min_partners=1,
                allowed_strategies=("fedavg",),
                require_secure_aggregation=letter == "a",
                approval=Approval(required=False),
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            # the site's at-rest key for its round secrets and held input, and a token that may only use it
            box_key = f"lepton-secagg-{name}"
            root_vault.ensure_key(box_key)
            keys.append(box_key)
            mount = root_vault.transit_mount
            root_vault.write_policy(
                box_key,
                f'path "{mount}/encrypt/{box_key}" {{ capabilities = ["update"] }}\n'
                f'path "{mount}/decrypt/{box_key}" {{ capabilities = ["update"] }}\n',
            )
            policies.append(box_key)
            policy = load_policy(site_dir / "policy.yaml")
            storage = exchange_storage(bundle)
            signer = TransitSigner(restricted(identity.vault_policy)[1], identity.key_name)
            outbound = OutboundLog(site_dir / "outbound.jsonl")
            sites[name] = SimSite(
                name=name,
                bucket=bundle.bucket,
                storage=storage,
                signer=signer,
                policy=policy,
                state=SiteState(site_dir / "state.json"),
                outbound=outbound,
                secagg=SiteExchange.from_policy(
                    policy,
                    storage=storage,
                    bucket=bundle.bucket,
                    signer=signer,
                    outbound_log=outbound,
                    box=VaultSecretBox(restricted(box_key)[1], box_key, transit_mount=mount),
                    state_dir=site_dir,
                ),
                delta=delta,
                n=n,
            )
        for site in sites.values():
            wait_live(lambda s=site: list(s.storage.list(s.bucket)))

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
        print(f"\nsecure federation ready in {time.monotonic() - started:.1f} s")
        yield Federation(settings, admin_storage, registry, coordinator, sites)
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEPTON_ROLE", "coordinator")
        bag = DagBag(dag_folder=str(REPO / "dags"))
        assert bag.import_errors == {}
        yield bag.get_dag("lepton_federated")


@pytest.fixture
def sites_running(federation) -> Iterator[Federation]:
    """The four sites poll their exchange buckets every 0.2 s while the DAG runs (a thread)."""
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


def _conf(**over: Any) -> dict[str, Any]:
    return {
        "dataset": "banks",
        "rounds": 2,
        "strategy": "fedavg",
        "min_partners": 3,
        "round_deadline_minutes": 0.5,
        "poll_seconds": 0.3,
        "local_epochs": 1,
        "secure_aggregation": True,
        **over,
    }


def _task_states(run_id: str) -> dict[str, str | None]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        return {
            ti.task_id: ti.state for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run_id)
        }


def _all_objects(fed: Federation) -> dict[str, list[str]]:
    return {s.bucket: [o.key for o in fed.admin.list(s.bucket, "")] for s in fed.sites.values()}


def test_a_secure_run_sums_the_updates_recovers_a_dropout_and_no_update_crosses(
    federated_dag, sites_running, capfd
):
    fed = sites_running
    a, b, c, d = (fed.site(x) for x in "abcd")
    d.stop_after_shares = DROP_ROUND  # d shares its keys in round 2, then answers nothing more of round 2
    started = time.monotonic()
    run = federated_dag.test(run_conf=_conf())
    elapsed = time.monotonic() - started
    logs = "".join(capfd.readouterr())
    print(f"secure federated run: {elapsed:.1f} s")

    states = _task_states(run.run_id)
    assert run.state == "success", {k: v for k, v in states.items() if v != "success"}
    assert states["publish"] == "success"
    run_id = exchange_run_id(run.run_id)
    assert d.stopped and (run_id, DROP_ROUND, "shares", "answered") in d.outcomes
    bucket = fed.settings.models_bucket
    assert read_spec(fed.admin, bucket, run_id).secure_aggregation
    records = {k: read_record(fed.admin, bucket, run_id, k) for k in range(4)}
    assert all(r is not None and r.quorum_met for r in records.values())
    everyone = sorted(s.name for s in (a, b, c, d))
    survivors = sorted(s.name for s in (a, b, c))
    assert {k: r.accepted for k, r in records.items() if r is not None} == {
        0: everyone,
        1: everyone,
        2: survivors,
        3: everyone,  # d is back for the evaluation
    }
    r0, r1, r2 = records[0], records[1], records[2]
    assert r0 is not None and r1 is not None and r2 is not None
    assert r0.secure_aggregation is not None and r0.secure_aggregation["purpose"] == "statistics"
    assert r1.secure_aggregation is not None and r1.secure_aggregation["recovered"] == []
    assert r2.secure_aggregation is not None and r2.secure_aggregation["recovered"] == [d.name]
    assert r2.secure_aggregation["survivors"] == survivors
    dropped = next(e for e in r2.exclusions if e.site == d.name)
    assert dropped.code == "secagg_dropout" and "its masks were removed" in dropped.reason

    # the merged statistics are the exact sum of the four sites' counts
    from lepton_tasks.core.messages import MergedStatistics, RunMetrics, load

    raw = fed.admin.get_bytes(bucket, f"federated/{run_id}/stats.json")
    stats = load(MergedStatistics, raw, where="stats.json").statistics
    assert stats.rows == sum(s.n for s in (a, b, c, d))
    assert stats.label_counts == {"No": sum(s.n for s in (a, b, c, d)) - 4, "Yes": 4}

    # each round's global weights: the plain weighted FedAvg of the summed sites, within the codec's bound
    max_rows = load_contract("banks").rows.max
    bound = FixedPoint(clip=SECAGG_UPDATE_CLIP, max_sites=4, bits=64, max_samples=max_rows).error_bound(1)
    assert r1.secure_aggregation["error_bound"] == pytest.approx(bound)
    w = {
        k: weights.loads(fed.admin.get_bytes(bucket, f"federated/{run_id}/round-{k:04d}/global.npz"))[0]
        for k in (0, 1, 2)
    }
    for k, members in ((1, (a, b, c, d)), (2, (a, b, c))):
        shift = sum(s.n * s.delta for s in members) / sum(s.n for s in members)
        for got, prev in zip(w[k], w[k - 1], strict=True):
            plain = (prev.astype(np.float64) + np.float32(shift)).astype(np.float32)
            np.testing.assert_allclose(
                got, plain, rtol=0, atol=bound + 1e-5 * max(1.0, float(np.abs(plain).max()))
            )

    # what crossed: no update blob, no statistics or update in any answer; masked inputs only
    objects = _all_objects(fed)
    for bucket_name, keys in objects.items():
        assert not [k for k in keys if k.endswith(".update")], bucket_name
        assert [k for k in keys if k.endswith(".masked")], bucket_name
        for key in keys:
            if key.startswith("answers/") and key.endswith(".json"):
                doc = json.loads(fed.admin.get_bytes(bucket_name, key))
                if doc["header"]["payload_schema"] == RoundAnswer.payload_schema:
                    payload = json.loads(base64.b64decode(doc["payload"]))
                    assert payload.get("update") is None and payload.get("statistics") is None, key

    # no site's sample count crossed on its own: no answer of a site holds its count anywhere (the
    # evaluation's histogram bins, indices and held-out counts, are left out of the scan: no training count)
    for s in (a, b, c, d):
        answers = _answers(fed, s.bucket)
        assert {p["mode"] for p in answers} == {"statistics", "train", "evaluate"}, s.name
        for payload in answers:
            assert payload["n_samples"] is None, (s.name, payload["mode"])
            assert s.n not in set(_numbers(payload)), (s.name, payload)
    # the coordinator worked without them: each round's total comes from the unmasked sum
    assert [records[k].samples_total for k in (0, 1, 2)] == [  # type: ignore[union-attr]
        sum(s.n for s in (a, b, c, d)),
        sum(s.n for s in (a, b, c, d)),
        sum(s.n for s in (a, b, c)),
    ]
    for k in (0, 1, 2):
        assert all("n" not in m for m in records[k].metrics.values()), k  # type: ignore[union-attr]

    metrics = load(
        RunMetrics, fed.admin.get_bytes(bucket, f"federated/{run_id}/metrics.json"), where="metrics"
    )
    assert metrics.privacy.secure_aggregation is True
    assert metrics.privacy.dropouts_recovered == 1
    assert [r.samples_total for r in metrics.rounds] == [1000 + 300 + 600 + 100, 100 + 300 + 600]
    page = fed.admin.get_bytes(bucket, f"federated/{run_id}/report.html").decode()
    assert page.count("hidden (secure aggregation)") == 4 + 3  # each site of each train round
    # each site's held inputs are erased once it revealed (d never revealed round 2: its input stays home)
    for s in (a, b, c):
        assert not list((s.secagg.root / run_id).glob("*.held")), s.name
    assert "secure aggregation" in logs


def _answers(fed: Federation, bucket: str) -> list[dict[str, Any]]:
    """The payloads of every round answer a site wrote into its exchange bucket."""
    out = []
    for key in (o.key for o in fed.admin.list(bucket, "answers/")):
        if key.endswith(".json"):
            doc = json.loads(fed.admin.get_bytes(bucket, key))
            if doc["header"]["payload_schema"] == RoundAnswer.payload_schema:
                out.append(json.loads(base64.b64decode(doc["payload"])))
    return out


def _numbers(doc: Any) -> Iterator[float]:
    """Every number in a JSON document, except a score histogram's bins (``pos``/``neg``)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k not in ("pos", "neg"):
                yield from _numbers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _numbers(v)
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield doc


def test_a_site_requiring_secure_aggregation_refuses_a_plain_run(federation):
    fed = federation
    a = fed.site("a")
    spec = start_run(
        fed.admin,
        fed.settings.models_bucket,
        fed.registry,
        airflow_run_id=f"manual__plain-{uuid.uuid4().hex[:8]}",
        consortium=CONSORTIUM,
        dataset="banks",
        sites=sorted(fed.sites),
        rounds=1,
        strategy="fedavg",
        min_partners=1,
        round_deadline_minutes=5,
        hparams=_hparams(),
    )
    assert not spec.secure_aggregation
    send_jobs(fed.admin, fed.settings.models_bucket, fed.coordinator, fed.registry, spec, 0)
    before = len(a.outcomes)
    a.tick()
    mine = [o for o in a.outcomes[before:] if o[0] == spec.run_id]
    assert mine == [(spec.run_id, 0, "job", JobStatus.REFUSED.value)]
    refusals = [
        k
        for k in (o.key for o in fed.admin.list(a.bucket, f"refusals/{spec.run_id}/"))
        if k.endswith(".json")
    ]
    assert len(refusals) == 1
    raw = fed.admin.get_bytes(a.bucket, refusals[0])
    reasons = json.loads(base64.b64decode(json.loads(raw)["payload"]))["reasons"]
    assert [r["code"] for r in reasons] == ["secure_aggregation_required"]


def _hparams() -> Any:
    from lepton_tasks.core.messages import TrainerHParams

    return TrainerHParams(
        local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.01, seed=1, fedprox_mu=0.0
    )


def test_median_under_secure_aggregation_fails_start_before_any_job(federated_dag, federation, capfd):
    run = federated_dag.test(run_conf=_conf(strategy="median"))
    logs = "".join(capfd.readouterr())
    states = _task_states(run.run_id)
    assert run.state == "failed"
    assert [t for t, s in states.items() if s == "failed"] == ["start"]
    assert (
        "strategy 'median' needs every site's individual update, but under secure aggregation the "
        "coordinator learns only their sum: choose fedavg or fedprox, or run without secure aggregation"
    ) in logs
    run_id = exchange_run_id(run.run_id)
    for site in federation.sites.values():
        assert not list(federation.admin.list(site.bucket, f"jobs/{run_id}/")), site.name
    assert not federation.admin.exists(federation.settings.models_bucket, f"federated/{run_id}/run.json")
