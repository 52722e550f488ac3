"""Enrollment, one command on each side, against the session's real OpenBao + SeaweedFS: the coordinator's
``init``/``enroll``/``pin``/``sites``/``remove`` and the site's ``import``. (Here one stack plays both roles;
the logic each command calls is tested in depth in test_exchange_round.py.)"""

from __future__ import annotations

import json
import re
import stat
import uuid

import pytest
from minio.error import S3Error
from typer.testing import CliRunner

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.federation.enrollment import read_bundle
from lepton_tasks.ops.cli import app
from lepton_tasks.site.enrollment import exchange_storage
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(services, monkeypatch):
    monkeypatch.setenv("LEPTON_DATA_DIR", str(services.data_dir))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


FINGERPRINT = re.compile(r"(?:[0-9a-f]{4} ){15}[0-9a-f]{4}")


def _fingerprint(output: str) -> str:
    """The last fingerprint the command printed (16 groups of 4 hex digits)."""
    return FINGERPRINT.findall(output)[-1]


@pytest.fixture
def site_files_removed_after(settings):
    """The site import below writes the session stack's site files (bundle, key, policy); a bundle left there
    would make every later ingest announce to this test's removed site. Remove them after the test."""
    import shutil

    yield
    if settings.site_dir.exists():
        shutil.rmtree(settings.site_dir)


def test_enroll_import_pin_remove(cli, settings, tmp_path, site_files_removed_after):
    site = f"hosp-cli-{uuid.uuid4().hex[:6]}"
    init = cli("coordinator", "init")
    assert init.exit_code == 0, init.output
    coordinator_fp = _fingerprint(init.output)
    assert cli("coordinator", "init").output.count("already there") == 1  # idempotent

    bundle_file = tmp_path / "bundle.json"
    enrolled = cli("coordinator", "enroll", site, "--out", str(bundle_file))
    assert enrolled.exit_code == 0, enrolled.output
    assert stat.S_IMODE(bundle_file.stat().st_mode) == 0o600
    assert coordinator_fp in enrolled.output
    assert "NOT PINNED" in cli("coordinator", "sites").output

    # the site refuses a bundle whose coordinator fingerprint is not the one its operator heard
    wrong = cli("site", "import", str(bundle_file), "--coordinator-fingerprint", "00" * 32, "-d", "banks")
    assert wrong.exit_code == 1 and "may have been replaced" in wrong.output
    assert not (settings.site_policy_file).exists()

    imported = cli(
        "site", "import", str(bundle_file), "--coordinator-fingerprint", coordinator_fp, "-d", "banks"
    )
    assert imported.exit_code == 0, imported.output
    site_fp = _fingerprint(imported.output)
    key_file = settings.site_key_file
    assert json.loads(key_file.read_text())["fingerprint"] == site_fp
    assert stat.S_IMODE((settings.site_bundle_file).stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.site_dir.stat().st_mode) == 0o700

    # the coordinator pins only what the partner read out
    typo = cli("coordinator", "pin", site, "--key-file", str(key_file), "--fingerprint", "11" * 32)
    assert typo.exit_code == 1 and "NOT pinned" in typo.output
    pinned = cli("coordinator", "pin", site, "--key-file", str(key_file), "--fingerprint", site_fp)
    assert pinned.exit_code == 0, pinned.output
    assert site_fp in cli("coordinator", "sites").output

    # the site's exchange credentials work on its bucket; removing the site revokes them
    bundle = read_bundle(settings.site_bundle_file)
    storage: Storage = exchange_storage(bundle)

    def can_write() -> bool:
        try:
            storage.put_bytes(bundle.bucket, "probe", b"x")
            return True
        except (S3Error, StorageError):
            return False

    wait_until(can_write)
    removed = cli("coordinator", "remove", site)
    assert removed.exit_code == 0, removed.output
    wait_until(lambda: not can_write())
    assert site not in cli("coordinator", "sites").output
