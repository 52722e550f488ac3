"""The embedded stack as a whole: ``up`` (idempotent), ``down`` (only what we started), ``status``.

``up`` starts what is not running and only that: an Airflow component that died is restarted alone (with
its orphans stopped first), the others keep running. When a Docker daemon answers, ``up`` also makes sure
the trainers' internal network exists and runs the trainer gateway on its gateway address (see
:mod:`~lepton_tasks.ops.embedded.gateway`), so trainer containers reach OpenBao and SeaweedFS while both stay
bound to 127.0.0.1. The gateway is stopped while SeaweedFS (re)starts: ``weed mini`` refuses an S3 port
that is taken on any address, the gateway's included. The data directory is private (0700; services run
with umask 077).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lepton_tasks.adapters.settings import Role, Settings, load_settings
from lepton_tasks.adapters.signing import (
    COORDINATOR_SIGNER_POLICY,
    COORDINATOR_TOKEN_PERIOD,
    setup_coordinator_signer,
)
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.ops.embedded.airflow import COMPONENTS, EmbeddedAirflow, secure_data_dir
from lepton_tasks.ops.embedded.docker import (
    BUILTIN_NETWORKS,
    DEFAULT_TRAINER_NETWORK,
    TrainerNetworkError,
    docker_status,
    ensure_trainer_network,
)
from lepton_tasks.ops.embedded.gateway import TrainerGateway
from lepton_tasks.ops.embedded.openbao import OpenBao
from lepton_tasks.ops.embedded.process import ManagedProcess, ServiceError, write_secret
from lepton_tasks.ops.embedded.seaweedfs import SeaweedFS

REPO_ROOT = Path(__file__).resolve().parents[3]
#: an embedded site lists its exchange bucket every 2 s (``Settings.exchange_poll_seconds``, 10 s by default):
#: the coordinator's storage is on the same machine, and a job seen sooner is a round finished sooner
EMBEDDED_SITE_POLL_S = 2.0


@dataclass
class Ports:
    """Ports of the embedded services (all on the bind host). Override with ``LEPTON_PORT_*``."""

    vault: int = 8200  # +1 for the raft cluster port
    s3: int = 8333
    s3_master: int = 9333
    s3_volume: int = 9340
    s3_filer: int = 8888
    s3_admin: int = 23646
    airflow: int = 8080

    @classmethod
    def free(cls, taken: set[int] | None = None) -> Ports:
        """Free loopback ports for every service (tests, parallel stacks); gRPC offsets included. ``taken``:
        ports already given to other stacks that are not listening yet (updated with the ports chosen)."""
        from lepton_tasks.ops.embedded.process import free_port

        taken = set() if taken is None else taken

        def pick(*offsets: int) -> int:
            while True:
                p = free_port(also_free_offsets=offsets)
                used = {p, *(p + o for o in offsets)}
                if not used & taken:
                    taken.update(used)
                    return p

        return cls(
            vault=pick(1),
            s3=pick(10000),
            s3_master=pick(10000),
            s3_volume=pick(10000),
            s3_filer=pick(10000),
            s3_admin=pick(10000),
            airflow=pick(),
        )

    @classmethod
    def load(cls, data_dir: Path) -> Ports:
        """The ports ``lepton up`` used for this data dir (``ports.json``), overridden by
        ``LEPTON_PORT_*``."""
        p = cls()
        saved = data_dir / "ports.json"
        if saved.is_file():
            for name, value in json.loads(saved.read_text()).items():
                if name in p.__dataclass_fields__:
                    setattr(p, name, int(value))
        return cls.from_env(p)

    @classmethod
    def from_env(cls, base: Ports | None = None) -> Ports:
        p = base or cls()
        for name in p.__dataclass_fields__:
            val = os.environ.get(f"LEPTON_PORT_{name.upper()}")
            if val:
                setattr(p, name, int(val))
        return p


def trainer_network_name() -> str:
    """The embedded stack's trainer network: ``LEPTON_TRAINER_NETWORK`` when set (``host`` opts out of the
    isolated network), else :data:`DEFAULT_TRAINER_NETWORK`."""
    return os.environ.get("LEPTON_TRAINER_NETWORK") or DEFAULT_TRAINER_NETWORK


@dataclass
class Stack:
    data_dir: Path
    ports: Ports = field(default_factory=Ports.from_env)
    host: str = "127.0.0.1"
    repo_root: Path = REPO_ROOT
    #: which organization this stack is (``Settings.role``), written to ``lepton.env`` and Airflow's env
    role: Role = "single"

    @property
    def openbao(self) -> OpenBao:
        return OpenBao(self.data_dir, self.host, self.ports.vault)

    @property
    def seaweedfs(self) -> SeaweedFS:
        p = self.ports
        return SeaweedFS(
            self.data_dir,
            self.host,
            p.s3,
            p.s3_master,
            p.s3_volume,
            p.s3_filer,
            p.s3_admin,
            coordinator=self.role == "coordinator",
        )

    def airflow(self, settings: Settings) -> EmbeddedAirflow:
        """The embedded Airflow; its S3 connection carries Airflow's own identity, not the admin's."""
        return EmbeddedAirflow(settings, self.repo_root, s3_identity=self.seaweedfs.airflow_credentials())

    def airflow_settings(self) -> Settings:
        """The settings Airflow's tasks work with (what its connections carry): Airflow's own S3 identity
        and the operator Vault token. Use this, not :meth:`settings` (the CLI's admin view), to act as
        Airflow would."""
        return self.airflow(self.settings()).task_settings()

    @property
    def gateway_proc(self) -> ManagedProcess:
        return ManagedProcess("trainer-gateway", self.data_dir / "run")

    def trainer_gateway(self, network_name: str = DEFAULT_TRAINER_NETWORK) -> TrainerGateway | None:
        """The gateway for the trainer network (created when missing), or None without a Docker daemon."""
        if network_name in BUILTIN_NETWORKS or not docker_status().daemon_ok:
            return None
        net = ensure_trainer_network(network_name)
        if not net.gateway or not net.subnet:
            raise ServiceError(f"the trainer network {net.name} has no IPv4 gateway/subnet")
        p = self.ports
        return TrainerGateway(self.data_dir, net.gateway, net.subnet, ((p.vault, p.vault), (p.s3, p.s3)))

    @property
    def operator_token_file(self) -> Path:
        return self.data_dir / "openbao" / "operator-token"

    def settings(self) -> Settings:
        """Settings pointing at this stack (written to ``lepton.env`` by :meth:`up`)."""
        values: dict[str, object] = {
            "data_dir": self.data_dir,
            "bind_host": self.host,
            "s3_endpoint": self.seaweedfs.endpoint,
            "s3_master_port": self.ports.s3_master,
            "vault_addr": self.openbao.addr,
            "airflow_port": self.ports.airflow,
            "trainer_network": trainer_network_name(),
            "role": self.role,
        }
        if self.role == "site" and "LEPTON_EXCHANGE_POLL_SECONDS" not in os.environ:
            values["exchange_poll_seconds"] = EMBEDDED_SITE_POLL_S
        if self.seaweedfs.credentials_file.exists():
            access, secret = self.seaweedfs.admin_credentials()
            values |= {"s3_access_key": access, "s3_secret_key": secret}
        if self.operator_token_file.exists():
            values["vault_token"] = self.operator_token_file.read_text().strip()
        return Settings(**values)  # type: ignore[arg-type]

    def root_vault(self) -> Vault:
        return Vault.connect(self.openbao.addr, self.openbao.root_token())

    def up(self, *, with_airflow: bool = True) -> dict[str, bool]:
        """Start what is not running; return ``{service: started_now}`` (Airflow: one entry per component,
        ``airflow-scheduler`` etc.; ``trainer-gateway`` when a Docker daemon answers)."""
        secure_data_dir(self.data_dir)
        if not (self.openbao.proc.running() or self.seaweedfs.proc.running()):  # record where we listen
            (self.data_dir / "ports.json").write_text(json.dumps(asdict(self.ports), indent=1))
        started = {"openbao": self.openbao.start()}
        if self.role == "coordinator":
            self._setup_coordinator_vault()
        elif not self.operator_token_file.exists():
            token = self.root_vault().setup_operator(self.settings().key_prefix)
            write_secret(self.operator_token_file, token.encode())
        else:  # a stack made by an older Lepton: its operator policy gets what this one needs (job wrapping)
            self.root_vault().write_operator_policy(self.settings().key_prefix)
        if not self.seaweedfs.up_to_date():
            # The trainer gateway listens on <gateway address>:<s3 port> and `weed mini` refuses an S3 port
            # taken on any address: stop it while SeaweedFS starts; it is started again below.
            self.gateway_proc.stop()
        started["seaweedfs"] = self.seaweedfs.start()
        settings = self.settings()
        storage = Storage.from_settings(settings)
        for bucket in settings.shared_buckets():
            storage.ensure_bucket(bucket)
        self.write_env(self.airflow(settings).task_settings())  # Airflow's identity, never the admin's
        try:  # a coordinator trains nothing: no trainer network, no gateway
            gateway = None if self.role == "coordinator" else self.trainer_gateway(settings.trainer_network)
        except TrainerNetworkError as exc:
            raise ServiceError(f"trainer network: {exc}") from exc
        if gateway is not None:
            started["trainer-gateway"] = gateway.start()
        if with_airflow:
            restarted = self.airflow(settings).start_components()
            started |= {f"airflow-{c}": c in restarted for c in COMPONENTS}
        return started

    def _setup_coordinator_vault(self) -> None:
        """A coordinator's Airflow gets a token that can sign with the coordinator key and nothing else: no
        operator policy and no trainer role exist in its OpenBao (same set-up as compose's ``vault-init``)."""
        root = self.root_vault()
        settings = self.settings()
        setup_coordinator_signer(
            root.client, settings.coordinator_key_name, transit_mount=settings.transit_mount
        )
        if not self.operator_token_file.exists():
            auth = root.client.auth.token.create(
                policies=[COORDINATOR_SIGNER_POLICY],
                no_default_policy=True,
                period=COORDINATOR_TOKEN_PERIOD,
                display_name="lepton-coordinator",
            )["auth"]
            write_secret(self.operator_token_file, str(auth["client_token"]).encode())

    def write_env(self, settings: Settings) -> Path:
        """``<data_dir>/lepton.env`` (0600): what every Lepton process reads to find the stack. :meth:`up`
        writes Airflow's S3 identity into it, not the storage admin's (the CLI reads those from
        ``seaweedfs/admin-credentials.json``)."""
        lines = {
            "LEPTON_DATA_DIR": str(settings.data_dir),
            "LEPTON_S3_ENDPOINT": settings.s3_endpoint,
            "LEPTON_S3_MASTER_PORT": str(settings.s3_master_port),
            "LEPTON_S3_ACCESS_KEY": settings.s3_access_key,
            "LEPTON_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
            "LEPTON_VAULT_ADDR": settings.vault_addr,
            "LEPTON_VAULT_TOKEN": settings.vault_token.get_secret_value(),
            "LEPTON_AIRFLOW_PORT": str(settings.airflow_port),
            "LEPTON_ROLE": settings.role,
            # trainers join the internal network reached through the trainer gateway, not the host network
            "LEPTON_TRAINER_NETWORK": settings.trainer_network,
        }
        body = "".join(f"{k}={v}\n" for k, v in lines.items())
        write_secret(settings.env_file, body.encode())
        return settings.env_file

    def down(self) -> list[str]:
        """Stop the processes this stack started (pid files), newest first."""
        stopped = [f"airflow-{c}" for c in self.airflow(self.settings()).stop()]
        if self.gateway_proc.stop():
            stopped.append("trainer-gateway")
        if self.seaweedfs.stop():
            stopped.append("seaweedfs")
        if self.openbao.stop():
            stopped.append("openbao")
        return stopped

    def status(self) -> list[dict[str, str]]:
        settings = self.settings()
        rows = []
        bao = self.openbao
        h = bao.health() if bao.proc.running() else None
        rows.append(
            {
                "service": "openbao",
                "pid": str(bao.proc.pid() or "-"),
                "address": bao.addr,
                "health": "unsealed" if h and not h.get("sealed") else ("sealed" if h else "down"),
                "log": str(bao.proc.log_file),
            }
        )
        sw = self.seaweedfs
        rows.append(
            {
                "service": "seaweedfs",
                "pid": str(sw.proc.pid() or "-"),
                "address": f"http://{sw.endpoint}",
                "health": "healthy" if sw.proc.running() and sw.healthy() else "down",
                "log": str(sw.proc.log_file),
            }
        )
        gw = self.gateway_proc
        if gw.pid_file.exists():
            rows.append(
                {
                    "service": "trainer-gateway",
                    "pid": str(gw.pid() or "-"),
                    "address": "-",
                    "health": _health(gw),
                    "log": str(gw.log_file),
                }
            )
        af = self.airflow(settings)
        for name, proc in af.procs().items():
            rows.append(
                {
                    "service": f"airflow-{name}",
                    "pid": str(proc.pid() or "-"),
                    "address": af.url if name == "api-server" else "-",
                    "health": _health(proc),
                    "log": str(proc.log_file),
                }
            )
        return rows


def _health(proc: ManagedProcess) -> str:
    """running | down | crashed (with the pids its session left behind: `lepton up`/`down` stop them)."""
    if proc.running():
        return "running"
    left = proc.leftovers()
    if left:
        return f"crashed; {len(left)} orphaned process(es) {','.join(map(str, left))}: run `lepton up`"
    return "down"


def default_stack() -> Stack:
    settings = load_settings()
    return Stack(settings.data_dir, ports=Ports.load(settings.data_dir), role=settings.role)
