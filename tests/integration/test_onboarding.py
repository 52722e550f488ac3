"""Partner onboarding and isolation against real SeaweedFS + OpenBao."""

from __future__ import annotations

import time

import hvac.exceptions
import pytest
from minio.error import S3Error

from lepton_tasks.adapters.vault import Vault
from lepton_tasks.ops.partners import PartnerError, Registry, SeaweedIdentities, add_partner, partner_storage

pytestmark = pytest.mark.integration


def _retry(fn, attempts: int = 20):
    """s3.configure applies within seconds: retry until the identity is live."""
    for i in range(attempts):
        try:
            return fn()
        except S3Error as exc:
            if exc.code not in ("InvalidAccessKeyId", "AccessDenied") or i == attempts - 1:
                raise
            time.sleep(0.5)
    return None


def test_partner_credentials_reach_only_their_own_inbox(settings, onboard):
    onboard("iso-a")
    onboard("iso-b")
    a = partner_storage(settings, "iso-a")
    _retry(lambda: a.put_bytes("inbox-iso-a", "banks/ok.csv", b"x,y\n1,2\n"))
    assert a.get_bytes("inbox-iso-a", "banks/ok.csv") == b"x,y\n1,2\n"
    assert [o.key for o in a.list("inbox-iso-a")] == ["banks/ok.csv"]
    b = partner_storage(settings, "iso-b")
    _retry(lambda: b.put_bytes("inbox-iso-b", "banks/b.csv", b"secret-b"))

    with pytest.raises(S3Error) as write:
        a.put_bytes("inbox-iso-b", "banks/evil.csv", b"x")
    assert write.value.code == "AccessDenied"
    with pytest.raises(Exception) as read:
        a.get_bytes("inbox-iso-b", "banks/b.csv")
    assert "AccessDenied" in str(read.value)
    with pytest.raises(S3Error) as listing:
        list(a.list("inbox-iso-b"))
    assert listing.value.code == "AccessDenied"
    # shared buckets are out of reach too
    for bucket in settings.shared_buckets():
        with pytest.raises(S3Error):
            a.put_bytes(bucket, "iso-a/x", b"x")
    assert {bk.name for bk in a.client.list_buckets()} == {"inbox-iso-a"}


def test_partner_token_cannot_decrypt_with_another_partners_key(settings, onboard, operator_vault):
    onboard("tok-a")
    onboard("tok-b")
    ct_b = operator_vault.client.secrets.transit.encrypt_data(name="lepton-tok-b", plaintext="aGVsbG8=")
    ct_a = operator_vault.client.secrets.transit.encrypt_data(name="lepton-tok-a", plaintext="aGVsbG8=")
    token = operator_vault.trainer_token("tok-a", ttl="2m")
    a = Vault.connect(settings.vault_addr, token)
    ok = a.client.secrets.transit.decrypt_data(name="lepton-tok-a", ciphertext=ct_a["data"]["ciphertext"])
    assert ok["data"]["plaintext"] == "aGVsbG8="
    with pytest.raises(hvac.exceptions.Forbidden):
        a.client.secrets.transit.decrypt_data(name="lepton-tok-b", ciphertext=ct_b["data"]["ciphertext"])
    with pytest.raises(hvac.exceptions.Forbidden):  # it cannot encrypt, or mint tokens, either
        a.client.secrets.transit.encrypt_data(name="lepton-tok-a", plaintext="aGVsbG8=")
    with pytest.raises(hvac.exceptions.Forbidden):
        Vault(a.client).trainer_token("tok-b")


def test_trainer_token_is_short_lived_and_single_policy(settings, onboard, operator_vault, root_vault):
    onboard("ttl-a")
    token = operator_vault.trainer_token("ttl-a", ttl="90s")
    info = root_vault.client.auth.token.lookup(token)["data"]
    assert info["policies"] == ["lepton-partner-ttl-a"]
    assert 0 < info["ttl"] <= 90
    assert info["renewable"] is False


def test_operator_cannot_escalate(operator_vault):
    with pytest.raises(hvac.exceptions.Forbidden):
        operator_vault.write_policy("lepton-partner-evil", 'path "*" { capabilities = ["sudo"] }')
    with pytest.raises(hvac.exceptions.Forbidden):
        operator_vault.client.auth.token.create(policies=["root"])


@pytest.mark.parametrize(
    "bad", ["Acme", "a", "ab_c", "-abc", "abc-", "a--b", "x" * 40, "staging", "ac me", "../x"]
)
def test_bad_partner_names_change_nothing(settings, services, admin_storage, root_vault, bad):
    before_buckets = {b.name for b in admin_storage.client.list_buckets()}
    before_registry = Registry(settings.registry_file).load()
    with pytest.raises(PartnerError, match="partner name"):
        add_partner(
            settings,
            bad,
            ["banks"],
            storage=admin_storage,
            root_vault=root_vault,
            identities=SeaweedIdentities(services.seaweedfs.shell),
        )
    assert {b.name for b in admin_storage.client.list_buckets()} == before_buckets
    assert Registry(settings.registry_file).load() == before_registry


def test_duplicate_partner_and_unknown_dataset_change_nothing(
    settings, services, admin_storage, root_vault, onboard
):
    onboard("dup-a")
    before = Registry(settings.registry_file).load()
    ids = SeaweedIdentities(services.seaweedfs.shell)
    with pytest.raises(PartnerError, match="already exists"):
        add_partner(
            settings, "dup-a", ["banks"], storage=admin_storage, root_vault=root_vault, identities=ids
        )
    with pytest.raises(PartnerError, match="unknown dataset"):
        add_partner(settings, "dup-b", ["nope"], storage=admin_storage, root_vault=root_vault, identities=ids)
    assert Registry(settings.registry_file).load() == before
    assert not admin_storage.client.bucket_exists("inbox-dup-b")


def test_remove_partner_revokes_access(settings, services, admin_storage, root_vault, onboard):
    from lepton_tasks.ops.partners import remove_partner

    onboard("gone-a")
    s = partner_storage(settings, "gone-a")
    _retry(lambda: s.put_bytes("inbox-gone-a", "banks/x.csv", b"a"))
    remove_partner(
        settings,
        "gone-a",
        storage=admin_storage,
        root_vault=root_vault,
        identities=SeaweedIdentities(services.seaweedfs.shell),
    )
    assert "gone-a" not in Registry(settings.registry_file).load()
    assert not root_vault.policy_exists("lepton-partner-gone-a")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            s.put_bytes("inbox-gone-a", "banks/y.csv", b"b")
        except S3Error:
            break
        time.sleep(0.5)
    else:
        pytest.fail("revoked partner credentials still work after 15 s")


def test_seaweed_shell_errors_never_echo_secret_keys(services):
    """`weed shell` echoes identities with their secret keys; a failure message must carry none of it."""
    from lepton_tasks.ops.embedded.process import ServiceError

    with pytest.raises(ServiceError) as err:  # the identity is echoed (with its secret), then a command fails
        services.seaweedfs.shell(
            "s3.configure -user=ghost-user -access_key=AKGHOST1 "
            "-secret_key=TOPSECRET0123456789 -actions=Read:nowhere -apply\nnosuchcommand"
        )
    assert "unknown command: nosuchcommand" in str(err.value)
    assert "TOPSECRET0123456789" not in str(err.value)
    with pytest.raises(ServiceError, match="flag provided but not defined"):  # exit 0, but it did nothing
        services.seaweedfs.shell("s3.configure -user=ghost-user -badflag")


def test_onboarding_works_when_the_virtualenv_is_not_on_path(
    settings, services, admin_storage, root_vault, monkeypatch
):
    """`lepton partners add` from `.venv/bin/lepton` without activating the venv: `weed` is found beside
    this Python (it failed with a raw FileNotFoundError and left the bucket, key and policy behind)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    p = add_partner(
        settings,
        "nopath-a",
        ["banks"],
        storage=admin_storage,
        root_vault=root_vault,
        identities=SeaweedIdentities(services.seaweedfs.shell),
    )
    assert p.name in Registry(settings.registry_file).load()
    s = partner_storage(settings, "nopath-a")
    _retry(lambda: s.put_bytes("inbox-nopath-a", "banks/x.csv", b"a"))


class RecordingIdentities:
    """The real SeaweedFS identities, recording what was granted and revoked; optionally failing a grant
    after applying it (a half-applied step)."""

    def __init__(self, services, *, fail_grant: bool = False) -> None:
        self.real = SeaweedIdentities(services.seaweedfs.shell)
        self.fail_grant = fail_grant
        self.granted: list[tuple[str, str]] = []
        self.revoked: list[str] = []

    def preflight(self) -> None:
        self.real.preflight()

    def grant_bucket(self, user, access_key, secret_key, bucket) -> None:
        self.real.grant_bucket(user, access_key, secret_key, bucket)
        self.granted.append((access_key, secret_key))
        if self.fail_grant:
            raise RuntimeError("the identity service timed out")

    def revoke(self, user, access_key) -> None:
        self.real.revoke(user, access_key)
        self.revoked.append(user)


def _nothing_left(settings, admin_storage, root_vault, name: str, before: dict) -> None:
    from lepton_tasks.ops.partners import credentials_file

    assert not admin_storage.client.bucket_exists(f"inbox-{name}")
    assert not root_vault.key_exists(f"lepton-{name}")
    assert not root_vault.policy_exists(f"lepton-partner-{name}")
    assert not credentials_file(settings, name).exists()
    assert Registry(settings.registry_file).load() == before


def _credentials_stop_working(settings, access_key: str, secret_key: str, bucket: str) -> None:
    from lepton_tasks.adapters.storage import Storage

    s = Storage(
        settings.s3_endpoint, access_key, secret_key, secure=settings.s3_secure, region=settings.s3_region
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            s.put_bytes(bucket, "banks/y.csv", b"b")
        except S3Error:
            return
        time.sleep(0.5)
    pytest.fail("credentials of a rolled-back onboarding still work after 15 s")


def test_a_failing_grant_undoes_the_bucket_key_policy_and_identity(
    settings, services, admin_storage, root_vault
):
    from lepton_tasks.ops.partners import OnboardingError

    before = Registry(settings.registry_file).load()
    ids = RecordingIdentities(services, fail_grant=True)
    with pytest.raises(OnboardingError, match="failed while granting the inbox-only S3 credentials") as err:
        add_partner(
            settings, "undo-a", ["banks"], storage=admin_storage, root_vault=root_vault, identities=ids
        )
    assert "Removed again:" in str(err.value) and "bucket inbox-undo-a" in str(err.value)
    _nothing_left(settings, admin_storage, root_vault, "undo-a", before)
    assert ids.revoked == ["partner-undo-a"]
    _credentials_stop_working(settings, *ids.granted[0], "inbox-undo-a")


def test_a_failing_registry_write_undoes_everything(
    settings, services, admin_storage, root_vault, monkeypatch
):
    from lepton_tasks.ops.partners import OnboardingError

    before = Registry(settings.registry_file).load()

    def disk_full(self, partners):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Registry, "save", disk_full)
    ids = RecordingIdentities(services)
    with pytest.raises(OnboardingError, match="failed while saving the registry"):
        add_partner(
            settings, "undo-b", ["banks"], storage=admin_storage, root_vault=root_vault, identities=ids
        )
    monkeypatch.undo()
    _nothing_left(settings, admin_storage, root_vault, "undo-b", before)
    assert ids.revoked == ["partner-undo-b"]
    _credentials_stop_working(settings, *ids.granted[0], "inbox-undo-b")
    # and the name is free again: onboarding it now works
    add_partner(
        settings, "undo-b", ["banks"], storage=admin_storage, root_vault=root_vault, identities=ids.real
    )
