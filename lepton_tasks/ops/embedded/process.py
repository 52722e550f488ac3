"""Start, watch and stop the background processes of the embedded stack.

Every service runs in its own process group (``start_new_session=True``). Its pid and the kernel's start
time of that pid are written to a pid file, so ``stop`` signals exactly the process group it started —
never a process found by name, and never a recycled pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ServiceError(RuntimeError):
    """A service failed to start or become healthy; the message names the service and its log file."""


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime) comes after the ")" closing the command name
    return stat.rsplit(")", 1)[1].split()[19]


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` and we could bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, also_free_offsets: tuple[int, ...] = ()) -> int:
    """A free port on ``host`` such that ``port + offset`` is free too for every offset given."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port + max(also_free_offsets, default=0) > 65535:
            continue
        if all(port_free(host, port + off) for off in also_free_offsets):
            return port
    raise ServiceError(f"could not find a free port on {host}")


def require_ports_free(service: str, host: str, ports: list[int]) -> None:
    """Raise a clear :class:`ServiceError` when one of ``ports`` is already taken."""
    for port in ports:
        if not port_free(host, port):
            raise ServiceError(
                f"{service}: port {host}:{port} is already in use by another process. "
                f"Stop that process or choose other ports (see `lepton up --help` / LEPTON_* settings)."
            )


@dataclass
class ManagedProcess:
    """A background process owned by Lepton, identified by its pid file."""

    name: str
    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir.parent / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of the running process we started, or None (stale pid files are removed)."""
        if not self.pid_file.is_file():
            return None
        try:
            info = json.loads(self.pid_file.read_text())
            pid, started = int(info["pid"]), str(info["start_time"])
        except (ValueError, KeyError, json.JSONDecodeError):
            self.pid_file.unlink(missing_ok=True)
            return None
        if _proc_start_time(pid) != started or _is_zombie(pid):
            _reap(pid)
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        base_env: dict[str, str] | None = None,
    ) -> int:
        """Start ``argv`` in a new session, logging to :attr:`log_file`; return its pid.

        The child's environment is ``base_env`` (default: this process's) updated with ``env``.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**(os.environ if base_env is None else base_env), **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        started = None
        for _ in range(50):
            started = _proc_start_time(proc.pid)
            if started:
                break
            time.sleep(0.01)
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "start_time": started, "argv": argv[:2]}))
        return proc.pid

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the process group we started. Return True if something was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _proc_start_time(pid) is None or _is_zombie(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(
    check: Callable[[], bool],
    *,
    service: str,
    timeout: float,
    proc: ManagedProcess | None = None,
    interval: float = 0.2,
) -> None:
    """Poll ``check`` until it returns True; raise :class:`ServiceError` naming the service and its log."""
    deadline = time.monotonic() + timeout
    last_error: str = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.running():
            raise ServiceError(
                f"{service} exited during start-up; see its log {proc.log_file}:\n{proc.log_tail()}"
            )
        try:
            if check():
                return
        except OSError as exc:  # connection refused while starting
            last_error = str(exc)
        time.sleep(interval)
    where = f"; see its log {proc.log_file}" if proc is not None else ""
    raise ServiceError(
        f"{service} did not become healthy within {timeout:.0f}s{where} (last error: {last_error})"
    )
