"""The embedded topology: a coordinator and N sites as separate stacks on one machine.

Each organization gets what it would have on its own machines: its own OpenBao, SeaweedFS and Airflow, its
own data directory (``<root>/coordinator``, ``<root>/sites/<name>``, each 0700) and its own ports, all on
127.0.0.1. They meet only where they would in production: a site reaches the coordinator's object storage
with the bucket-scoped credentials of its enrollment bundle; the coordinator holds no address or credential
of any site.

The ports of every stack are chosen together when the topology is created (so stacks that are not started
yet never collide) and kept in each data directory's ``ports.json``; ``topology.json`` at the root lists the
sites.

:meth:`Topology.enroll` plays both operators of the enrollment ceremony (``lepton coordinator enroll`` /
``lepton site import`` / ``lepton coordinator pin``): in production each fingerprint is read aloud between two
people; here the program compares them — the checks on both sides run exactly as they do there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lepton_tasks.adapters.settings import Role
from lepton_tasks.ops.embedded.stack import Ports, Stack

TOPOLOGY_FILE = "topology.json"
TOPOLOGY_SCHEMA_VERSION = 1


class TopologyError(ValueError):
    """A topology that cannot be created or read; the message says why."""


@dataclass(frozen=True)
class SiteSetup:
    """How :meth:`Topology.enroll` shapes a NEW site policy (an existing one is kept as the site left it)."""

    datasets: tuple[str, ...] = ("banks",)
    min_partners: int = 2
    #: the embedded demo runs unattended; a real site keeps the safe default (a person approves each run)
    approval_required: bool = False


@dataclass(frozen=True)
class Topology:
    root: Path
    sites: tuple[str, ...]

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, sites: list[str] | tuple[str, ...]) -> Topology:
        """Lay out the data directories and choose every stack's ports; idempotent for the same sites."""
        from lepton_tasks.federation.enrollment import validate_site_name

        if not sites:
            raise TopologyError("a topology needs at least one site")
        if len(set(sites)) != len(sites):
            raise TopologyError(f"duplicate site names in {list(sites)}")
        for name in sites:
            validate_site_name(name)
        if (root / TOPOLOGY_FILE).exists():
            existing = cls.load(root)
            if existing.sites != tuple(sites):
                raise TopologyError(
                    f"{root} already holds a topology with sites {list(existing.sites)}, not {list(sites)}: "
                    "stop it and remove the directory to start another"
                )
            return existing
        topo = cls(root, tuple(sites))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        taken: set[int] = set()
        for data_dir in topo.data_dirs().values():
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (data_dir / "ports.json").write_text(json.dumps(asdict(Ports.free(taken)), indent=1))
        doc = {"schema_version": TOPOLOGY_SCHEMA_VERSION, "sites": list(sites)}
        (root / TOPOLOGY_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        return topo

    @classmethod
    def load(cls, root: Path) -> Topology:
        path = root / TOPOLOGY_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise TopologyError(f"no topology at {root} (create one first)") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != TOPOLOGY_SCHEMA_VERSION:
            raise TopologyError(f"{path}: not a version-{TOPOLOGY_SCHEMA_VERSION} topology file")
        return cls(root, tuple(doc["sites"]))

    # ------------------------------------------------------------------------------------------------------
    def data_dirs(self) -> dict[str, Path]:
        """``{"coordinator": …, <site>: …}``: one private data directory per organization."""
        return {"coordinator": self.root / "coordinator"} | {s: self.root / "sites" / s for s in self.sites}

    def _stack(self, data_dir: Path, role: Role) -> Stack:
        return Stack(data_dir, ports=Ports.load(data_dir), role=role)

    def coordinator(self) -> Stack:
        return self._stack(self.data_dirs()["coordinator"], "coordinator")

    def site(self, name: str) -> Stack:
        if name not in self.sites:
            raise TopologyError(f"unknown site {name!r}; sites: {', '.join(self.sites)}")
        return self._stack(self.data_dirs()[name], "site")

    def stacks(self) -> dict[str, Stack]:
        return {"coordinator": self.coordinator()} | {s: self.site(s) for s in self.sites}

    def up(self, *, with_airflow: bool = True) -> dict[str, dict[str, bool]]:
        """Start every stack (each :meth:`Stack.up` is idempotent): ``{organization: {service: started}}``."""
        return {name: stack.up(with_airflow=with_airflow) for name, stack in self.stacks().items()}

    def down(self) -> dict[str, list[str]]:
        """Stop every stack, sites first (they poll the coordinator)."""
        stacks = self.stacks()
        order = [*self.sites, "coordinator"]
        return {name: stacks[name].down() for name in order}

    # ------------------------------------------------------------------------------------------------------
    def enroll(self, setup: SiteSetup | None = None) -> dict[str, str]:
        """Enroll every site not pinned yet: the coordinator's signing key, each site's exchange bucket and
        bundle, the site's own signing key and policy, and the pin. Returns ``{site: pinned fingerprint}``.

        Needs the stacks' OpenBao and SeaweedFS running (:meth:`up`)."""
        from lepton_tasks.adapters.signing import TransitSigner
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.core.site_policy import Approval
        from lepton_tasks.federation.enrollment import SiteRegistry, enroll_site, pin_site_key, read_bundle
        from lepton_tasks.ops.enrollment_cli import set_up_site
        from lepton_tasks.ops.partners import SeaweedIdentities
        from lepton_tasks.site.enrollment import DEFAULT_APPROVAL

        setup = setup or SiteSetup()
        coordinator = self.coordinator()
        cs = coordinator.settings()
        registry = SiteRegistry(cs.site_registry_file)
        signer = TransitSigner.from_vault(coordinator.root_vault(), cs.coordinator_key_name)
        signer.create_key()
        identities = SeaweedIdentities(coordinator.seaweedfs.shell)
        approval = (
            DEFAULT_APPROVAL
            if setup.approval_required
            else Approval(required=False, deadline=DEFAULT_APPROVAL.deadline)
        )
        pinned: dict[str, str] = {}
        for name in self.sites:
            site = self.site(name)
            ss = site.settings()
            entry = registry.load().get(name)
            if entry is not None and entry.pinned:
                pinned[name] = str(entry.fingerprint)
                continue
            if entry is None:
                bundle = enroll_site(
                    Storage.from_settings(cs),
                    identities,
                    signer,
                    registry=registry,
                    consortium=cs.consortium,
                    site=name,
                    endpoint=cs.s3_endpoint,
                    secure=cs.s3_secure,
                    region=cs.s3_region,
                )
            else:  # enrolled by an earlier, interrupted call: the site may hold its bundle already
                bundle = read_bundle(ss.site_bundle_file)
            identity = set_up_site(
                ss,
                site.root_vault(),
                bundle,
                confirmed_coordinator_fingerprint=bundle.coordinator_fingerprint,
                datasets=setup.datasets,
                min_partners=setup.min_partners,
                approval=approval,
            )
            entry = pin_site_key(
                registry, name, identity.public_key, identity.fingerprint, key_version=identity.key_version
            )
            pinned[name] = str(entry.fingerprint)
        return pinned

    def describe(self) -> dict[str, Any]:
        """Every organization's role, data directory and addresses (for ``lepton topology status``)."""
        out: dict[str, Any] = {}
        for name, stack in self.stacks().items():
            s = stack.settings()
            out[name] = {
                "role": stack.role,
                "data_dir": str(s.data_dir),
                "airflow": f"http://{s.bind_host}:{s.airflow_port}",
                "s3": f"http://{s.s3_endpoint}",
                "vault": s.vault_addr,
            }
        return out
