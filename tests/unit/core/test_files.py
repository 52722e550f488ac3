"""write_private: atomic, owner-only files (state, ledgers, policies, bundles, round secrets)."""

from __future__ import annotations

import os
import stat

import pytest

from lepton_tasks.core.files import write_private


def test_the_file_is_0600_in_a_0700_folder_and_no_temp_file_is_left(tmp_path):
    path = tmp_path / "site" / "state.json"
    write_private(path, b"one")
    write_private(path, b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_an_existing_file_with_wider_permissions_is_replaced_by_a_private_one(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_private(path, b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_private(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_link_at_the_temp_name_is_never_followed(tmp_path):
    """The temp file is created exclusively under a fresh name: a planted link cannot redirect the write."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path = tmp_path / "f.json"
    (tmp_path / ".f.json.tmp").symlink_to(victim)  # the old fixed temp name
    write_private(path, b"data")
    assert victim.read_bytes() == b"untouched" and path.read_bytes() == b"data"
