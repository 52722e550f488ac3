"""Site side of enrollment: the coordinator's fingerprint is confirmed, the site's own key is created in the
site's Vault, the policy skeleton pins the coordinator and grants nothing yet.

A dict stands in for the site Vault's transit engine (the same calls TransitSigner makes through hvac);
tests/integration/test_exchange_round.py imports a real bundle into a real OpenBao.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hvac.exceptions
import pytest
from pydantic import SecretStr

from lepton_tasks.core.site_policy import DatasetGrant, load_policy
from lepton_tasks.federation.enrollment import EnrollmentBundle, EnrollmentError
from lepton_tasks.site.enrollment import (
    exchange_storage,
    import_bundle,
    signer_policy_name,
)
from tests.unit.site.fakes import CONSORTIUM, LocalSigner, contract


class FakeTransit:
    """``client.secrets.transit`` of hvac, for ed25519 keys held in memory."""

    def __init__(self) -> None:
        self.keys: dict[str, LocalSigner] = {}
        self.created: list[dict[str, Any]] = []

    def read_key(self, name: str, mount_point: str) -> dict[str, Any]:
        if name not in self.keys:
            raise hvac.exceptions.InvalidPath()
        return {
            "data": {
                "type": "ed25519",
                "exportable": False,
                "allow_plaintext_backup": False,
                "latest_version": 1,
                "keys": {"1": {"public_key": self.keys[name].public_key_b64}},
            }
        }

    def create_key(self, name: str, **kw: Any) -> None:
        self.created.append({"name": name, **kw})
        self.keys[name] = LocalSigner(name)


@dataclass
class FakeVault:
    transit: FakeTransit = field(default_factory=FakeTransit)
    transit_mount: str = "transit"
    policies: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> Any:
        return SimpleNamespace(secrets=SimpleNamespace(transit=self.transit))

    def write_policy(self, name: str, hcl: str) -> None:
        self.policies[name] = hcl


class UntouchableVault:
    """Any use fails the test: proves nothing was set up."""

    transit_mount = "transit"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the site's Vault was used ({name}) although enrollment was refused")


@pytest.fixture
def coordinator() -> LocalSigner:
    return LocalSigner("coordinator")


@pytest.fixture
def bundle(coordinator: LocalSigner) -> EnrollmentBundle:
    return EnrollmentBundle(
        consortium=CONSORTIUM,
        site="bank-a",
        endpoint="127.0.0.1:8333",
        bucket="exchange-bank-a",
        access_key="LXABC",
        secret_key=SecretStr("s3cr3t-key-of-bank-a"),
        coordinator_public_key=coordinator.public_key_b64,
        coordinator_key_version=1,
        coordinator_fingerprint=coordinator.fingerprint,
        issued_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_import_creates_the_sites_key_and_a_policy_that_pins_the_coordinator(bundle, coordinator, tmp_path):
    vault = FakeVault()
    path = tmp_path / "site" / "policy.yaml"
    identity = import_bundle(
        bundle,
        vault,  # type: ignore[arg-type]
        policy_path=path,
        confirmed_coordinator_fingerprint=coordinator.fingerprint.upper().replace(" ", ":"),
    )
    assert identity.key_name == "site-sign-bank-a" and identity.key_version == 1
    [created] = vault.transit.created
    assert created["key_type"] == "ed25519" and created["exportable"] is False
    assert created["allow_plaintext_backup"] is False
    assert identity.public_key == vault.transit.keys["site-sign-bank-a"].public_key_b64
    assert identity.fingerprint == vault.transit.keys["site-sign-bank-a"].fingerprint
    assert identity.for_coordinator() == {
        "site": "bank-a",
        "public_key": identity.public_key,
        "key_version": 1,
        "fingerprint": identity.fingerprint,
    }
    hcl = vault.policies[signer_policy_name("site-sign-bank-a")]
    assert 'path "transit/sign/site-sign-bank-a"' in hcl and "decrypt" not in hcl

    assert path.stat().st_mode & 0o777 == 0o600
    policy = load_policy(path)
    assert policy.coordinator.public_key == coordinator.public_key_b64
    assert policy.coordinator.key_version == 1
    assert (policy.site, policy.consortium) == ("bank-a", CONSORTIUM)
    assert policy.datasets == () and policy.approval.required  # grants nothing until the partner edits it
    assert "s3cr3t" not in path.read_text()


def test_import_is_idempotent_and_keeps_the_partners_edits(bundle, coordinator, tmp_path):
    vault = FakeVault()
    path = tmp_path / "policy.yaml"
    _, sha = contract()
    first = import_bundle(
        bundle,
        vault,  # type: ignore[arg-type]
        policy_path=path,
        confirmed_coordinator_fingerprint=coordinator.fingerprint,
        datasets=[DatasetGrant(name="banks", contract_sha256=sha)],
    )
    edited = path.read_text().replace("max_rounds: 20", "max_rounds: 7")
    path.write_text(edited)
    again = import_bundle(
        bundle,
        vault,  # type: ignore[arg-type]
        policy_path=path,
        confirmed_coordinator_fingerprint=coordinator.fingerprint,
    )
    assert again == first and len(vault.transit.created) == 1
    assert load_policy(path).max_rounds == 7 and load_policy(path).datasets[0].name == "banks"


def test_a_fingerprint_that_does_not_match_the_bundle_sets_up_nothing(bundle, tmp_path):
    with pytest.raises(EnrollmentError, match="may have been replaced"):
        import_bundle(
            bundle,
            UntouchableVault(),  # type: ignore[arg-type]
            policy_path=tmp_path / "policy.yaml",
            confirmed_coordinator_fingerprint=LocalSigner().fingerprint,
        )
    with pytest.raises(EnrollmentError, match="64 hex digits"):
        import_bundle(
            bundle,
            UntouchableVault(),  # type: ignore[arg-type]
            policy_path=tmp_path / "policy.yaml",
            confirmed_coordinator_fingerprint="3f2a",
        )
    assert not (tmp_path / "policy.yaml").exists()


def test_a_key_name_in_the_operator_prefix_is_refused(bundle, coordinator, tmp_path):
    with pytest.raises(EnrollmentError, match="lepton-"):
        import_bundle(
            bundle,
            UntouchableVault(),  # type: ignore[arg-type]
            policy_path=tmp_path / "policy.yaml",
            confirmed_coordinator_fingerprint=coordinator.fingerprint,
            key_name="lepton-bank-a",
        )


def test_a_policy_pinning_another_coordinator_is_never_silently_re_pinned(bundle, coordinator, tmp_path):
    path = tmp_path / "policy.yaml"
    import_bundle(
        bundle,
        FakeVault(),  # type: ignore[arg-type]
        policy_path=path,
        confirmed_coordinator_fingerprint=coordinator.fingerprint,
    )
    impostor = LocalSigner("impostor")
    key, fp = impostor.public_key_b64, impostor.fingerprint
    other = bundle.model_copy(update={"coordinator_public_key": key, "coordinator_fingerprint": fp})
    before = path.read_bytes()
    with pytest.raises(EnrollmentError, match="pins another coordinator key"):
        import_bundle(
            other,
            UntouchableVault(),  # type: ignore[arg-type]
            policy_path=path,
            confirmed_coordinator_fingerprint=impostor.fingerprint,
        )
    assert path.read_bytes() == before


def test_exchange_storage_uses_the_bundles_credentials_and_hides_the_secret(bundle):
    storage = exchange_storage(bundle)
    assert storage.endpoint == "127.0.0.1:8333" and storage.access_key == "LXABC"
    assert "s3cr3t" not in repr(storage) and "s3cr3t" not in repr(bundle)
    assert base64.b64decode(bundle.coordinator_public_key)  # what the policy pins


def test_a_bundle_read_from_a_file_keeps_its_secret(bundle, tmp_path: Path):
    from lepton_tasks.federation.enrollment import read_bundle, write_bundle

    write_bundle(bundle, tmp_path / "bundle.json")
    assert (tmp_path / "bundle.json").stat().st_mode & 0o777 == 0o600
    back = read_bundle(tmp_path / "bundle.json")
    assert back == bundle and back.secret_key.get_secret_value() == "s3cr3t-key-of-bank-a"
