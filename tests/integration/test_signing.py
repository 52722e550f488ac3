"""Signing with a real OpenBao transit key, verifying with nothing but the public key.

- a job signed in Vault opens offline with the pinned public key; one signed by another Vault key does not;
- the coordinator's token (``signer_policy``) signs with its key and gets 403 on every other key;
- a sealed job and the site's answer travel through a real SeaweedFS exchange bucket, and the site's outbound
  log reconciles with the bucket listing (an object the site did not write is flagged).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from lepton_tasks.adapters.signing import (
    SigningError,
    TransitSigner,
    fingerprint,
    parse_signature,
    signer_policy,
    verify,
)
from lepton_tasks.core.exchange import (
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RejectReason,
    make_header,
    object_key,
    open_message,
    prefix_for,
    reply_header,
    seal,
    sha256_hex,
)
from lepton_tasks.core.outbound_log import ListedObject, OutboundLog, OutboundRecord, reconcile

pytestmark = pytest.mark.integration

JOB_PAYLOAD = b'{"weights": "global round 1"}'


@dataclass
class Keys:
    root: Any  # the Vault adapter with the root token (enrollment)
    coordinator: TransitSigner  # the coordinator's key, used with the coordinator's restricted token
    other: TransitSigner  # another ed25519 key in the same Vault (root token)
    coordinator_client: Any  # hvac.Client with only signer_policy(coordinator key)


@pytest.fixture(scope="module")
def keys(root_vault, settings) -> Iterator[Keys]:
    # signing keys live outside the operator's ``lepton-`` key prefix: no existing policy reaches them
    suffix = uuid.uuid4().hex[:8]
    coordinator_key, other_key = f"sign-coordinator-{suffix}", f"sign-other-{suffix}"
    assert TransitSigner.from_vault(root_vault, coordinator_key).create_key()
    other = TransitSigner.from_vault(root_vault, other_key)
    assert other.create_key()
    policy = f"lepton-signer-{suffix}"
    root_vault.write_policy(policy, signer_policy(root_vault.transit_mount, coordinator_key))
    token = root_vault.client.auth.token.create(
        policies=[policy], no_default_policy=True, ttl="15m", renewable=False, display_name="test-coordinator"
    )["auth"]["client_token"]
    client = hvac.Client(url=settings.vault_addr, token=token, timeout=30)
    try:
        yield Keys(root_vault, TransitSigner(client, coordinator_key), other, client)
    finally:
        root_vault.client.auth.token.revoke(token)  # no default policy: it cannot revoke itself
        root_vault.delete_policy(policy)
        for name in (coordinator_key, other_key):
            root_vault.delete_key(name)


def _job(site: str, bucket: str, round_: int = 1) -> JobHeader:
    header = make_header(
        MessageKind.JOB,
        consortium="credit-risk",
        run_id="run-signing",
        round=round_,
        site=site,
        bucket=bucket,
        payload=JOB_PAYLOAD,
        payload_schema="lepton-job/1",
        ttl=timedelta(hours=1),
    )
    assert isinstance(header, JobHeader)
    return header


def _expect_job(header: JobHeader, **overrides: Any) -> Expectation:
    args: dict[str, Any] = {
        "consortium": "credit-risk",
        "site": header.site,
        "bucket": header.bucket,
        "object_key": object_key(header),
        "run_id": header.run_id,
        "round": header.round,
    }
    args.update(overrides)
    return Expectation.for_job(**args)


# ------------------------------------------------------------------------------------------- sign / verify


def test_signed_in_vault_verified_offline(keys):
    public = keys.coordinator.public_key()  # read with the coordinator's own restricted token
    assert public.version == 1 and len(base64.b64decode(public.public_key_b64)) == 32
    assert public.fingerprint == fingerprint(public.public_key_b64) and len(public.fingerprint) == 79
    data = b"the bytes of a job header"
    signature = keys.coordinator.sign(data)
    assert parse_signature(signature).key_version == 1
    assert verify(public.public_key_b64, data, signature)
    assert verify(public.public_key_b64, data, signature, key_version=1)
    assert not verify(public.public_key_b64, data + b"!", signature)
    # Vault agrees with the offline check
    vault_says = keys.root.client.secrets.transit.verify_signed_data(
        name=keys.coordinator.key_name,
        hash_input=base64.b64encode(data).decode(),
        signature=signature,
        mount_point=keys.root.transit_mount,
    )
    assert vault_says["data"]["valid"] is True


def test_the_signing_key_is_ed25519_and_never_leaves_vault(keys):
    info = keys.root.key_info(keys.coordinator.key_name)
    assert info["type"] == "ed25519" and info["exportable"] is False
    assert info["allow_plaintext_backup"] is False
    with pytest.raises(hvac.exceptions.VaultError):
        keys.root.client.secrets.transit.export_key(
            name=keys.coordinator.key_name, key_type="signing-key", mount_point=keys.root.transit_mount
        )
    assert TransitSigner.from_vault(keys.root, keys.coordinator.key_name).create_key() is False  # idempotent


def test_an_existing_key_of_another_type_is_not_reused(keys):
    name = f"sign-aes-{uuid.uuid4().hex[:8]}"
    keys.root.ensure_key(name)  # aes256-gcm96
    try:
        with pytest.raises(SigningError, match="aes256-gcm96"):
            TransitSigner.from_vault(keys.root, name).create_key()
    finally:
        keys.root.delete_key(name)


def test_a_message_signed_by_another_vault_key_is_rejected(keys):
    header = _job("bank-a", "exchange-bank-a")
    pinned = keys.coordinator.public_key()
    genuine = seal(header, JOB_PAYLOAD, keys.coordinator)
    got, payload = open_message(genuine, expected=_expect_job(header), public_key=pinned, seen_ids=set())
    assert got == header and payload == JOB_PAYLOAD

    forged = seal(header, JOB_PAYLOAD, keys.other)  # same Vault, same format, another key
    with pytest.raises(MessageRejected) as info:
        open_message(forged, expected=_expect_job(header), public_key=pinned, seen_ids=set())
    assert info.value.reason_code is RejectReason.BAD_SIGNATURE
    assert pinned.fingerprint in info.value.message


def test_the_coordinator_token_signs_only_with_its_own_key(keys):
    stolen = TransitSigner(keys.coordinator_client, keys.other.key_name)
    with pytest.raises(SigningError, match=r"HTTP 403") as info:
        stolen.sign(b"a job the coordinator's token should not be able to sign")
    assert isinstance(info.value.__cause__, hvac.exceptions.Forbidden)
    with pytest.raises(hvac.exceptions.Forbidden):  # the raw API says the same
        keys.coordinator_client.secrets.transit.sign_data(
            name=keys.other.key_name, hash_input=base64.b64encode(b"x").decode(), mount_point="transit"
        )
    # nor can it read other keys, create keys, rotate or export its own
    with pytest.raises(SigningError, match="HTTP 403"):
        stolen.public_key()
    with pytest.raises(SigningError, match="HTTP 403"):
        TransitSigner(keys.coordinator_client, f"sign-new-{uuid.uuid4().hex[:8]}").create_key()
    with pytest.raises(hvac.exceptions.Forbidden):
        keys.coordinator_client.secrets.transit.rotate_key(
            name=keys.coordinator.key_name, mount_point="transit"
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        keys.coordinator_client.secrets.transit.export_key(
            name=keys.coordinator.key_name, key_type="signing-key", mount_point="transit"
        )
    # ... while its own key still works
    assert verify(keys.coordinator.public_key().public_key_b64, b"ok", keys.coordinator.sign(b"ok"))


def test_rotation_gives_a_new_version_that_the_old_public_key_does_not_verify(keys):
    name = f"sign-rotating-{uuid.uuid4().hex[:8]}"
    signer = TransitSigner.from_vault(keys.root, name)
    signer.create_key()
    try:
        v1 = signer.public_key()
        assert keys.root.rotate_key(name) == 2
        v2 = signer.public_key()
        assert v2.version == 2 and v2.public_key_b64 != v1.public_key_b64
        assert signer.public_key(1) == v1
        signature = signer.sign(b"data")
        assert signature.startswith("vault:v2:")
        assert verify(v2.public_key_b64, b"data", signature, key_version=2)
        assert not verify(v1.public_key_b64, b"data", signature)
        assert verify(v1.public_key_b64, b"data", signer.sign(b"data", key_version=1), key_version=1)
        with pytest.raises(SigningError, match="no public key for version 9"):
            signer.public_key(9)
    finally:
        keys.root.delete_key(name)


# ---------------------------------------------------------------------- through a real exchange bucket


def _listing(storage: Any, bucket: str) -> list[ListedObject]:
    return [
        ListedObject(o.key, o.size, sha256_hex(storage.get_bytes(bucket, o.key)))
        for o in storage.list(bucket)
    ]


def test_a_job_and_its_answer_travel_through_a_real_exchange_bucket(keys, admin_storage, tmp_path: Path):
    site, bucket = "bank-a", f"exchange-bank-a-{uuid.uuid4().hex[:8]}"
    admin_storage.ensure_bucket(bucket)
    site_signer = TransitSigner.from_vault(keys.root, f"sign-site-{uuid.uuid4().hex[:8]}")
    site_signer.create_key()
    try:
        # coordinator → site
        job = _job(site, bucket)
        admin_storage.put_bytes(bucket, object_key(job), seal(job, JOB_PAYLOAD, keys.coordinator))
        (job_key,) = [o.key for o in admin_storage.list(bucket, prefix_for(MessageKind.JOB, job.run_id, 1))]
        got, payload = open_message(
            admin_storage.get_bytes(bucket, job_key),
            expected=_expect_job(job, object_key=job_key),
            public_key=keys.coordinator.public_key(),
            seen_ids=set(),
        )
        assert got == job and payload == JOB_PAYLOAD
        assert isinstance(got, JobHeader)

        # a copy of the job under another key (e.g. replayed into the next round) is refused
        moved_key = f"jobs/{job.run_id}/0002/{uuid.uuid4()}.json"
        admin_storage.copy(bucket, job_key, bucket, moved_key)
        with pytest.raises(MessageRejected) as info:
            open_message(
                admin_storage.get_bytes(bucket, moved_key),
                expected=_expect_job(job, object_key=moved_key, round=2),
                public_key=keys.coordinator.public_key(),
                seen_ids=set(),
            )
        assert info.value.reason_code is RejectReason.MOVED

        # site → coordinator: log first, then put
        answer_payload = b'{"update": "bank-a", "n": 1200}'
        answer = reply_header(
            got,
            MessageKind.ANSWER,
            payload=answer_payload,
            payload_schema="lepton-answer/1",
            ttl=timedelta(hours=1),
        )
        raw = seal(answer, answer_payload, site_signer)
        log = OutboundLog(tmp_path / "site" / "outbound.jsonl")
        log.append(
            OutboundRecord.for_object(
                kind=answer.kind,
                bucket=bucket,
                object_key=object_key(answer),
                data=raw,
                run_id=answer.run_id,
                round=answer.round,
                message_id=answer.message_id,
            )
        )
        admin_storage.put_bytes(bucket, object_key(answer), raw, content_type="application/json")
        back, back_payload = open_message(
            admin_storage.get_bytes(bucket, object_key(answer)),
            expected=Expectation.for_reply(job, object_key=object_key(answer)),
            public_key=site_signer.public_key(),
            seen_ids=set(),
        )
        assert back == answer and back_payload == answer_payload

        # the log lists exactly what the site wrote
        assert (tmp_path / "site" / "outbound.jsonl").stat().st_mode & 0o777 == 0o600
        diff = reconcile(log.records(), _listing(admin_storage, bucket), bucket=bucket)
        assert diff.ok, diff.summary()

        # something written into the site's answers without the site: flagged
        admin_storage.put_bytes(bucket, f"answers/{job.run_id}/0001/{uuid.uuid4()}.json", b"{}")
        diff = reconcile(log.records(), _listing(admin_storage, bucket), bucket=bucket)
        assert len(diff.unlogged) == 1 and not diff.missing and not diff.mismatched
    finally:
        admin_storage.remove_bucket(bucket)
        keys.root.delete_key(site_signer.key_name)
