"""A site enforces its own privacy budget through the real exchange: SeaweedFS buckets, OpenBao signatures.

Set-up as in tests/integration/test_exchange_round.py: the coordinator enrolls two sites (bucket
``exchange-<site>``, credentials scoped to it), each site imports its bundle, creates its own ed25519 key in
Vault and writes its policy; the coordinator pins each site's key. Site A's policy gives the ``banks`` dataset
a small budget (eps = 2.45 at delta = 1e-5); site B has none. The run trains with DP-SGD (sigma = 1.0, batch
32, one local epoch, 3 rounds) and site A holds 1,200 records, so each of its rounds costs eps = 1.838 alone;
with the run's first round A also reserves the evaluation's release (round 4: evaluation eps 1, sigma 4.05),
and the rounds and the reservation compose (RDP) to 2.045 after one round, 2.339 after two and 2.588 after
three: site A answers rounds 1 and 2 and refuses round 3 with a signed ``budget_exhausted``, BEFORE training
(its trainer is not called), which the coordinator's ``collect_answers`` names as the reason A left the round;
B answers every round, so the run goes on. The evaluation round (round 4) is a Gaussian release of each site's
score histogram at sigma 4.05: site A answers it (the release was reserved: it costs nothing more), and
so does site B, without a budget; both with the noisy histogram only, which the coordinator's merge accepts.

The sites train with a numpy stand-in (the trainer itself is tested in tests/unit/trainer) that reports the
charge the real trainer computes (``core.privacy.planned_charge``). After the run, site A's ledger file
(beside its state, mode 0600) holds exactly the charges of the answers the coordinator accepted from it, and
what it spent is those charges composed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import hvac
import numpy as np
import pytest

from lepton_tasks.adapters.signing import TransitSigner, signer_policy
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.core import metrics, privacy, weights
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.messages import (
    DPTraining,
    EvalResult,
    PrivacyCharge,
    RoundAnswer,
    RoundJob,
    TrainerHParams,
    dump,
)
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.site_policy import Approval, DatasetGrant, PrivacyBudget, SitePolicy, load_policy
from lepton_tasks.federation.enrollment import (
    EnrollmentBundle,
    SiteRegistry,
    enroll_site,
    pin_site_key,
    remove_site,
)
from lepton_tasks.federation.exchange import ALL_SITES, RoundOutcome, SiteStatus, collect_answers, send_round
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site.enrollment import exchange_storage, import_bundle
from lepton_tasks.site.jobs import JobOutcome, JobStatus, run_pending
from lepton_tasks.site.state import SiteState
from lepton_tasks.site.training import evaluation_answer
from tests.integration.waiting import wait_live

pytestmark = pytest.mark.integration

CONSORTIUM = "credit-risk"
SHAPES = ((4, 3), (3,))
JOB_TTL = timedelta(hours=1)
DP = DPTraining(noise_multiplier=1.0, l2_clip=1.0, delta=1e-5)
BATCH = 32
LIMIT = 2.45
#: the run's evaluation (round 4 of a 3-round run), reserved by site A with its first train charge
RESERVE_ROUND = 4


@dataclass
class Site:
    name: str
    bundle: EnrollmentBundle
    storage: Storage
    signer: TransitSigner
    policy: SitePolicy
    state: SiteState
    outbound: OutboundLog
    n: int
    delta: float
    trained: list[int] = field(default_factory=list)

    @property
    def bucket(self) -> str:
        return self.bundle.bucket

    def sample_count(self, job: RoundJob) -> int:
        return self.n

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        """A numpy stand-in for DP-SGD that reports the charge the real trainer computes for its data; an
        evaluation is the site's own (``site.training.evaluation_answer``) of a fixed held-out set."""
        assert global_weights is not None and job.hparams.dp is not None
        self.trained.append(len(self.trained) + 1)
        if job.mode == "evaluate":
            return evaluation_answer(
                _eval_result(self.n), local_run="x", partner="p", dp=job.hparams.dp
            ), None
        arrays, _ = weights.loads(global_weights)
        charge = privacy.planned_charge(
            job.hparams.dp, self.n, job.hparams.batch_size, job.hparams.local_epochs
        )
        answer = RoundAnswer(mode="train", n_samples=self.n, metrics={"loss": 0.5}, privacy=charge)
        return answer, weights.dumps([a + np.float32(self.delta) for a in arrays], {"site": self.name})

    def tick(self) -> list[JobOutcome]:
        return run_pending(
            self.storage,
            self.bucket,
            policy=self.policy,
            state=self.state,
            run_trainer=self.trainer,
            signer=self.signer,
            outbound_log=self.outbound,
            sample_count=self.sample_count,
        )


@dataclass
class Rig:
    admin: Storage
    coordinator: TransitSigner
    registry: SiteRegistry
    a: Site
    b: Site
    run_id: str
    global_weights: list[np.ndarray]
    seen: set[uuid.UUID] = field(default_factory=set)
    outcomes: list[RoundOutcome] = field(default_factory=list)


def _eval_result(n: int) -> dict[str, Any]:
    """The trainer's evaluation of ``n`` held-out rows (a fixed draw: the exact data)."""
    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.2).astype(float)
    p = 1 / (1 + np.exp(-rng.normal(-1.5 + 1.6 * y, 1.0)))
    block = {**metrics.binary_metrics(y, p), "score_summary": metrics.score_summary(y, p)}
    result = EvalResult(partner="p", run_id="x", global_=block, rows={"train": n, "holdout": n})
    return dump(result)


def _job(contract: Any, mode: Literal["train", "evaluate"] = "train") -> RoundJob:
    return RoundJob(
        mode=mode,
        dataset="banks",
        contract=contract.document(),
        contract_sha256=contract.sha256,
        strategy="fedavg",
        rounds=RESERVE_ROUND - 1,
        min_partners=1,
        hparams=TrainerHParams(
            local_epochs=1,
            local_only_epochs=1,
            batch_size=BATCH,
            learning_rate=0.01,
            seed=1,
            fedprox_mu=0.0,
            dp=DP,
        ),
    )


@pytest.fixture(scope="module")
def rig(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[Rig]:
    suffix = uuid.uuid4().hex[:6]
    root_dir = tmp_path_factory.mktemp("site-privacy")
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

    coord_key = f"sgn-dpcoord-{suffix}"
    keys.append(coord_key)
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    root_vault.write_policy(f"dpcoord-signer-{suffix}", signer_policy(root_vault.transit_mount, coord_key))
    policies.append(f"dpcoord-signer-{suffix}")
    coordinator = restricted_signer(coord_key, f"dpcoord-signer-{suffix}")
    registry = SiteRegistry(root_dir / "coordinator" / "sites.yaml")

    made: dict[str, Site] = {}
    try:
        for letter, n, delta, budget in (
            ("a", 1200, 1.0, PrivacyBudget(epsilon=LIMIT, delta=1e-5)),
            ("b", 3000, 2.0, None),
        ):
            name = f"dp-{letter}-{suffix}"
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
                key_name=f"sgn-site-{name}",
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256, privacy_budget=budget)],
                min_partners=1,
                allowed_strategies=("fedavg",),
                approval=Approval(required=False),
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            made[letter] = Site(
                name=name,
                bundle=bundle,
                storage=exchange_storage(bundle),
                signer=restricted_signer(identity.key_name, identity.vault_policy),
                policy=load_policy(site_dir / "policy.yaml"),  # the budget went through the policy file
                state=SiteState(site_dir / "state.json"),
                outbound=OutboundLog(site_dir / "outbound.jsonl"),
                n=n,
                delta=delta,
            )
        for site in made.values():
            wait_live(lambda s=site: list(s.storage.list(s.bucket)))
        yield Rig(
            admin=admin_storage,
            coordinator=coordinator,
            registry=registry,
            a=made["a"],
            b=made["b"],
            run_id=f"run-dp-{suffix}",
            global_weights=[np.zeros(shape, np.float32) for shape in SHAPES],
        )
    finally:
        for site in made.values():
            remove_site(registry, identities, site.name, admin_storage=admin_storage, delete_bucket=True)
        for token in tokens:
            root_vault.client.auth.token.revoke(token)
        for policy in policies:
            root_vault.delete_policy(policy)
        for key in keys:
            root_vault.delete_key(key)


def play(
    rig: Rig, round_: int, mode: Literal["train", "evaluate"] = "train"
) -> tuple[RoundOutcome, dict[str, list[JobOutcome]]]:
    """Send a round to both sites, let each poll once, collect their replies (all arrive: none pending)."""
    blob = weights.dumps(rig.global_weights, {"run": rig.run_id, "round": round_})
    sent = send_round(
        rig.admin,
        rig.coordinator,
        rig.registry,
        consortium=CONSORTIUM,
        run_id=rig.run_id,
        round=round_,
        jobs={s.name: _job(load_contract("banks"), mode) for s in (rig.a, rig.b)},
        blobs={ALL_SITES: blob},
        ttl=JOB_TTL,
    )
    at_sites = {s.name: s.tick() for s in (rig.a, rig.b)}
    outcome = collect_answers(
        rig.admin, rig.registry, sent, seen_ids=rig.seen, coordinator_key=rig.coordinator.public_key()
    )
    assert outcome.complete, outcome.summary()
    rig.seen |= outcome.reply_ids
    rig.outcomes.append(outcome)
    return outcome, at_sites


def _reserve(rig: Rig) -> privacy.Charge:
    """The evaluation's release that site A reserves with its first train charge."""
    return privacy.evaluation_charge(DP, run_id=rig.run_id, rounds=RESERVE_ROUND - 1, dataset="banks")


def _charges(rig: Rig, site: Site) -> list[PrivacyCharge]:
    """The DP-SGD charges in the answers the coordinator accepted from ``site``, as it read them."""
    out = []
    for outcome in rig.outcomes[:3]:  # the training rounds
        res = outcome.sites[site.name]
        if res.status is SiteStatus.ACCEPTED:
            assert res.answer is not None and res.answer.privacy is not None
            out.append(res.answer.privacy)
    return out


def test_rounds_within_the_budget_are_answered_with_the_sites_ledger_totals(rig):
    charge = privacy.planned_charge(DP, rig.a.n, BATCH, 1)
    for round_ in (1, 2):
        outcome, _ = play(rig, round_)
        assert {s: o.status for s, o in outcome.sites.items()} == dict.fromkeys(
            (rig.a.name, rig.b.name), SiteStatus.ACCEPTED
        )
        answer = outcome.sites[rig.a.name].answer
        assert answer is not None and answer.privacy == charge and answer.budget is not None
        assert answer.budget.epsilon_limit == LIMIT
        assert answer.budget.epsilon_spent == pytest.approx(
            privacy.epsilon_of([charge] * round_ + [_reserve(rig)], 1e-5)
        )
        # site B has no budget: it reports its charge, no ledger
        b_answer = outcome.sites[rig.b.name].answer
        assert b_answer is not None and b_answer.privacy is not None and b_answer.budget is None
    assert rig.a.trained == [1, 2]


def test_the_round_over_budget_is_refused_with_budget_exhausted_and_the_coordinator_names_it(rig):
    outcome, at_sites = play(rig, 3)
    [refused] = at_sites[rig.a.name]
    assert refused.status is JobStatus.REFUSED
    assert rig.a.trained == [1, 2]  # refused before training
    assert [k for k in refused.written if k.endswith(".update")] == []  # no update left the site

    a = outcome.sites[rig.a.name]
    assert a.status is SiteStatus.REFUSED and [r["code"] for r in a.reasons] == ["budget_exhausted"]
    charge = privacy.planned_charge(DP, rig.a.n, BATCH, 1)
    reserve = _reserve(rig)
    spent, asked = privacy.epsilon_of([charge] * 2 + [reserve], 1e-5), charge.epsilon_this_update
    [reason] = a.reasons
    assert float(reason["epsilon_spent"]) == pytest.approx(spent, rel=1e-5)
    assert float(reason["epsilon_asked"]) == pytest.approx(asked, rel=1e-5)
    assert float(reason["epsilon_reserved"]) == 0  # reserved with round 1: counted in what is spent
    assert float(reason["epsilon_limit"]) == LIMIT
    composed = privacy.epsilon_of([charge] * 3 + [reserve], 1e-5)
    assert outcome.excluded == {
        rig.a.name: "refused by the site: budget_exhausted (hparams.dp): the privacy budget of dataset "
        f"'banks' has no room for this job and the run's evaluation: ε spent {spent:.4g}, this job asks "
        f"ε {asked:.4g}, the evaluation reserves ε 0 (round {RESERVE_ROUND}, σ = "
        f"{reserve.noise_multiplier:.4g}), ε {composed:.4g} composed with what is spent; ε limit {LIMIT:g} "
        f"at δ = 1e-05, ε remaining {LIMIT - spent:.4g} (σ = 1, q = {charge.sampling_rate:.4g}, "
        f"{charge.steps} steps)"
    }
    assert outcome.sites[rig.b.name].status is SiteStatus.ACCEPTED  # the run goes on with B


def test_the_sites_ledger_holds_exactly_the_charges_it_sent(rig):
    assert len(rig.outcomes) == 3, "run after the round tests"
    path = rig.a.state.ledger_path("banks")
    assert path.parent == rig.a.state.path.parent and path.stat().st_mode & 0o777 == 0o600
    ledger = privacy.load_ledger(path)
    sent = _charges(rig, rig.a)
    assert len(sent) == 2
    # the two rounds it sent, and the evaluation it reserved with the first (not released yet)
    assert [e.key for e in ledger.entries] == [(rig.run_id, 1), (rig.run_id, RESERVE_ROUND), (rig.run_id, 2)]
    updates = [e for e in ledger.entries if e.release == "update"]
    assert [(e.noise_multiplier, e.sampling_rate, e.steps) for e in updates] == [
        (c.noise_multiplier, c.sampling_rate, c.steps) for c in sent
    ]
    assert ledger.entries[1].same_charge(_reserve(rig))
    assert privacy.spent(ledger) == pytest.approx(privacy.epsilon_of([*sent, _reserve(rig)], 1e-5))
    # what the report shows for the run is the same number, built from what the coordinator received
    run = privacy.run_privacy(
        {
            s.name: [o.sites[s.name].answer for o in rig.outcomes if o.sites[s.name].answer]
            for s in (rig.a, rig.b)
        },
        dp=DP,
        secure_aggregation=False,
    )
    assert run.sites[rig.a.name].epsilon_run == pytest.approx(privacy.epsilon_of(sent, 1e-5))  # released
    assert run.sites[rig.a.name].epsilon_spent == pytest.approx(privacy.spent(ledger))  # + reserved
    assert run.sites[rig.a.name].epsilon_remaining == pytest.approx(LIMIT - privacy.spent(ledger))
    assert run.sites[rig.b.name].rounds_charged == 3 and run.sites[rig.b.name].epsilon_limit is None


def test_the_evaluation_is_reserved_charged_once_and_leaves_only_noisy(rig):
    assert len(rig.outcomes) == 3, "run after the round tests"
    before = privacy.load_ledger(rig.a.state.ledger_path("banks"))
    outcome, _ = play(rig, 4, "evaluate")

    # site A spent its budget on two rounds, but reserved the evaluation with the first: it answers, and
    # the release costs nothing more (its ledger is unchanged); what it sent is now what it spent
    a = outcome.sites[rig.a.name]
    assert a.status is SiteStatus.ACCEPTED and a.answer is not None and a.answer.evaluation is not None
    assert a.answer.privacy == privacy.gaussian_privacy_charge(privacy.evaluation_sigma(DP), DP.delta)
    assert a.answer.privacy.epsilon_this_update <= DP.evaluation_epsilon
    assert rig.a.trained == [1, 2, 3]  # two train rounds and the evaluation
    after = privacy.load_ledger(rig.a.state.ledger_path("banks"))
    assert after.entries == before.entries
    released = [*_charges(rig, rig.a), a.answer.privacy]
    assert privacy.spent(after) == pytest.approx(privacy.epsilon_of(released, 1e-5))
    assert privacy.spent(after) <= LIMIT

    # site B: the noisy histogram and the metrics computed from it, nothing exact
    b = outcome.sites[rig.b.name]
    assert b.status is SiteStatus.ACCEPTED and b.answer is not None and b.answer.evaluation is not None
    exact = EvalResult.model_validate(_eval_result(rig.b.n)).global_
    block = b.answer.evaluation
    sigma = privacy.evaluation_sigma(DP)  # calibrated from the run's evaluation epsilon (1): 4.05
    assert block["dp"]["mechanism"] == "gaussian" and block["dp"]["noise_multiplier"] == sigma
    assert block["score_summary"]["pos"] != exact["score_summary"]["pos"]
    assert b.answer.n_samples == block["n"] == block["score_summary"]["n"]
    merged = metrics.merge_score_summaries([block["score_summary"]])  # what the coordinator merges
    assert merged["auc"] == block["auc"] and merged["n"] == block["n"]
    # at sigma 4.05 on 3,000 rows the signed (unclamped) noisy counts give the AUC without bias, sd 0.03
    # (docs/benchmarks.md): 0.15 is 5 sd
    assert block["score_summary"]["noisy"] is True
    assert merged["auc"] == pytest.approx(exact["auc"], abs=0.15)
