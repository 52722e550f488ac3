"""Coordinator side of enrollment: bucket + bucket-scoped credentials, a registry without site credentials,
a site key pinned only when the fingerprint the operator typed matches, removal revokes.

tests/integration/test_exchange_round.py proves the credentials' scope on a real SeaweedFS.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from lepton_tasks.federation.enrollment import (
    EnrollmentBundle,
    EnrollmentError,
    SiteEntry,
    SiteRegistry,
    access_key_id,
    enroll_site,
    pin_site_key,
    read_bundle,
    remove_site,
    write_bundle,
)
from tests.unit.site.fakes import CONSORTIUM, LocalSigner, MemoryStorage, RecordingIdentities

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def coordinator() -> LocalSigner:
    return LocalSigner("coordinator")


@pytest.fixture
def registry(tmp_path) -> SiteRegistry:
    return SiteRegistry(tmp_path / "coordinator" / "sites.yaml")


def _enroll(storage, identities, coordinator, registry, site="bank-a") -> EnrollmentBundle:
    return enroll_site(
        storage,  # type: ignore[arg-type]
        identities,
        coordinator,
        registry=registry,
        consortium=CONSORTIUM,
        site=site,
        endpoint="127.0.0.1:8333",
        now=NOW,
    )


def test_enrollment_creates_a_bucket_and_credentials_for_it_alone(coordinator, registry):
    storage, identities = MemoryStorage(), RecordingIdentities()
    bundle = _enroll(storage, identities, coordinator, registry)
    assert "exchange-bank-a" in storage.buckets
    assert identities.granted == {
        "exchange-bank-a": (bundle.access_key, bundle.secret_key.get_secret_value(), "exchange-bank-a")
    }
    assert bundle.bucket == "exchange-bank-a" and bundle.site == "bank-a" and bundle.consortium == CONSORTIUM
    assert bundle.coordinator_public_key == coordinator.public_key_b64
    assert bundle.coordinator_fingerprint == coordinator.fingerprint and bundle.coordinator_key_version == 1
    assert len(bundle.secret_key.get_secret_value()) >= 40
    assert bundle.secret_key.get_secret_value() not in repr(bundle) + str(bundle)
    assert bundle.access_key == access_key_id("exchange-bank-a")


def test_the_registry_holds_the_bucket_and_no_site_credential(coordinator, registry):
    bundle = _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    text = registry.path.read_text()
    assert bundle.secret_key.get_secret_value() not in text and bundle.access_key not in text
    doc = yaml.safe_load(text)
    assert doc["schema_version"] == 1
    assert doc["sites"]["bank-a"] == {
        "site": "bank-a",
        "consortium": CONSORTIUM,
        "bucket": "exchange-bank-a",
        "s3_user": "exchange-bank-a",
        "enrolled_at": "2026-01-01T00:00:00Z",
    }
    assert registry.path.stat().st_mode & 0o777 == 0o600
    assert not registry.get("bank-a").pinned


def test_a_bad_or_duplicate_site_changes_nothing(coordinator, registry):
    storage, identities = MemoryStorage(), RecordingIdentities()
    _enroll(storage, identities, coordinator, registry)
    before = (dict(storage.buckets), dict(identities.granted), registry.path.read_bytes())
    for bad in ("Bank-A", "b", "a--b", "x" * 40, "staging", "../x"):
        with pytest.raises(EnrollmentError, match="site name"):
            _enroll(storage, identities, coordinator, registry, site=bad)
    with pytest.raises(EnrollmentError, match="already enrolled"):
        _enroll(storage, identities, coordinator, registry)
    assert (dict(storage.buckets), dict(identities.granted), registry.path.read_bytes()) == before


def test_a_site_key_is_pinned_only_with_its_own_fingerprint(coordinator, registry):
    _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    site_key, impostor = LocalSigner("site"), LocalSigner("impostor")
    before = registry.path.read_bytes()
    with pytest.raises(EnrollmentError, match="NOT pinned"):
        pin_site_key(registry, "bank-a", impostor.public_key_b64, site_key.fingerprint)
    with pytest.raises(EnrollmentError, match="64 hex digits"):
        pin_site_key(registry, "bank-a", site_key.public_key_b64, "3f2a 9c41")
    with pytest.raises(EnrollmentError, match="not an Ed25519 key"):
        pin_site_key(registry, "bank-a", "bm90IGEga2V5", site_key.fingerprint)
    assert registry.path.read_bytes() == before

    typed = site_key.fingerprint.upper().replace(" ", ":")  # as an operator might type it
    entry = pin_site_key(registry, "bank-a", site_key.public_key_b64, typed, now=NOW)
    assert entry.pinned and entry.fingerprint == site_key.fingerprint
    assert registry.get("bank-a").pinned_key().public_key_b64 == site_key.public_key_b64
    assert registry.get("bank-a").pinned_key().version == 1

    rotated = LocalSigner("site-v2", version=2)
    with pytest.raises(EnrollmentError, match="replace=True"):
        pin_site_key(registry, "bank-a", rotated.public_key_b64, rotated.fingerprint)
    pin_site_key(registry, "bank-a", rotated.public_key_b64, rotated.fingerprint, key_version=2, replace=True)
    assert registry.get("bank-a").pinned_key().version == 2
    with pytest.raises(EnrollmentError, match="unknown site"):
        pin_site_key(registry, "bank-z", site_key.public_key_b64, site_key.fingerprint)


def test_an_unpinned_site_has_no_key_to_verify_with(coordinator, registry):
    _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    with pytest.raises(EnrollmentError, match="no pinned key"):
        registry.get("bank-a").pinned_key()


def test_a_registry_others_may_write_is_refused(coordinator, registry):
    _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    os.chmod(registry.path, 0o666)
    with pytest.raises(EnrollmentError, match="chmod 600"):
        registry.load()


def test_a_registry_entry_with_a_fingerprint_of_another_key_does_not_load(coordinator, registry):
    _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    key = LocalSigner()
    pin_site_key(registry, "bank-a", key.public_key_b64, key.fingerprint)
    doc = yaml.safe_load(registry.path.read_text())
    doc["sites"]["bank-a"]["public_key"] = LocalSigner().public_key_b64  # edited by hand
    registry.path.write_text(yaml.safe_dump(doc))
    with pytest.raises(EnrollmentError, match="does not match its key"):
        registry.load()


def test_removal_revokes_the_credentials_and_keeps_the_bucket_unless_asked(coordinator, registry):
    storage, identities = MemoryStorage(), RecordingIdentities()
    _enroll(storage, identities, coordinator, registry)
    _enroll(storage, identities, coordinator, registry, site="bank-b")
    remove_site(registry, identities, "bank-a")
    assert identities.revoked == [("exchange-bank-a", access_key_id("exchange-bank-a"))]
    assert "exchange-bank-a" in storage.buckets and list(registry.load()) == ["bank-b"]
    remove_site(registry, identities, "bank-b", admin_storage=storage, delete_bucket=True)  # type: ignore[arg-type]
    assert "exchange-bank-b" not in storage.buckets and registry.load() == {}
    with pytest.raises(EnrollmentError, match="unknown site"):
        remove_site(registry, identities, "bank-a")


def test_bundle_files_are_private(coordinator, registry, tmp_path):
    bundle = _enroll(MemoryStorage(), RecordingIdentities(), coordinator, registry)
    path = tmp_path / "handover" / "bank-a.bundle.json"
    write_bundle(bundle, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_bundle(path) == bundle
    os.chmod(path, 0o644)
    with pytest.raises(EnrollmentError, match="must be 600"):
        read_bundle(path)


def test_a_bundle_whose_fingerprint_or_bucket_do_not_fit_is_invalid(coordinator):
    fields = {
        "consortium": CONSORTIUM,
        "site": "bank-a",
        "endpoint": "127.0.0.1:8333",
        "bucket": "exchange-bank-a",
        "access_key": "LX1",
        "secret_key": SecretStr("x"),
        "coordinator_public_key": coordinator.public_key_b64,
        "coordinator_key_version": 1,
        "coordinator_fingerprint": coordinator.fingerprint,
        "issued_at": NOW,
    }
    EnrollmentBundle(**fields)
    with pytest.raises(ValidationError, match="does not match"):
        EnrollmentBundle(**{**fields, "coordinator_fingerprint": LocalSigner().fingerprint})
    with pytest.raises(ValidationError, match="not the exchange bucket"):
        EnrollmentBundle(**{**fields, "bucket": "exchange-bank-b"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        EnrollmentBundle(**{**fields, "site_address": "10.0.0.1"})


def test_site_entries_pin_all_or_nothing():
    with pytest.raises(ValidationError, match="set together"):
        SiteEntry(
            site="bank-a",
            consortium=CONSORTIUM,
            bucket="exchange-bank-a",
            s3_user="exchange-bank-a",
            enrolled_at=NOW,
            public_key=LocalSigner().public_key_b64,
        )
