"""A coordinator and three sites run federated rounds through real SeaweedFS exchange buckets, signing with
real OpenBao transit keys, and every attack on the exchange excludes only the site it hits, with its reason.

Set-up (module fixture): the coordinator enrolls three sites (``enroll_site``: bucket ``exchange-<site>`` and
S3 credentials scoped to it through ``weed shell s3.configure``); each site imports its bundle
(``import_bundle``: confirms the coordinator's fingerprint, creates its own ed25519 key, writes its policy)
and the coordinator pins each site key after checking the fingerprint. Each site then talks to the exchange
only with its own credentials and signs only with a token restricted to its own key (``signer_policy``).
Sites train with a numpy stand-in (global weights + a per-site delta, ``n`` samples: the trainer itself is
tested elsewhere) and the coordinator aggregates with ``fedavg``; every round checks the aggregate exactly.

Rounds (each a test; rounds only increase, so any subset runs):

1. clean — all three accepted; site A's policy requires approval: it waits, then answers once approved;
2. forged job — A's job replaced by one signed with another Vault key: A rejects it (bad_signature), sends
   nothing; the coordinator reports A missing, "replaced after it was sent";
3. moved job — C's job removed and A's job copied into C's bucket: C rejects it (moved); C missing,
   "removed after it was sent";
4./5. withheld then replayed — B's round-4 job is held back (B missing, "removed"), then put back during
   round 5: B answers round 5 and rejects the stale round-4 job (replay);
6. tampered global weights — A refuses with a signed ``weights_tampered``, which reaches the report;
7. policy — the run asks for fedprox, which C's policy does not allow: C's signed ``strategy_not_allowed``;
8. tampered answer — B's answer edited in the bucket: rejected (tampered_payload);
9. swapped update — C's update blob replaced: rejected (the signed SHA-256 differs).

Then: each site's outbound log reconciles exactly with its bucket (the only differences are the objects the
attacks edited), the coordinator's registry holds no site credential, a site's credentials reach no other
site's bucket, and removing a site revokes them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import hvac
import numpy as np
import pytest
import yaml
from minio.error import S3Error

from lepton_tasks.adapters.signing import TransitSigner, signer_policy
from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core import weights
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.exchange import (
    JobHeader,
    MessageKind,
    canonical_json,
    make_header,
    object_key,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import RoundAnswer, RoundJob, TrainerHParams, dump
from lepton_tasks.core.outbound_log import ListedObject, OutboundLog, reconcile
from lepton_tasks.core.site_policy import Approval, DatasetGrant, SitePolicy, load_policy
from lepton_tasks.federation.aggregate import fedavg
from lepton_tasks.federation.enrollment import (
    EnrollmentBundle,
    SiteRegistry,
    enroll_site,
    pin_site_key,
    read_bundle,
    remove_site,
    write_bundle,
)
from lepton_tasks.federation.exchange import (
    ALL_SITES,
    RoundOutcome,
    collect_answers,
    send_round,
)
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site.enrollment import SiteIdentity, exchange_storage, import_bundle
from lepton_tasks.site.jobs import JobOutcome, JobStatus, handle_job, run_pending
from lepton_tasks.site.state import SiteState
from tests.integration.waiting import wait_live

pytestmark = pytest.mark.integration

CONSORTIUM = "credit-risk"
SHAPES = ((4, 3), (3,))
JOB_TTL = timedelta(hours=1)


@dataclass
class SiteRig:
    name: str
    bundle: EnrollmentBundle
    identity: SiteIdentity
    storage: Storage  # the site's own exchange credentials
    signer: TransitSigner  # a token that can only sign with the site's key
    policy: SitePolicy
    state: SiteState
    outbound: OutboundLog
    delta: float
    n: int

    @property
    def bucket(self) -> str:
        return self.bundle.bucket

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        assert global_weights is not None
        arrays, _ = weights.loads(global_weights)
        update = [a + np.float32(self.delta) for a in arrays]
        answer = RoundAnswer(mode="train", n_samples=self.n, metrics={"loss": round(1.0 / self.n, 6)})
        return answer, weights.dumps(update, {"site": self.name})

    def tick(self) -> list[JobOutcome]:
        """One poll; a job waiting for approval is approved by the site's human and handled again."""
        kwargs: dict[str, Any] = {
            "policy": self.policy,
            "state": self.state,
            "run_trainer": self.trainer,
            "signer": self.signer,
            "outbound_log": self.outbound,
        }
        outcomes = run_pending(self.storage, self.bucket, **kwargs)
        waiting = {o.key: True for o in outcomes if o.status is JobStatus.WAITING}
        if waiting:
            outcomes += run_pending(self.storage, self.bucket, approvals=waiting, **kwargs)
        return outcomes


@dataclass
class Rig:
    settings: Any
    admin: Storage
    root: Any
    identities: SeaweedIdentities
    coordinator: TransitSigner
    forger: TransitSigner
    registry: SiteRegistry
    sites: dict[str, SiteRig]
    run_id: str
    global_weights: list[np.ndarray]
    seen: set[uuid.UUID] = field(default_factory=set)
    #: site → objects the attacks edited in its bucket (reconciliation must flag exactly these)
    tampered: dict[str, set[str]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    def site(self, letter: str) -> SiteRig:
        return next(s for name, s in self.sites.items() if name.startswith(f"hosp-{letter}-"))


def _job(contract: Any, strategy: str = "fedavg") -> RoundJob:
    return RoundJob(
        mode="train",
        dataset="banks",
        contract=contract.document(),
        contract_sha256=contract.sha256,
        strategy=strategy,
        rounds=10,
        min_partners=2,
        hparams=TrainerHParams(
            local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.01, seed=1, fedprox_mu=0.0
        ),
    )


@pytest.fixture(scope="module")
def rig(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[Rig]:
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    root_dir = tmp_path_factory.mktemp("exchange")
    contract = load_contract("banks")
    identities = SeaweedIdentities(services.seaweedfs.shell)
    tokens: list[str] = []
    policies: list[str] = []
    keys: list[str] = []

    def restricted_signer(key_name: str, policy: str) -> TransitSigner:
        token = root_vault.client.auth.token.create(
            policies=[policy], no_default_policy=True, ttl="30m", renewable=False
        )["auth"]["client_token"]
        tokens.append(token)
        return TransitSigner(hvac.Client(url=settings.vault_addr, token=token, timeout=30), key_name)

    # the coordinator: its own signing key (not in the operator's lepton- prefix), a token that only signs
    coord_key, forger_key = f"sgn-coord-{suffix}", f"sgn-forger-{suffix}"
    keys += [coord_key, forger_key]
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    forger = TransitSigner.from_vault(root_vault, forger_key)
    forger.create_key()
    root_vault.write_policy(f"coord-signer-{suffix}", signer_policy(root_vault.transit_mount, coord_key))
    policies.append(f"coord-signer-{suffix}")
    coordinator = restricted_signer(coord_key, f"coord-signer-{suffix}")
    coordinator_fingerprint = coordinator.public_key().fingerprint  # what its operator reads out
    registry = SiteRegistry(root_dir / "coordinator" / "sites.yaml")

    sites: dict[str, SiteRig] = {}
    rig = None
    try:
        for letter, delta, n, strategies, approval in (
            ("a", 1.0, 100, ("fedavg", "fedprox"), Approval(required=True, deadline=timedelta(hours=1))),
            ("b", 2.0, 300, ("fedavg", "fedprox"), Approval(required=False)),
            ("c", 4.0, 600, ("fedavg",), Approval(required=False)),
        ):
            name = f"hosp-{letter}-{suffix}"
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
            write_bundle(bundle, site_dir / "bundle.json")  # handed over out of band
            bundle = read_bundle(site_dir / "bundle.json")
            identity = import_bundle(
                bundle,
                root_vault,  # stands in for the site's own Vault
                policy_path=site_dir / "policy.yaml",
                confirmed_coordinator_fingerprint=coordinator_fingerprint,
                key_name=f"sgn-site-{name}",
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256)],
                min_partners=2,
                allowed_strategies=strategies,
                approval=approval,
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            # the partner reads its fingerprint out; the coordinator's operator types it
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            sites[name] = SiteRig(
                name=name,
                bundle=bundle,
                identity=identity,
                storage=exchange_storage(bundle),
                signer=restricted_signer(identity.key_name, identity.vault_policy),
                policy=load_policy(site_dir / "policy.yaml"),
                state=SiteState(site_dir / "state.json"),
                outbound=OutboundLog(site_dir / "outbound.jsonl"),
                delta=delta,
                n=n,
            )
        for site in sites.values():
            wait_live(lambda s=site: list(s.storage.list(s.bucket)))
        rig = Rig(
            settings=settings,
            admin=admin_storage,
            root=root_vault,
            identities=identities,
            coordinator=coordinator,
            forger=forger,
            registry=registry,
            sites=sites,
            run_id=f"run-exchange-{suffix}",
            global_weights=[np.zeros(shape, np.float32) for shape in SHAPES],
        )
        print(f"\nexchange rig ready in {time.monotonic() - started:.1f} s")
        yield rig
    finally:
        for name in sites:
            if rig is None or name not in rig.removed:
                remove_site(registry, identities, name, admin_storage=admin_storage, delete_bucket=True)
            else:
                admin_storage.remove_bucket(sites[name].bucket)
        for token in tokens:
            root_vault.client.auth.token.revoke(token)
        for policy in policies:
            root_vault.delete_policy(policy)
        for key in keys:
            root_vault.delete_key(key)


# ------------------------------------------------------------------------------------------ the round


@dataclass
class Played:
    sent: dict[str, JobHeader]
    outcome: RoundOutcome
    at_sites: dict[str, list[JobOutcome]]


def play(
    rig: Rig,
    round_: int,
    *,
    strategy: str = "fedavg",
    before_sites: Callable[[dict[str, JobHeader]], None] | None = None,
    after_sites: Callable[[dict[str, JobHeader]], None] | None = None,
) -> Played:
    """Send a round, let every site poll once, collect (after the deadline if someone stays silent),
    aggregate the accepted updates with fedavg and check the result exactly."""
    contract = load_contract("banks")
    blob = weights.dumps(rig.global_weights, {"run": rig.run_id, "round": round_})
    sent = send_round(
        rig.admin,
        rig.coordinator,
        rig.registry,
        consortium=CONSORTIUM,
        run_id=rig.run_id,
        round=round_,
        jobs={name: _job(contract, strategy) for name in rig.sites if name not in rig.removed},
        blobs={ALL_SITES: blob},
        ttl=JOB_TTL,
    )
    if before_sites:
        before_sites(sent)
    at_sites = {name: site.tick() for name, site in rig.sites.items() if name not in rig.removed}
    if after_sites:
        after_sites(sent)
    collect = dict(seen_ids=rig.seen, coordinator_key=rig.coordinator.public_key())
    outcome = collect_answers(rig.admin, rig.registry, sent, **collect)
    if not outcome.complete:  # the trigger waits until the jobs expire, then the round is judged
        outcome = collect_answers(
            rig.admin, rig.registry, sent, now=max(h.expires_at for h in sent.values()), **collect
        )
    assert outcome.complete

    updates = outcome.updates()
    merged = fedavg(updates)
    n_total = sum(n for _, _, n in updates)
    shift = sum(rig.sites[site].delta * n for site, _, n in updates) / n_total
    for new, old in zip(merged, rig.global_weights, strict=True):
        np.testing.assert_allclose(new, old + shift, rtol=1e-6)
    rig.global_weights = merged
    rig.seen |= outcome.reply_ids
    return Played(sent, outcome, at_sites)


def _statuses(played: Played) -> dict[str, str]:
    return {site: out.status.value for site, out in played.outcome.sites.items()}


def _site_wrote(outcomes: list[JobOutcome]) -> list[str]:
    return [key for o in outcomes for key in o.written]


# --------------------------------------------------------------------------------------------- tests


def test_enrollment_pins_both_keys_and_the_registry_holds_no_site_credential(rig):
    text = rig.registry.path.read_text()
    assert rig.registry.path.stat().st_mode & 0o777 == 0o600
    for name, site in rig.sites.items():
        entry = rig.registry.get(name)
        assert entry.bucket == f"exchange-{name}" and entry.fingerprint == site.identity.fingerprint
        assert entry.pinned_key().public_key_b64 == site.signer.public_key().public_key_b64
        assert site.bundle.secret_key.get_secret_value() not in text
        assert site.bundle.access_key not in text
        assert site.policy.coordinator.public_key == rig.coordinator.public_key().public_key_b64
        # the site's signing token signs with the site key only
        with pytest.raises(Exception, match="HTTP 403"):
            TransitSigner(site.signer.client, rig.coordinator.key_name).sign(b"a job")
    assert set(yaml.safe_load(text)["sites"]) == set(rig.sites)


def test_a_sites_exchange_credentials_reach_no_other_sites_bucket(rig):
    a, b = rig.site("a"), rig.site("b")
    wait_live(lambda: a.storage.put_bytes(a.bucket, "probe/a.txt", b"mine"))
    assert a.storage.get_bytes(a.bucket, "probe/a.txt") == b"mine"
    assert [o.key for o in a.storage.list(a.bucket, "probe/")] == ["probe/a.txt"]
    rig.admin.put_bytes(b.bucket, "probe/b.txt", b"bravo's")
    with pytest.raises(StorageError, match="AccessDenied"):
        a.storage.get_bytes(b.bucket, "probe/b.txt")
    with pytest.raises(S3Error) as listing:
        list(a.storage.list(b.bucket))
    assert listing.value.code == "AccessDenied"
    with pytest.raises(S3Error) as write:
        a.storage.put_bytes(b.bucket, "answers/evil.json", b"{}")
    assert write.value.code == "AccessDenied"
    assert {bk.name for bk in a.storage.client.list_buckets()} == {a.bucket}
    with pytest.raises(S3Error):
        a.storage.client.make_bucket(f"exchange-squat-{uuid.uuid4().hex[:6]}")
    rig.admin.remove(a.bucket, "probe/a.txt")
    rig.admin.remove(b.bucket, "probe/b.txt")


def test_round_1_every_site_answers_and_the_approving_site_waits_for_its_human(rig):
    played = play(rig, 1)
    assert _statuses(played) == dict.fromkeys(rig.sites, "accepted")
    a = rig.site("a")
    assert [o.status for o in played.at_sites[a.name]] == [JobStatus.WAITING, JobStatus.ANSWERED]
    assert played.at_sites[a.name][0].written == ()  # nothing left the site before approval
    for site in rig.sites.values():
        answer = played.outcome.sites[site.name].answer
        assert answer is not None and answer.n_samples == site.n


def test_round_2_a_forged_job_is_rejected_by_its_site_and_excludes_only_it(rig):
    a = rig.site("a")

    def forge(sent: dict[str, JobHeader]) -> None:
        genuine = sent[a.name]
        payload = canonical_json(dump(_job(load_contract("banks"), strategy="krum")))
        header = make_header(
            MessageKind.JOB,
            consortium=CONSORTIUM,
            run_id=genuine.run_id,
            round=genuine.round,
            site=a.name,
            bucket=a.bucket,
            payload=payload,
            payload_schema=RoundJob.payload_schema,
            ttl=JOB_TTL,
            message_id=genuine.message_id,
        )
        rig.admin.put_bytes(a.bucket, object_key(genuine), seal(header, payload, rig.forger))

    played = play(rig, 2, before_sites=forge)
    [rejected] = played.at_sites[a.name]
    assert rejected.status is JobStatus.REJECTED and rejected.rejection is not None
    assert rejected.rejection["reason_code"] == "bad_signature" and rejected.written == ()
    assert _statuses(played) == {n: "missing" if n == a.name else "accepted" for n in rig.sites}
    assert "was replaced in" in played.outcome.excluded[a.name]
    assert list(played.outcome.excluded) == [a.name]


def test_round_3_a_job_moved_into_another_sites_bucket_is_rejected_there(rig):
    a, c = rig.site("a"), rig.site("c")

    def move(sent: dict[str, JobHeader]) -> None:
        rig.admin.remove(c.bucket, object_key(sent[c.name]))
        key = object_key(sent[a.name])
        rig.admin.put_bytes(c.bucket, key, rig.admin.get_bytes(a.bucket, key))

    played = play(rig, 3, before_sites=move)
    [moved] = played.at_sites[c.name]
    assert moved.status is JobStatus.REJECTED and moved.rejection is not None
    assert moved.rejection["reason_code"] == "moved" and moved.rejection["field"] == "header.site"
    assert moved.written == ()
    assert _statuses(played) == {n: "missing" if n == c.name else "accepted" for n in rig.sites}
    assert "removed after it was sent" in played.outcome.excluded[c.name]


def test_rounds_4_and_5_a_withheld_job_replayed_later_is_rejected_as_stale(rig):
    b = rig.site("b")
    withheld: dict[str, bytes] = {}

    def withhold(sent: dict[str, JobHeader]) -> None:
        key = object_key(sent[b.name])
        withheld[key] = rig.admin.get_bytes(b.bucket, key)
        rig.admin.remove(b.bucket, key)

    played = play(rig, 4, before_sites=withhold)
    assert played.at_sites[b.name] == []
    assert list(played.outcome.excluded) == [b.name]
    assert "removed after it was sent" in played.outcome.excluded[b.name]

    def replay(sent: dict[str, JobHeader]) -> None:
        for key, raw in withheld.items():
            rig.admin.put_bytes(b.bucket, key, raw)

    played = play(rig, 5, before_sites=replay)
    assert _statuses(played) == dict.fromkeys(rig.sites, "accepted")
    current, stale = played.at_sites[b.name]
    assert current.status is JobStatus.ANSWERED and current.header is not None and current.header.round == 5
    assert stale.status is JobStatus.REJECTED and stale.rejection is not None and stale.written == ()
    assert stale.rejection["reason_code"] == "replay" and stale.rejection["field"] == "header.round"

    # the round-5 job delivered again (a watcher that lost its state): a replay, nothing is sent twice
    key = object_key(played.sent[b.name])
    again = handle_job(
        rig.admin.get_bytes(b.bucket, key),
        key=key,
        policy=b.policy,
        state=b.state,
        run_trainer=b.trainer,
        signer=b.signer,
        storage=b.storage,
        bucket=b.bucket,
        outbound_log=b.outbound,
    )
    assert again.status is JobStatus.REJECTED and again.rejection is not None
    assert again.rejection["reason_code"] == "replay" and again.rejection["field"] == "header.message_id"
    assert again.written == ()


def test_round_6_tampered_global_weights_are_refused_with_a_signed_reason(rig):
    a = rig.site("a")

    def tamper(sent: dict[str, JobHeader]) -> None:
        key = next(o.key for o in rig.admin.list(a.bucket, f"jobs/{rig.run_id}/0006/") if "global-" in o.key)
        poisoned = weights.dumps([np.full(s, 1e6, np.float32) for s in SHAPES])
        rig.admin.put_bytes(a.bucket, key, poisoned)

    played = play(rig, 6, before_sites=tamper)
    [refused] = played.at_sites[a.name]
    assert refused.status is JobStatus.REFUSED and [r["code"] for r in refused.reasons] == [
        "weights_tampered"
    ]
    assert _statuses(played) == {n: "refused" if n == a.name else "accepted" for n in rig.sites}
    assert played.outcome.excluded[a.name].startswith("refused by the site: weights_tampered")


def test_round_7_a_site_whose_policy_refuses_the_strategy_sends_a_signed_refusal(rig):
    c = rig.site("c")
    played = play(rig, 7, strategy="fedprox")
    [refused] = played.at_sites[c.name]
    assert refused.status is JobStatus.REFUSED
    assert _statuses(played) == {n: "refused" if n == c.name else "accepted" for n in rig.sites}
    assert played.outcome.excluded == {
        c.name: "refused by the site: strategy_not_allowed (strategy): strategy 'fedprox' is not allowed "
        "here (allowed: fedavg)"
    }


def test_round_8_a_tampered_answer_is_rejected_by_the_coordinator(rig):
    b = rig.site("b")

    def tamper(sent: dict[str, JobHeader]) -> None:
        [key] = [
            o.key for o in rig.admin.list(b.bucket, f"answers/{rig.run_id}/0008/") if o.key.endswith(".json")
        ]
        doc = json.loads(rig.admin.get_bytes(b.bucket, key))
        answer = json.loads(base64.b64decode(doc["payload"]))
        answer["n_samples"] = 10**9  # to dominate the average
        doc["payload"] = base64.b64encode(canonical_json(answer)).decode()
        rig.admin.put_bytes(b.bucket, key, json.dumps(doc).encode())
        rig.tampered.setdefault(b.name, set()).add(key)

    played = play(rig, 8, after_sites=tamper)
    assert _statuses(played) == {n: "rejected" if n == b.name else "accepted" for n in rig.sites}
    rejection = played.outcome.sites[b.name].rejection
    assert rejection is not None and rejection.reason_code == "tampered_payload"
    assert played.outcome.excluded[b.name].startswith("its reply was rejected (tampered_payload, answers/")


def test_round_9_a_swapped_update_blob_is_rejected_by_the_coordinator(rig):
    c = rig.site("c")

    def swap(sent: dict[str, JobHeader]) -> None:
        [key] = [
            o.key
            for o in rig.admin.list(c.bucket, f"answers/{rig.run_id}/0009/")
            if o.key.endswith(".update")
        ]
        rig.admin.put_bytes(c.bucket, key, weights.dumps([np.full(s, 50.0, np.float32) for s in SHAPES]))
        rig.tampered.setdefault(c.name, set()).add(key)

    played = play(rig, 9, after_sites=swap)
    assert _statuses(played) == {n: "rejected" if n == c.name else "accepted" for n in rig.sites}
    rejection = played.outcome.sites[c.name].rejection
    assert rejection is not None and rejection.reason_code == "tampered_payload"
    assert "is not the one the signed answer names" in rejection.message


def test_each_sites_outbound_log_reconciles_exactly_with_its_bucket(rig):
    for name, site in rig.sites.items():
        listing = [
            ListedObject(o.key, o.size, sha256_hex(rig.admin.get_bytes(site.bucket, o.key)))
            for o in rig.admin.list(site.bucket)
        ]
        records = site.outbound.records()
        assert site.outbound.path.stat().st_mode & 0o777 == 0o600
        assert all(r.bucket == site.bucket for r in records)
        diff = reconcile(records, listing, bucket=site.bucket)
        assert not diff.unlogged and not diff.missing and not diff.overwritten, diff.summary()
        assert {m.key for m in diff.mismatched} == rig.tampered.get(name, set()), diff.summary()
        assert all(m.field == "sha256" or m.field == "size" for m in diff.mismatched)
        # and nothing the site logged is outside what it is allowed to write
        assert all(r.object_key.startswith(("answers/", "refusals/")) for r in records)


def test_removing_a_site_revokes_its_exchange_credentials(rig):
    c = rig.site("c")
    remove_site(rig.registry, rig.identities, c.name)
    rig.removed.add(c.name)
    assert c.name not in rig.registry.load()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            list(c.storage.list(c.bucket))
        except S3Error as exc:
            assert exc.code in ("InvalidAccessKeyId", "AccessDenied")
            break
        time.sleep(0.25)
    else:
        pytest.fail("the removed site's credentials still list its bucket after 15 s")


def test_sites_never_held_the_coordinators_credentials(rig):
    """What a site was given is its bundle: its own bucket's credentials and the coordinator's PUBLIC key."""
    for site in rig.sites.values():
        doc = site.bundle.document()
        assert set(doc) == set(EnrollmentBundle.model_fields)
        assert rig.settings.s3_secret_key.get_secret_value() not in json.dumps(doc)
        assert doc["access_key"] != rig.settings.s3_access_key
