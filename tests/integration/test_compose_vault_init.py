"""docker/compose/vault_init.py with LEPTON_ROLE=coordinator, against a real OpenBao: the token
Airflow gets at the coordinator signs with the coordinator's key and can do nothing else — no transit
decrypt on any key (403), no key creation, no policy or token administration.
"""

from __future__ import annotations

import base64
import importlib.util
import secrets
import uuid
from pathlib import Path
from types import ModuleType

import hvac
import hvac.exceptions
import pytest

from lepton_tasks.adapters.signing import TransitSigner, verify

pytestmark = pytest.mark.integration

VAULT_INIT = Path(__file__).resolve().parents[2] / "docker" / "compose" / "vault_init.py"


def _vault_init() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lepton_compose_vault_init", VAULT_INIT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coordinator(settings, root_vault, onboard):
    """Run the coordinator set-up twice (it must be idempotent) with a fresh key name and token id."""
    onboard("bank-vault-init")  # a partner transit key the coordinator's token must not use
    vault_init = _vault_init()
    key_name = f"coordinator-sign-{uuid.uuid4().hex[:8]}"
    token_id = secrets.token_hex(32)
    for _ in range(2):
        vault_init.configure_coordinator(
            root_vault.client, token_id, transit_mount=settings.transit_mount, key_name=key_name, audit=False
        )
    client = hvac.Client(url=settings.vault_addr, token=token_id, timeout=10)
    yield key_name, client
    root_vault.client.auth.token.revoke(token_id)


def test_coordinator_token_signs_with_its_key(settings, coordinator):
    key_name, client = coordinator
    signer = TransitSigner(client, key_name, transit_mount=settings.transit_mount)
    signature = signer.sign(b"round job")
    assert verify(signer.public_key().public_key_b64, b"round job", signature)
    assert not verify(signer.public_key().public_key_b64, b"another job", signature)


def test_coordinator_token_cannot_decrypt_any_transit_key(settings, root_vault, coordinator):
    _, client = coordinator
    keys = root_vault.client.secrets.transit.list_keys(mount_point=settings.transit_mount)["data"]["keys"]
    partner_keys = [k for k in keys if k.startswith(settings.key_prefix)]
    assert partner_keys, "the onboarding fixture created no partner key: nothing would be tested"
    ciphertext = root_vault.client.secrets.transit.encrypt_data(
        name=partner_keys[0],
        plaintext=base64.b64encode(b"a partner's data key").decode(),
        mount_point=settings.transit_mount,
    )["data"]["ciphertext"]
    for key in keys:
        with pytest.raises(hvac.exceptions.Forbidden):
            client.secrets.transit.decrypt_data(
                name=key, ciphertext=ciphertext, mount_point=settings.transit_mount
            )


def test_coordinator_token_administers_nothing(settings, coordinator):
    key_name, client = coordinator
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.create_key(name="coordinator-extra", mount_point=settings.transit_mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.rotate_key(name=key_name, mount_point=settings.transit_mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.create_or_update_policy(name="widen", policy='path "*" { capabilities = ["sudo"] }')
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.create(policies=["coordinator-signer"])
