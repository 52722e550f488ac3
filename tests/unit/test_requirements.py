"""Every dependency is pinned exactly, development tools stay out of the runtime requirements, the trainer
image pins agree with the product's, `pip check` is clean, and deprecation warnings fail the tests."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FILES = [
    "requirements.txt",
    "requirements-dev.txt",
    "requirements-trainer.txt",
    "bench/aggregate/requirements.txt",
    "docker/compose/requirements-airflow.txt",
]
#: development and CI tools: requirements-dev.txt only, never a runtime requirements file
DEV_TOOLS = {"pytest", "pytest-timeout", "pytest-cov", "coverage", "ruff", "mypy", "hypothesis"}
RUNTIME_FILES = [f for f in FILES if f != "requirements-dev.txt"]
LINE = re.compile(r"^([A-Za-z0-9_.\-\[\],]+)==([A-Za-z0-9_.+\-!]+)$")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = LINE.match(line)
        assert m, f"{path.name}: {raw!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("name", FILES)
def test_every_line_is_an_exact_pin(name):
    path = REPO / name
    assert path.is_file(), name
    assert _pins(path), f"{name} pins nothing"


def test_dev_tools_are_pinned_in_requirements_dev_only():
    dev = _pins(REPO / "requirements-dev.txt")
    assert set(dev) >= DEV_TOOLS, f"requirements-dev.txt lacks {sorted(DEV_TOOLS - set(dev))}"
    assert {p for p in dev if p.startswith("types-")}, "mypy's stub packages belong in requirements-dev.txt"
    for name in RUNTIME_FILES:
        leaked = (DEV_TOOLS | {p for p in dev if p.startswith("types-")}) & set(_pins(REPO / name))
        assert not leaked, f"{name} pins development tools {sorted(leaked)}: they go to requirements-dev.txt"


def test_dev_requirements_do_not_repin_runtime_packages():
    """requirements-dev.txt adds to requirements.txt (installed together): a package in both may disagree."""
    both = set(_pins(REPO / "requirements.txt")) & set(_pins(REPO / "requirements-dev.txt"))
    assert both == set(), f"pinned in both files: {sorted(both)}"


def test_trainer_pins_match_the_product():
    product, trainer = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements-trainer.txt")
    shared = set(product) & set(trainer)
    assert {"tensorflow-cpu", "pandas", "pyarrow", "minio", "hvac", "tink", "numpy"} <= shared
    assert {p: (product[p], trainer[p]) for p in shared if product[p] != trainer[p]} == {}


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_airflow_deprecations_fail_the_tests():
    """tests/conftest.py makes Airflow's own deprecation categories errors (a deprecated Airflow 3 API used by
    a DAG, an operator or a test fails the suite instead of hiding in the warnings summary)."""
    from airflow.exceptions import AirflowProviderDeprecationWarning, RemovedInAirflow4Warning
    from airflow.sdk.exceptions import RemovedInAirflow4Warning as SdkRemovedInAirflow4Warning
    from airflow.utils.deprecation_tools import DeprecatedImportWarning

    for category in (
        RemovedInAirflow4Warning,
        SdkRemovedInAirflow4Warning,
        AirflowProviderDeprecationWarning,
        DeprecatedImportWarning,
    ):
        with pytest.raises(category):
            warnings.warn_explicit("deprecated", category, "airflow/x.py", 1, module="airflow.x")


@pytest.mark.parametrize("module", ["lepton_tasks.core.x", "lepton_airflow.x", "tests.unit.x"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecations_reached_from_our_code_fail_the_tests(module, category):
    """pyproject's filterwarnings: a deprecation attributed to our code (pandas, numpy warn at the caller)."""
    with pytest.raises(category):
        warnings.warn_explicit("deprecated", category, "x.py", 1, module=module)
