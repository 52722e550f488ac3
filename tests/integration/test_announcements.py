"""A site announces new staged data to its coordinator through real SeaweedFS + OpenBao, and the coordinator
reads and verifies it; a forged announcement in the same bucket is rejected and starts nothing.

Two sites are enrolled (bucket-scoped S3 credentials, their own ed25519 keys in the Vault, pinned by the
coordinator). Site A announces with ``announce_staged`` (its bundle in its site dir, its exchange credentials,
its own key); site B cannot write into A's bucket; an announcement signed with another key is planted in A's
bucket by the storage admin. The coordinator's ``poll_announcements`` reports A's dataset once, rejects the
forgery, and reports nothing on the next poll.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lepton_tasks.adapters.signing import TransitSigner
from lepton_tasks.core.announcements import make_announcement
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.outbound_log import read_log
from lepton_tasks.core.site_policy import DatasetGrant
from lepton_tasks.federation.announcements import poll_announcements
from lepton_tasks.federation.enrollment import (
    SiteRegistry,
    enroll_site,
    pin_site_key,
    remove_site,
    write_bundle,
)
from lepton_tasks.ops.partners import SeaweedIdentities
from lepton_tasks.site.announce import announce_staged
from lepton_tasks.site.enrollment import SiteFiles, exchange_storage, import_bundle
from tests.integration.waiting import wait_live

pytestmark = pytest.mark.integration

CONSORTIUM = "credit-risk"


@pytest.fixture(scope="module")
def world(services, settings, admin_storage, root_vault, tmp_path_factory) -> Iterator[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("announce")
    identities = SeaweedIdentities(services.seaweedfs.shell)
    coord_key = f"sgn-coord-ann-{suffix}"
    TransitSigner.from_vault(root_vault, coord_key).create_key()
    coordinator = TransitSigner.from_vault(root_vault, coord_key)
    registry = SiteRegistry(root / "coordinator" / "sites.yaml")
    models = f"coord-ann-{suffix}"
    admin_storage.ensure_bucket(models)
    keys, policies, sites = [coord_key], [], {}
    contract = load_contract("banks")
    try:
        for letter in ("a", "b"):
            name = f"ann-{letter}-{suffix}"
            bundle = enroll_site(
                admin_storage,
                identities,
                coordinator,
                registry=registry,
                consortium=CONSORTIUM,
                site=name,
                endpoint=settings.s3_endpoint,
            )
            data_dir = root / name
            site_settings = settings.model_copy(
                update={"data_dir": data_dir, "site_key_name": f"sgn-site-{name}"}
            )
            files = SiteFiles(site_settings.site_dir)
            write_bundle(bundle, files.bundle)
            identity = import_bundle(
                bundle,
                root_vault,
                policy_path=files.policy,
                confirmed_coordinator_fingerprint=coordinator.public_key().fingerprint,
                key_name=f"sgn-site-{name}",
                datasets=[DatasetGrant(name="banks", contract_sha256=contract.sha256)],
                min_partners=2,
            )
            keys.append(identity.key_name)
            policies.append(identity.vault_policy)
            pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            storage = exchange_storage(bundle)
            wait_live(lambda s=storage, b=bundle.bucket: list(s.list(b)))
            sites[letter] = {"name": name, "bundle": bundle, "settings": site_settings, "storage": storage}
        yield {"registry": registry, "models": models, "sites": sites, "admin": admin_storage, "root": root}
    finally:
        for s in sites.values():
            remove_site(registry, identities, s["name"], admin_storage=admin_storage, delete_bucket=True)
        for obj in list(admin_storage.list(models)):
            admin_storage.remove(models, obj.key)
        admin_storage.remove_bucket(models)
        for policy in policies:
            root_vault.delete_policy(policy)
        for key in keys:
            root_vault.delete_key(key)


def test_an_enrolled_site_announces_and_the_coordinator_verifies_it_once(world, root_vault, settings):
    a, b = world["sites"]["a"], world["sites"]["b"]
    sent = announce_staged(a["settings"], lambda: root_vault, "banks")
    assert sent is not None and sent.bucket == a["bundle"].bucket
    [record] = read_log(SiteFiles(a["settings"].site_dir).outbound_log)
    assert record.object_key == sent.key

    # B's credentials reach only B's bucket
    from minio.error import S3Error

    from lepton_tasks.adapters.storage import StorageError

    with pytest.raises((StorageError, S3Error), match=r"AccessDenied|Access Denied"):
        b["storage"].put_bytes(a["bundle"].bucket, f"announcements/banks/{uuid.uuid4()}.json", b"{}")

    # a forgery in A's bucket (written by someone with storage access, signed by another key)
    forger_key = f"sgn-forger-{uuid.uuid4().hex[:6]}"
    forger = TransitSigner.from_vault(root_vault, forger_key)
    forger.create_key()
    try:
        contract = load_contract("hospitals")
        key, raw, _ = make_announcement(
            consortium=CONSORTIUM,
            site=a["name"],
            bucket=a["bundle"].bucket,
            dataset="hospitals",
            contract_version=contract.version_tag,
            contract_sha256=contract.sha256,
            signer=forger,
        )
        world["admin"].put_bytes(a["bundle"].bucket, key, raw)
    finally:
        root_vault.delete_key(forger_key)

    deadline = time.monotonic() + 20
    while True:  # the listing of a fresh write may lag a moment
        result = poll_announcements(world["admin"], world["models"], world["registry"], consortium=CONSORTIUM)
        if result.accepted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.by_dataset() == {"banks": [a["name"]]}
    assert [(r.key, r.reason["reason_code"]) for r in result.rejected] == [(key, "bad_signature")]
    again = poll_announcements(world["admin"], world["models"], world["registry"], consortium=CONSORTIUM)
    assert again.accepted == [] and again.rejected == []
