"""Great Expectations' import-time log noise stays out of ingest task logs (measured in a fresh process:
GX is imported once per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
import numpy as np, pandas as pd
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.ingest.validate import Validator
v = Validator(load_contract("banks"), object_key="banks/x.csv")
df = pd.DataFrame({"customer_id": ["a", "b"], "student": ["No", "Yes"], "balance": [1.0, 2.0],
                   "income": [1.0, np.nan], "default": ["No", "Yes"]})
v.validate_chunk(df)
logging.getLogger("great_expectations._docs_decorators").warning("warnings still come through")
"""


@pytest.mark.slow
def test_gx_skipping_registering_function_lines_are_silenced():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out.count("Skipping registering function") == 0  # was 214 lines per process
    assert "warnings still come through" in out
    gx_lines = [line for line in out.splitlines() if line.startswith("great_expectations")]
    assert len(gx_lines) < 10, gx_lines
