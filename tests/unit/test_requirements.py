"""Every dependency is pinned exactly, the trainer image pins agree with the product's, and `pip check` is clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FILES = [
    "requirements.txt",
    "requirements-trainer.txt",
    "bench/aggregate/requirements.txt",
    "docker/compose/requirements-airflow.txt",
]
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


def test_trainer_pins_match_the_product():
    product, trainer = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements-trainer.txt")
    shared = set(product) & set(trainer)
    assert {"tensorflow-cpu", "pandas", "pyarrow", "minio", "hvac", "tink", "numpy"} <= shared
    assert {p: (product[p], trainer[p]) for p in shared if product[p] != trainer[p]} == {}


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
