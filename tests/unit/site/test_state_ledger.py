"""The site's privacy ledgers beside its state file: private, read and written under the state's lock only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.site_policy import SITE_LEDGER, BudgetScope, PrivacyBudget
from lepton_tasks.site.state import SiteState, SiteStateError

SCOPE = BudgetScope(ledger="banks", budget=PrivacyBudget(epsilon=3.0, delta=1e-5))


def _charge(round_: int) -> privacy.Charge:
    return privacy.Charge(
        run_id="r", round=round_, dataset="banks", noise_multiplier=1.1, sampling_rate=0.01, steps=100
    )


def test_ledgers_are_named_after_the_state_file_and_their_scope(tmp_path: Path):
    state = SiteState(tmp_path / "site" / "state.json")
    assert state.ledger_path("banks") == tmp_path / "site" / "state.privacy.banks.json"
    assert state.ledger_path(SITE_LEDGER) == tmp_path / "site" / "state.privacy.json"


def test_a_ledger_is_used_only_inside_a_state_transaction(tmp_path: Path):
    state = SiteState(tmp_path / "state.json")
    with pytest.raises(RuntimeError, match="inside a state transaction"):
        state.read_ledger(SCOPE)
    with pytest.raises(RuntimeError, match="inside a state transaction"):
        state.write_ledger(SCOPE, privacy.PrivacyLedger(budget=privacy.PrivacyBudget(epsilon=1, delta=1e-5)))


def test_a_new_ledger_is_empty_and_the_policy_sets_its_budget(tmp_path: Path):
    state = SiteState(tmp_path / "state.json")
    with state.transaction():
        ledger = state.read_ledger(SCOPE)
        assert ledger.entries == [] and ledger.budget == privacy.PrivacyBudget(epsilon=3.0, delta=1e-5)
        state.write_ledger(SCOPE, privacy.charge(ledger, _charge(1)))
    assert os.stat(state.ledger_path("banks")).st_mode & 0o777 == 0o600
    lowered = BudgetScope(ledger="banks", budget=PrivacyBudget(epsilon=1.0, delta=1e-6))
    with state.transaction():
        again = state.read_ledger(lowered)  # the entries stay; the policy's (new) budget applies
    assert [e.key for e in again.entries] == [("r", 1)]
    assert again.budget == privacy.PrivacyBudget(epsilon=1.0, delta=1e-6)


def test_a_ledger_others_can_read_or_that_is_not_a_ledger_is_refused(tmp_path: Path):
    state = SiteState(tmp_path / "state.json")
    with state.transaction():
        state.write_ledger(SCOPE, state.read_ledger(SCOPE))
    path = state.ledger_path("banks")
    path.chmod(0o644)
    with pytest.raises(SiteStateError, match="mode 600"), state.transaction():
        state.read_ledger(SCOPE)
    path.chmod(0o600)
    path.write_text('{"schema_version": 1, "budget": {"epsilon": 1, "delta": 1e-5}, "entries": [{}]}')
    with pytest.raises(SiteStateError, match="not a privacy ledger"), state.transaction():
        state.read_ledger(SCOPE)
