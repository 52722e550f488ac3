"""Where embedded services come from: absolute binary paths (they start in their own working directory) and
ports no outgoing connection can take."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lepton_tasks.ops.embedded.process import which


def test_a_binary_found_through_a_relative_path_entry_is_absolute(tmp_path, monkeypatch):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    tool = bin_dir / "lepton-fake-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"venv/bin{os.pathsep}/usr/bin")
    found = which("lepton-fake-tool")
    assert found == str(tool) and os.path.isabs(found)
    assert which("lepton-no-such-tool") is None


def test_free_ports_are_outside_the_ephemeral_range():
    """An outgoing connection can take an ephemeral port while a stack is down: stacks' ports avoid them."""
    from lepton_tasks.ops.embedded.process import FREE_PORT_RANGE, free_port
    from lepton_tasks.ops.embedded.stack import Ports

    low, high = FREE_PORT_RANGE
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert high < ephemeral_low
    for _ in range(20):
        port = free_port(also_free_offsets=(10000,))
        assert low <= port and port + 10000 <= high
    taken: set[int] = set()
    ports = [Ports.free(taken) for _ in range(4)]
    chosen = [v for p in ports for v in vars(p).values()]
    assert len(chosen) == len(set(chosen)) and all(low <= v <= high for v in chosen)
