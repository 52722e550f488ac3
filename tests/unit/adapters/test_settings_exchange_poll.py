"""The site's exchange watcher poll interval (``LEPTON_EXCHANGE_POLL_SECONDS``): a default that keeps
requests to the coordinator's storage few, settable per site (the demo's sites poll faster), and never zero,
negative or not a number (a watcher that would spin on the coordinator's storage, or never poll)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lepton_tasks.adapters.settings import Settings, load_settings


def test_the_default_is_ten_seconds(monkeypatch, tmp_path):
    monkeypatch.delenv("LEPTON_EXCHANGE_POLL_SECONDS", raising=False)
    assert load_settings(data_dir=tmp_path).exchange_poll_seconds == 10.0


def test_the_environment_sets_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LEPTON_EXCHANGE_POLL_SECONDS", "2")
    assert load_settings(data_dir=tmp_path).exchange_poll_seconds == 2.0


def test_lepton_env_sets_it(monkeypatch, tmp_path):
    monkeypatch.delenv("LEPTON_EXCHANGE_POLL_SECONDS", raising=False)
    (tmp_path / "lepton.env").write_text("LEPTON_EXCHANGE_POLL_SECONDS=0.5\n")
    assert load_settings(data_dir=tmp_path).exchange_poll_seconds == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_zero_negative_or_no_number_is_refused(monkeypatch, value):
    monkeypatch.setenv("LEPTON_EXCHANGE_POLL_SECONDS", value)
    with pytest.raises(ValidationError, match="exchange_poll_seconds"):
        Settings()
