"""Secure aggregation through real exchange buckets: five sites and a coordinator run the Bonawitz et al.
protocol over SeaweedFS with OpenBao transit signatures, and the coordinator learns only the sum.

Set-up (module fixture), as in tests/integration/test_exchange_round.py: the coordinator enrolls five sites
(bucket ``exchange-<site>``, S3 credentials scoped to it), each site imports its bundle (its own ed25519 key,
its policy pinning the coordinator's key) and the coordinator pins each site's key. Each site signs with a
token restricted to its own key and keeps its per-round secrets encrypted with an ``aes256-gcm96`` transit
key of its own (a second restricted token: encrypt and decrypt with that key only). One OpenBao stands in
for the six organizations' Vaults. Phases' deadlines run on a virtual clock (``Rig.later``), so a dropout is
a site that does not answer before the phase's job expires.

Rounds (each a test; rounds only increase):

1. update, weighted FedAvg: site D drops out after sharing its keys (before masking) and site E after
   sending its masked input (it never reveals); the coordinator's mean equals the plain weighted mean of
   A, B, C and E within the documented quantization bound, and no object any party can read in the exchange
   holds a site's float32 update, its unmasked ring input, or its X25519 private keys / self-mask seed;
2. the federated statistics (banks contract) through the same masked sum: every count exact, sums within
   their bounds;
3. below the threshold at unmasking, and 4. at masking: the aggregation fails naming the lost sites;
5. a tampered masked input is rejected (its signed SHA-256 differs) and that site recovered as a dropout;
6. a share addressed to another site is refused by its recipient with the reason, which the coordinator
   reports; forged, moved, tampered and replayed-from-another-round jobs are rejected by the site that finds
   them, with their reason, and the aggregation completes with the remaining three;
7. measured: 1 M parameters, 4 sites — bytes each site uploads per phase and the wall time of each phase.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac
import numpy as np
import pandas as pd
import pytest

from lepton_tasks.adapters.signing import TransitSigner, signer_policy
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.exchange import MessageKind, canonical_json, object_key, prefix_for
from lepton_tasks.core.features import SufficientStats, merge
from lepton_tasks.core.outbound_log import ListedObject, OutboundLog, reconcile
from lepton_tasks.core.secagg_messages import Purpose, SecAggInbox, UpdateLayout, seal_job
from lepton_tasks.core.site_policy import Approval, DatasetGrant, load_policy
from lepton_tasks.federation.enrollment import SiteRegistry, enroll_site, pin_site_key, remove_site
from lepton_tasks.federation.exchange import SiteStatus
from lepton_tasks.federation.secagg_round import (
    AggregationState,
    CoordinatorExchange,
    Phase,
    PhaseReplies,
    SecAggResult,
    SecAggRoundFailed,
    StatisticsCodec,
    UpdateCodec,
    advance,
    collect,
    finish,
    start,
    statistics_layout,
)
from lepton_tasks.ingest.clean import coerce_types
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site import secagg as site_secagg
from lepton_tasks.site.enrollment import exchange_storage, import_bundle
from lepton_tasks.site.secagg import SiteExchange, SiteStep, SiteStepStatus, VaultSecretBox
from tests.integration.waiting import wait_live

pytestmark = pytest.mark.integration

CONSORTIUM = "credit-risk"
TTL = timedelta(minutes=10)
SHAPES = [[6, 4], [4]]
CLIP = 8.0
MAX_SAMPLES = 1000


@dataclass
class Site:
    name: str
    ctx: SiteExchange
    n: int

    @property
    def bucket(self) -> str:
        return self.ctx.bucket


@dataclass
class Rig:
    admin: Storage
    coordinator: TransitSigner
    forger: TransitSigner
    exchange: CoordinatorExchange
    sites: dict[str, Site]
    run_id: str
    clock: datetime
    #: site → secrets captured while the site held them (round 1)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def site(self, letter: str) -> Site:
        return next(s for name, s in self.sites.items() if name.startswith(f"sa-{letter}-"))

    def letters(self, letters: str) -> list[Site]:
        return [self.site(x) for x in letters]

    def later(self) -> datetime:
        """Move the virtual clock past the current phase's deadline."""
        self.clock += TTL + timedelta(minutes=1)
        return self.clock


@pytest.fixture(scope="module")
def rig(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[Rig]:
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    root_dir = tmp_path_factory.mktemp("secagg")
    contract = load_contract("banks")
    identities = SeaweedIdentities(services.seaweedfs.shell)
    tokens: list[str] = []
    policies: list[str] = []
    keys: list[str] = []

    def restricted(policy: str) -> hvac.Client:
        token = root_vault.client.auth.token.create(
            policies=[policy], no_default_policy=True, ttl="30m", renewable=False
        )["auth"]["client_token"]
        tokens.append(token)
        return hvac.Client(url=settings.vault_addr, token=token, timeout=30)

    coord_key, forger_key = f"sgn-sacoord-{suffix}", f"sgn-saforger-{suffix}"
    keys += [coord_key, forger_key]
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    forger = TransitSigner.from_vault(root_vault, forger_key)
    forger.create_key()
    root_vault.write_policy(f"sacoord-signer-{suffix}", signer_policy(root_vault.transit_mount, coord_key))
    policies.append(f"sacoord-signer-{suffix}")
    coordinator = TransitSigner(restricted(f"sacoord-signer-{suffix}"), coord_key)
    registry = SiteRegistry(root_dir / "coordinator" / "sites.yaml")

    made: dict[str, Site] = {}
    try:
        for i, letter in enumerate("abcde"):
            name = f"sa-{letter}-{suffix}"
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
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256)],
                min_partners=3,
                allowed_strategies=("fedavg",),
                require_secure_aggregation=True,
                approval=Approval(required=False),
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            # the site's own at-rest key for its aggregation secrets, and a token that may only use it
            box_key, box_policy = f"sa-state-{name}", f"sa-state-{name}"
            root_vault.ensure_key(box_key)
            keys.append(box_key)
            mount = root_vault.transit_mount
            root_vault.write_policy(
                box_policy,
                f'path "{mount}/encrypt/{box_key}" {{ capabilities = ["update"] }}\n'
                f'path "{mount}/decrypt/{box_key}" {{ capabilities = ["update"] }}\n',
            )
            policies.append(box_policy)
            ctx = SiteExchange.from_policy(
                load_policy(site_dir / "policy.yaml"),
                storage=exchange_storage(bundle),
                bucket=bundle.bucket,
                signer=TransitSigner(restricted(identity.vault_policy), identity.key_name),
                outbound_log=OutboundLog(site_dir / "outbound.jsonl"),
                box=VaultSecretBox(restricted(box_policy), box_key, transit_mount=mount),
                state_dir=site_dir,
            )
            made[name] = Site(name=name, ctx=ctx, n=100 * (i + 1))
        for site in made.values():
            wait_live(lambda s=site: list(s.ctx.storage.list(s.bucket)))
        print(f"\nsecagg rig ready in {time.monotonic() - started:.1f} s")
        yield Rig(
            admin=admin_storage,
            coordinator=coordinator,
            forger=forger,
            exchange=CoordinatorExchange(admin_storage, coordinator, registry, CONSORTIUM),
            sites=made,
            run_id=f"run-secagg-{suffix}",
            clock=datetime.now(UTC),
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


# ----------------------------------------------------------------------------------------------- helpers


def _updates(seed: int, shapes: list[list[int]] = SHAPES, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, scale, size=s).astype(np.float32) for s in shapes]


@dataclass
class Played:
    state: AggregationState
    result: SecAggResult | None = None
    replies: dict[Phase, PhaseReplies] = field(default_factory=dict)
    steps: dict[Phase, dict[str, SiteStep]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0


Hook = Callable[[Played], None]


def play(
    rig: Rig,
    round_: int,
    *,
    mask: Callable[[Site], SiteStep],
    sites: list[Site] | None = None,
    purpose: Purpose = "update",
    layout: dict[str, Any] | None = None,
    skip: dict[Phase, set[str]] | None = None,
    between: dict[Phase, Hook] | None = None,
    after_sites: dict[Phase, Hook] | None = None,
    late: frozenset[Phase] = frozenset(),
) -> Played:
    """Run an aggregation. ``skip``: per phase, the sites that stay silent (dropouts); ``between``: a hook
    run after the coordinator sent a phase's jobs, before the sites act; ``after_sites``: one run after the
    sites acted, before the coordinator collects (attacks); ``late``: phases whose replies are collected
    after the deadline (someone is silent)."""
    sites = sites or list(rig.sites.values())
    skip, between, after_sites = skip or {}, between or {}, after_sites or {}
    layout = layout or {"update": UpdateLayout(shapes=SHAPES, clip=CLIP, max_samples=MAX_SAMPLES)}
    state = start(
        rig.exchange,
        run_id=rig.run_id,
        round=round_,
        purpose=purpose,
        sites=[s.name for s in sites],
        ttl=TTL,
        now=rig.clock,
        bits=64 if purpose == "statistics" else 32,
        **layout,
    )
    played = Played(state)
    where = {"run_id": rig.run_id, "round": round_}
    actions: dict[Phase, Callable[[Site], SiteStep]] = {
        Phase.KEYS: lambda s: site_secagg.join(s.ctx, **where, purpose=purpose, now=rig.clock),
        Phase.SHARES: lambda s: site_secagg.share(s.ctx, **where, purpose=purpose, now=rig.clock),
        Phase.MASKED: mask,
        Phase.REVEAL: lambda s: site_secagg.reveal(s.ctx, **where, purpose=purpose, now=rig.clock),
    }
    for phase in (Phase.KEYS, Phase.SHARES, Phase.MASKED, Phase.REVEAL):
        if phase in between:
            between[phase](played)
        played.steps[phase] = {}
        for s in sites:
            if s.name in skip.get(phase, set()) or s.name not in played.state.jobs:
                continue
            with played.timed(f"{phase.value}: sites"):
                played.steps[phase][s.name] = actions[phase](s)
        if phase in after_sites:
            after_sites[phase](played)
        now = rig.later() if phase in late else rig.clock
        with played.timed(f"{phase.value}: coordinator"):
            replies = collect(rig.exchange, played.state, now=now)
            assert replies.complete, replies.pending
            played.replies[phase] = replies
            if phase is Phase.REVEAL:
                played.result = finish(rig.exchange, played.state, replies)
            else:
                played.state = advance(rig.exchange, played.state, replies, now=now)
    return played


def mask_update_of(rig: Rig, round_: int, seed: int) -> Callable[[Site], SiteStep]:
    return lambda s: site_secagg.mask_update(
        s.ctx, run_id=rig.run_id, round=round_, arrays=_updates(seed + s.n), n_samples=s.n, now=rig.clock
    )


def weighted_mean(rig: Rig, names: list[str], seed: int) -> list[np.ndarray]:
    total = sum(rig.sites[n].n for n in names)
    return [
        sum(rig.sites[n].n * _updates(seed + rig.sites[n].n)[i].astype(np.float64) for n in names) / total
        for i in range(len(SHAPES))
    ]


def _strict_b64(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw and base64.b64encode(raw).decode() == text else None


def _views(data: bytes) -> list[bytes]:
    """Every form in which ``data`` could carry a secret: its bytes, an envelope's decoded payload, and every
    base64 string inside either (decoded)."""
    views = [data]
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return views
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and (raw := _strict_b64(item)) is not None:
            views.append(raw)
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                stack.append(json.loads(raw))
    return views


def _every_object(rig: Rig) -> dict[str, list[bytes]]:
    """``bucket/key`` → views of every object in every exchange bucket, as the coordinator reads them."""
    out = {}
    for site in rig.sites.values():
        for obj in rig.admin.list(site.bucket):
            out[f"{site.bucket}/{obj.key}"] = _views(rig.admin.get_bytes(site.bucket, obj.key))
    return out


def _needles(secret: bytes) -> list[bytes]:
    return [secret, base64.b64encode(secret), base64.b64encode(secret).rstrip(b"="), secret.hex().encode()]


def _windows(data: bytes, width: int = 16, stride: int = 4) -> list[bytes]:
    return [data[i : i + width] for i in range(0, len(data) - width + 1, stride)]


# ----------------------------------------------------------------------------------------------- rounds


def test_weighted_fedavg_recovers_a_dropout_before_masking_and_one_after(rig):
    a, b, c, d, e = rig.letters("abcde")

    def capture(played: Played) -> None:  # the sites' secrets, read from their own encrypted files
        for s in rig.sites.values():
            doc = site_secagg.read_aggregation(s.ctx, run_id=rig.run_id, round=1, purpose="update")
            assert doc is not None and doc.c_sk and doc.s_sk and doc.b
            rig.secrets[s.name] = {"c_sk": doc.c_sk, "s_sk": doc.s_sk, "b": doc.b}

    played = play(
        rig,
        1,
        mask=mask_update_of(rig, 1, seed=1),
        skip={Phase.MASKED: {d.name}, Phase.REVEAL: {e.name}},
        between={Phase.SHARES: capture},
        late=frozenset({Phase.MASKED, Phase.REVEAL}),
    )
    result = played.result
    assert result is not None and result.weights is not None and result.error_bound is not None
    assert result.survivors == tuple(sorted([a.name, b.name, c.name, e.name]))
    assert result.recovered == (d.name,) and result.unrevealed == (e.name,)
    assert set(result.excluded) == {d.name, e.name}
    assert result.excluded[d.name].startswith("masked: no reply before the phase's deadline")
    assert result.excluded[e.name].startswith("reveal: no reply before the phase's deadline")

    survivors = [a.name, b.name, c.name, e.name]
    n_total = sum(rig.sites[n].n for n in survivors)
    assert result.n_samples == n_total
    want = weighted_mean(rig, survivors, seed=1)
    step = UpdateCodec(played.state.update, 5, 32).fixed.step  # type: ignore[arg-type]
    assert result.error_bound == pytest.approx(step / 2, rel=1e-2)
    for got, exact in zip(result.weights, want, strict=True):
        assert got.shape == exact.shape
        assert np.abs(got - exact).max() <= result.error_bound
        # the weighted SUM, as the brief states the bound: within n_total x step / 2
        assert np.abs(got * n_total - exact * n_total).max() <= n_total * result.error_bound
    # a wrong survivor set is far outside the bound: the check above would catch a lost or extra site
    wrong = weighted_mean(rig, [a.name, b.name, c.name], seed=1)
    assert (
        max(np.abs(g - w).max() for g, w in zip(result.weights, wrong, strict=True))
        > 100 * result.error_bound
    )

    # each site's outbound log lists exactly what it wrote
    for s in rig.sites.values():
        listing = [
            ListedObject(o.key, o.size, hashlib.sha256(rig.admin.get_bytes(s.bucket, o.key)).hexdigest())
            for o in rig.admin.list(s.bucket)
        ]
        diff = reconcile(s.ctx.outbound_log.records(), listing, bucket=s.bucket)
        assert diff.ok, (s.name, diff.summary())


def test_no_object_in_the_exchange_holds_an_update_an_unmasked_input_or_a_private_key(rig):
    assert rig.secrets, "run after round 1"
    objects = _every_object(rig)
    assert len(objects) >= 40  # round 1: 19 jobs, 21 answers and blobs
    layout = UpdateLayout(shapes=SHAPES, clip=CLIP, max_samples=MAX_SAMPLES)
    for s in rig.sites.values():
        update = _updates(1 + s.n)
        plain = b"".join(a.tobytes() for a in update)
        ring = UpdateCodec(layout, 5, 32).encode(update, s.n).tobytes()
        needles = {
            "float32 update": [plain, *_windows(plain)],
            "unmasked ring input": [ring, *_windows(ring)],
        }
        for name, secret in rig.secrets[s.name].items():
            needles[name] = _needles(secret)
        for where, views in objects.items():
            for what, patterns in needles.items():
                hit = next((p for p in patterns for v in views if p in v), None)
                assert hit is None, f"{where} holds {s.name}'s {what}"
        # the secrets file at the site is encrypted at rest, and the secrets are gone once revealed
        path = s.ctx.path(rig.run_id, 1, "update")
        assert path.stat().st_mode & 0o777 == 0o600
        at_rest = path.read_bytes()
        for name, secret in rig.secrets[s.name].items():
            assert not any(p in at_rest for p in _needles(secret)), f"{s.name}'s {name} in plaintext at rest"
        doc = site_secagg.read_aggregation(s.ctx, run_id=rig.run_id, round=1, purpose="update")
        assert doc is not None
        if doc.status == "done":
            assert (doc.c_sk, doc.s_sk, doc.b, doc.received) == (None, None, None, {})

    # the scan finds what is there: every site's PUBLIC keys travel in the rosters
    rosters = [v for k, views in objects.items() for v in views if "/0001/" in k]
    for s in rig.sites.values():
        doc = site_secagg.read_aggregation(s.ctx, run_id=rig.run_id, round=1, purpose="update")
        assert doc is not None
        c_pk = next(k.c_pk for k in doc.roster) if doc.roster else None
        assert c_pk is not None and any(c_pk in v for v in rosters)


def _banks_frame(seed: int, n: int) -> pd.DataFrame:
    contract = load_contract("banks")
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "customer_id": [f"c{seed:02d}{i:05d}" for i in range(n)],
            "student": rng.choice(np.array(["No", "Yes", None], dtype=object), n),
            "balance": rng.uniform(0, 5000, n),
            "income": np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0, 250_000, n)),
            "default": rng.choice(["No", "Yes"], n, p=[0.9, 0.1]),
        }
    )
    return coerce_types(df, contract, object_key=f"banks/{seed}.csv")


def test_the_federated_statistics_go_through_the_same_masked_sum(rig):
    contract = load_contract("banks")
    stats = {
        s.name: SufficientStats.from_frame(_banks_frame(i, 30 + 7 * i), contract)
        for i, s in enumerate(rig.sites.values())
    }
    layout = statistics_layout(contract)
    played = play(
        rig,
        2,
        purpose="statistics",
        layout={"statistics": layout},
        mask=lambda s: site_secagg.mask_statistics(
            s.ctx, run_id=rig.run_id, round=2, statistics=stats[s.name], contract=contract, now=rig.clock
        ),
    )
    result = played.result
    assert result is not None and result.statistics is not None and result.statistics_error is not None
    plain = merge(stats.values())
    got = result.statistics
    # every count is exact: rows, labels, nulls, categories
    assert got.model_dump(exclude={"numeric"}) == plain.model_dump(exclude={"numeric"})
    for c, ns in plain.numeric.items():
        assert (got.numeric[c].count, got.numeric[c].null_count) == (ns.count, ns.null_count)
        assert abs(got.numeric[c].sum - ns.sum) <= result.statistics_error[f"{c}.sum"]
        assert abs(got.numeric[c].sum_sq - ns.sum_sq) <= result.statistics_error[f"{c}.sum_sq"]
    assert (
        StatisticsCodec(contract, layout, 5).length
        == played.replies[Phase.MASKED].accepted[rig.site("a").name].length
    )  # type: ignore[union-attr]


def test_below_the_threshold_at_unmasking_the_aggregation_fails_naming_the_sites(rig):
    c, d, e = rig.letters("cde")
    with pytest.raises(SecAggRoundFailed) as err:
        play(
            rig,
            3,
            mask=mask_update_of(rig, 3, seed=3),
            skip={Phase.REVEAL: {c.name, d.name, e.name}},
            late=frozenset({Phase.REVEAL}),
        )
    assert err.value.phase is Phase.REVEAL
    assert set(err.value.lost) == {c.name, d.name, e.name}
    text = str(err.value)
    assert "2 of the 5 survivors revealed their shares" in text and "the threshold is 3" in text
    for s in (c, d, e):
        assert f"{s.name}: reveal: no reply before the phase's deadline" in text


def test_below_the_threshold_at_masking_the_aggregation_fails_naming_the_sites(rig):
    b, c, d = rig.letters("bcd")
    with pytest.raises(SecAggRoundFailed) as err:
        play(
            rig,
            4,
            mask=mask_update_of(rig, 4, seed=4),
            skip={Phase.MASKED: {b.name, c.name, d.name}},
            late=frozenset({Phase.MASKED}),
        )
    assert err.value.phase is Phase.MASKED
    assert "2 of 5 sites sent a masked input" in str(err.value) and "threshold is 3" in str(err.value)
    assert set(err.value.lost) == {b.name, c.name, d.name}


def test_a_tampered_masked_input_is_rejected_and_its_site_recovered_as_a_dropout(rig):
    a = rig.site("a")

    def tamper(played: Played) -> None:  # after A wrote its masked vector, one bit of it flips in the bucket
        folder = prefix_for(MessageKind.ANSWER, rig.run_id, 5)
        [key] = [o.key for o in rig.admin.list(a.bucket, folder) if o.key.endswith(".masked")]
        blob = bytearray(rig.admin.get_bytes(a.bucket, key))
        blob[10] ^= 0x01
        rig.admin.put_bytes(a.bucket, key, bytes(blob))

    played = play(rig, 5, mask=mask_update_of(rig, 5, seed=5), after_sites={Phase.MASKED: tamper})
    masked = played.replies[Phase.MASKED].sites[a.name]
    assert masked.status is SiteStatus.REJECTED and masked.rejection is not None
    assert (masked.rejection.reason_code, masked.rejection.field) == (
        "tampered_payload",
        "payload.masked.sha256",
    )
    assert "is not the one the signed answer names" in masked.rejection.message
    result = played.result
    assert result is not None and result.weights is not None and result.error_bound is not None
    others = [s.name for s in rig.sites.values() if s is not a]
    assert result.survivors == tuple(sorted(others)) and result.recovered == (a.name,)
    assert result.excluded[a.name].startswith("masked: its reply was rejected (tampered_payload")
    for got, exact in zip(result.weights, weighted_mean(rig, others, seed=5), strict=True):
        assert np.abs(got - exact).max() <= result.error_bound


def _job_of(rig: Rig, site: Site, round_: int, schema: str) -> tuple[str, bytes]:
    """The key and bytes of ``site``'s job of ``schema`` in ``round_`` (read as the coordinator)."""
    for obj in rig.admin.list(site.bucket, prefix_for(MessageKind.JOB, rig.run_id, round_)):
        raw = rig.admin.get_bytes(site.bucket, obj.key)
        if json.loads(raw)["header"]["payload_schema"] == schema:
            return obj.key, raw
    raise AssertionError(f"no {schema} job for {site.name} in round {round_}")


def test_a_share_addressed_to_another_site_and_forged_moved_tampered_or_replayed_jobs(rig):
    a, b, c, d, e = rig.letters("abcde")
    schema = SecAggInbox.payload_schema
    forged_keys: dict[str, str] = {}

    def attacks(played: Played) -> None:
        # B: the coordinator relays A's share to B labelled as addressed to C (a coordinator bug or attack)
        key, raw = _job_of(rig, b, 6, schema)
        inbox = SecAggInbox.model_validate_json(base64.b64decode(json.loads(raw)["payload"]))
        shares = [
            s.model_copy(update={"recipient": c.name}) if s.sender == a.name else s for s in inbox.shares
        ]
        header, sealed = seal_job(
            inbox.model_copy(update={"shares": shares}),
            bucket=b.bucket,
            signer=rig.coordinator,
            ttl=TTL,
            now=rig.clock,
        )
        rig.admin.remove(b.bucket, key)
        rig.admin.put_bytes(b.bucket, object_key(header), sealed)
        played.state.jobs[b.name] = header  # the coordinator sent this one
        # C: a forged inbox (another Vault key) beside the genuine one
        inbox_c = SecAggInbox.model_validate_json(
            base64.b64decode(json.loads(_job_of(rig, c, 6, schema)[1])["payload"])
        )
        forged_header, forged = seal_job(inbox_c, bucket=c.bucket, signer=rig.forger, ttl=TTL, now=rig.clock)
        forged_keys[c.name] = object_key(forged_header)
        rig.admin.put_bytes(c.bucket, forged_keys[c.name], forged)
        # D: A's genuine inbox copied into D's bucket
        key_a, raw_a = _job_of(rig, a, 6, schema)
        rig.admin.put_bytes(d.bucket, key_a, raw_a)
        forged_keys[d.name] = key_a
        # E: its genuine inbox edited in place
        key_e, raw_e = _job_of(rig, e, 6, schema)
        doc = json.loads(raw_e)
        body = json.loads(base64.b64decode(doc["payload"]))
        body["shares"][0]["nonce"] = base64.b64encode(b"\x00" * 12).decode()
        doc["payload"] = base64.b64encode(canonical_json(body)).decode()
        rig.admin.put_bytes(e.bucket, key_e, canonical_json(doc))
        # A: its inbox of round 5 replayed into round 6's folder
        key_5, raw_5 = _job_of(rig, a, 5, schema)
        forged_keys[a.name] = key_5.replace("/0005/", "/0006/")
        rig.admin.put_bytes(a.bucket, forged_keys[a.name], raw_5)

    played = play(
        rig,
        6,
        mask=mask_update_of(rig, 6, seed=6),
        between={Phase.MASKED: attacks},
        late=frozenset({Phase.MASKED}),
    )
    steps = played.steps[Phase.MASKED]

    # B refuses, signed, with the reason; the coordinator reports it
    assert steps[b.name].status is SiteStepStatus.REFUSED
    [reason] = steps[b.name].reasons
    assert reason["code"] == "secagg_share_rejected"
    assert f"share from {a.name!r} is addressed to {c.name!r}" in reason["message"]
    refused = played.replies[Phase.MASKED].sites[b.name]
    assert refused.status is SiteStatus.REFUSED
    assert refused.reason is not None and f"is addressed to {c.name!r}" in refused.reason
    assert not [k for k in steps[b.name].written if k.endswith(".masked")]  # nothing masked left B

    def rejection(site: Site) -> dict[str, Any]:
        [r] = steps[site.name].rejections
        assert r["object_key"] == forged_keys.get(site.name, r["object_key"])
        return r

    assert steps[c.name].status is SiteStepStatus.ANSWERED and rejection(c)["reason_code"] == "bad_signature"
    assert steps[d.name].status is SiteStepStatus.ANSWERED
    assert (rejection(d)["reason_code"], rejection(d)["field"]) == ("moved", "header.site")
    assert steps[a.name].status is SiteStepStatus.ANSWERED and rejection(a)["reason_code"] == "moved"
    assert "/0005/" in str(rejection(a)["message"])  # it belongs to round 5
    assert steps[e.name].status is SiteStepStatus.REJECTED and steps[e.name].written == ()
    assert rejection(e)["reason_code"] == "tampered_payload"

    # a job already answered is not answered again
    again = site_secagg.mask_update(
        c.ctx, run_id=rig.run_id, round=6, arrays=_updates(6 + c.n), n_samples=c.n, now=rig.clock
    )
    assert again.status is SiteStepStatus.DONE and again.written == ()
    # ...and a different input for the same round is never masked: the recorded vector differs
    result = played.result
    assert result is not None and result.weights is not None and result.error_bound is not None
    assert result.survivors == tuple(sorted([a.name, c.name, d.name]))
    assert result.recovered == tuple(sorted([b.name, e.name]))
    for got, exact in zip(result.weights, weighted_mean(rig, [a.name, c.name, d.name], seed=6), strict=True):
        assert np.abs(got - exact).max() <= result.error_bound

    # a second aggregation of round 6's update is refused: the site masked it once already
    with pytest.raises(SecAggRoundFailed, match="secagg_input_already_masked"):
        play(rig, 6, mask=mask_update_of(rig, 6, seed=6))


def test_measured_one_million_parameters_four_sites(rig):
    """Bytes each site uploads per phase (from its outbound log) and the wall time of each phase (sites'
    calls one after another, and the coordinator's collect + advance/finish), one run."""
    sites = rig.letters("abcd")
    p = 1_000_000
    shapes = [[p]]
    updates = {s.name: _updates(70 + s.n, shapes, scale=0.1) for s in sites}
    played = play(
        rig,
        7,
        sites=sites,
        layout={"update": UpdateLayout(shapes=shapes, clip=CLIP, max_samples=MAX_SAMPLES)},
        mask=lambda s: site_secagg.mask_update(
            s.ctx, run_id=rig.run_id, round=7, arrays=updates[s.name], n_samples=s.n, now=rig.clock
        ),
    )
    result = played.result
    assert result is not None and result.weights is not None and result.error_bound is not None
    total = sum(s.n for s in sites)
    exact = sum(s.n * updates[s.name][0].astype(np.float64) for s in sites) / total
    assert np.abs(result.weights[0] - exact).max() <= result.error_bound

    print(f"\n1 M parameters, 4 sites, 32-bit ring, threshold {played.state.threshold}: bytes per site")
    print(
        f"{'phase':8} {'site → exchange':>16} {'coordinator → site':>19} {'sites s':>8} {'coordinator s':>14}"
    )
    jobs = {
        o.key: o.size for o in rig.admin.list(sites[0].bucket, prefix_for(MessageKind.JOB, rig.run_id, 7))
    }
    for phase in (Phase.KEYS, Phase.SHARES, Phase.MASKED, Phase.REVEAL):
        sizes = []
        for s in sites:
            written = set(played.steps[phase][s.name].written)
            sizes.append(sum(r.size for r in s.ctx.outbound_log.records() if r.object_key in written))
        job_schema = {
            Phase.KEYS: "setup",
            Phase.SHARES: "roster",
            Phase.MASKED: "inbox",
            Phase.REVEAL: "survivors",
        }[phase]
        job_bytes = sum(
            size
            for key, size in jobs.items()
            if json.loads(rig.admin.get_bytes(sites[0].bucket, key))["header"]["payload_schema"]
            == f"lepton-secagg-{job_schema}/1"
        )
        site_s, coord_s = (
            played.seconds[f"{phase.value}: sites"],
            played.seconds[f"{phase.value}: coordinator"],
        )
        print(f"{phase.value:8} {max(sizes):>16,} {job_bytes:>19,} {site_s:>8.3f} {coord_s:>14.3f}")
        if phase is Phase.MASKED:
            assert min(sizes) > 4 * (p + 1) and max(sizes) < 4 * (p + 1) + 4096  # the vector + a small answer
    print(f"float32 update alone: {4 * p:,} bytes; total wall {sum(played.seconds.values()):.2f} s")
