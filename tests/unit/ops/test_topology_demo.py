"""The topology demo's checks that need no service (the run itself: ``lepton demo topology``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import docker.errors  # binds ``docker`` too
import pytest

from lepton_tasks.ops.topology_demo import (
    TopologyDemoError,
    _MemorySampler,
    check_trainer_image,
    ingest_at_sites,
    run_topology_demo,
)


def test_an_unknown_scenario_fails_before_anything_is_created(tmp_path):
    with pytest.raises(TopologyDemoError, match="unknown scenario 'nope'"):
        run_topology_demo(tmp_path / "topo", ["hosp-a"], scenario="nope")
    assert not (tmp_path / "topo").exists()


def test_more_sites_than_the_scenario_has_partners_fails_naming_both():
    topo = SimpleNamespace(sites=("s-1", "s-2", "s-3", "s-4"))
    with pytest.raises(TopologyDemoError, match="3 partners' files for 4 sites"):
        next(ingest_at_sites(topo, "banks", seed=7))  # type: ignore[arg-type]


def test_no_docker_daemon_means_no_image_to_check(monkeypatch):
    def no_daemon(**_: object) -> None:
        raise docker.errors.DockerException("no daemon")

    monkeypatch.setattr(docker, "from_env", no_daemon)
    assert "no Docker daemon" in check_trainer_image(None)  # type: ignore[arg-type]


def test_a_stale_image_fails_before_the_stacks_start(monkeypatch):
    client = SimpleNamespace(ping=lambda: True)
    monkeypatch.setattr(docker, "from_env", lambda **_: client)
    monkeypatch.setattr(
        "lepton_tasks.ops.images.trainer_image_freshness",
        lambda c, image: SimpleNamespace(stale=True, reason=f"trainer image {image} is stale"),
    )
    stack = SimpleNamespace(settings=lambda: SimpleNamespace(trainer_image="lepton-trainer:latest"))
    with pytest.raises(TopologyDemoError, match="lepton-trainer:latest is stale"):
        check_trainer_image(stack)  # type: ignore[arg-type]


def test_the_memory_sampler_sums_nothing_without_pid_files(tmp_path: Path):
    stack = SimpleNamespace(data_dir=tmp_path)
    assert _MemorySampler([stack]).sample() == 0  # type: ignore[list-item]


def test_the_demos_sites_are_the_scenarios_partners_under_their_partner_names():
    from lepton_tasks.ops.topology_demo import site_names

    assert site_names("banks") == ["bank-a", "bank-b", "bank-c"]
