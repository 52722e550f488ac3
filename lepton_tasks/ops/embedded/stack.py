"""The embedded stack as a whole: ``up`` (idempotent), ``down`` (only what we started), ``status``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lepton_tasks.adapters.settings import Settings, load_settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.ops.embedded.airflow import EmbeddedAirflow
from lepton_tasks.ops.embedded.openbao import OpenBao
from lepton_tasks.ops.embedded.process import write_secret
from lepton_tasks.ops.embedded.seaweedfs import SeaweedFS

REPO_ROOT = Path(__file__).resolve().parents[3]


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
    def free(cls) -> Ports:
        """Free loopback ports for every service (tests, parallel stacks); gRPC offsets included."""
        from lepton_tasks.ops.embedded.process import free_port

        taken: set[int] = set()

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
        """The ports ``lepton up`` used for this data dir (``ports.json``), overridden by ``LEPTON_PORT_*``."""
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


@dataclass
class Stack:
    data_dir: Path
    ports: Ports = field(default_factory=Ports.from_env)
    host: str = "127.0.0.1"
    repo_root: Path = REPO_ROOT

    @property
    def openbao(self) -> OpenBao:
        return OpenBao(self.data_dir, self.host, self.ports.vault)

    @property
    def seaweedfs(self) -> SeaweedFS:
        p = self.ports
        return SeaweedFS(self.data_dir, self.host, p.s3, p.s3_master, p.s3_volume, p.s3_filer, p.s3_admin)

    def airflow(self, settings: Settings) -> EmbeddedAirflow:
        return EmbeddedAirflow(settings, self.repo_root)

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
        }
        if self.seaweedfs.credentials_file.exists():
            access, secret = self.seaweedfs.admin_credentials()
            values |= {"s3_access_key": access, "s3_secret_key": secret}
        if self.operator_token_file.exists():
            values["vault_token"] = self.operator_token_file.read_text().strip()
        return Settings(**values)  # type: ignore[arg-type]

    def root_vault(self) -> Vault:
        return Vault.connect(self.openbao.addr, self.openbao.root_token())

    def up(self, *, with_airflow: bool = True) -> dict[str, bool]:
        """Start what is not running; return ``{service: started_now}``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.openbao.proc.running() or self.seaweedfs.proc.running()):  # record where we listen
            (self.data_dir / "ports.json").write_text(json.dumps(asdict(self.ports), indent=1))
        started = {"openbao": self.openbao.start()}
        if not self.operator_token_file.exists():
            token = self.root_vault().setup_operator(self.settings().key_prefix)
            write_secret(self.operator_token_file, token.encode())
        started["seaweedfs"] = self.seaweedfs.start()
        settings = self.settings()
        storage = Storage.from_settings(settings)
        for bucket in settings.shared_buckets():
            storage.ensure_bucket(bucket)
        self.write_env(settings)
        if with_airflow:
            started["airflow"] = self.airflow(settings).start()
        return started

    def write_env(self, settings: Settings) -> Path:
        """``<data_dir>/lepton.env`` (0600): what every Lepton process reads to find the stack."""
        lines = {
            "LEPTON_DATA_DIR": str(settings.data_dir),
            "LEPTON_S3_ENDPOINT": settings.s3_endpoint,
            "LEPTON_S3_MASTER_PORT": str(settings.s3_master_port),
            "LEPTON_S3_ACCESS_KEY": settings.s3_access_key,
            "LEPTON_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
            "LEPTON_VAULT_ADDR": settings.vault_addr,
            "LEPTON_VAULT_TOKEN": settings.vault_token.get_secret_value(),
            "LEPTON_AIRFLOW_PORT": str(settings.airflow_port),
        }
        body = "".join(f"{k}={v}\n" for k, v in lines.items())
        write_secret(settings.env_file, body.encode())
        return settings.env_file

    def down(self) -> list[str]:
        """Stop the processes this stack started (pid files), newest first."""
        stopped = [f"airflow-{c}" for c in self.airflow(self.settings()).stop()]
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
        af = self.airflow(settings)
        for name, proc in af.procs().items():
            rows.append(
                {
                    "service": f"airflow-{name}",
                    "pid": str(proc.pid() or "-"),
                    "address": af.url if name == "api-server" else "-",
                    "health": "running" if proc.running() else "down",
                    "log": str(proc.log_file),
                }
            )
        return rows


def default_stack() -> Stack:
    data_dir = load_settings().data_dir
    return Stack(data_dir, ports=Ports.load(data_dir))
