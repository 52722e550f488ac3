"""Start, watch and stop the background processes of the embedded stack.

Every service runs in its own session (``start_new_session=True``: the service is the session leader, its
pid is the session id). Its pid and the kernel's start time of that pid are written to a pid file, so
``stop`` signals exactly the processes of the session it started — never a process found by name, and never
a recycled pid:

- every process the service forks stays in its session unless it calls ``setsid`` itself (Airflow's
  LocalExecutor workers and task processes do not: the task runner only takes its own process *group*), so
  the members of the session are found through ``/proc/<pid>/stat`` (field ``session``) even after the
  leader crashed and its children were re-parented to init;
- Linux does not hand out a pid again while a process still uses it as its session (or group) id, so when
  the leader is gone but members remain, those members are ours; when a process with the leader's pid exists
  with another start time, the pid was recycled and nothing of ours is left;
- each member is signalled through a pidfd opened after checking its session, so a member that exits in
  between cannot make us signal a stranger.

Stopping sends SIGTERM to the leader, waits, then SIGTERM to the members still there (LocalExecutor workers
orphaned by a crashed scheduler ignore it), and SIGKILL after a short grace period.

Children run with ``umask 077``: what a service writes (logs, databases, state) is private to the user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

#: the umask of every service process: files 0600, directories 0700
SERVICE_UMASK = 0o077
#: seconds the members of a session get between SIGTERM and SIGKILL once their leader is gone
MEMBER_GRACE_S = 3.0


class ServiceError(RuntimeError):
    """A service failed to start or become healthy; the message names the service and its log file."""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` fields after the command name: [0] state, [3] session, [19] starttime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _proc_start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    # field 22 (starttime) comes after the ")" closing the command name
    return fields[19] if fields else None


def session_members(sid: int) -> list[int]:
    """Pids of the live (non-zombie) processes whose session id is ``sid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return sorted(found)


def _signal_member(pid: int, sid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` only if it is (still) in session ``sid``; a pidfd makes that race-free."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone, or an old kernel/Python: fall back to a checked kill
        fd = None
    try:
        fields = _stat_fields(pid)
        if not fields or int(fields[3]) != sid:
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


def config_digest(argv: Iterable[str], env: dict[str, str] | None = None, extra: bytes = b"") -> str:
    """A digest of what a service was started with (argv, the environment it was given, config bytes).

    Kept in the pid file, so ``up`` can tell a running service whose configuration changed (restart it) from
    one that is current (leave it alone). Secrets go in only hashed.
    """
    h = hashlib.sha256()
    for part in argv:
        h.update(b"argv\0" + part.encode() + b"\0")
    for k, v in sorted((env or {}).items()):
        h.update(b"env\0" + k.encode() + b"=" + v.encode() + b"\0")
    h.update(b"extra\0" + extra)
    return h.hexdigest()


def open_private_append(path: Path):
    """Open ``path`` for appending, created 0600 (and made 0600 when it existed with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by the owner only (created 0600, never wider in between)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def which(name: str) -> str | None:
    """``shutil.which`` as an absolute path: services start in their own working directory, so a binary found
    through a relative ``PATH`` entry (``PATH=.venv/bin:…``) must not stay relative."""
    import shutil

    found = shutil.which(name)
    return os.path.abspath(found) if found else None


#: where :func:`free_port` looks: below Linux's default ephemeral range (32768–60999), so an outgoing
#: connection of any program cannot take a stack's port while that stack is down (``lepton up`` would fail)
FREE_PORT_RANGE = (20000, 32767)


def free_port(host: str = "127.0.0.1", *, also_free_offsets: tuple[int, ...] = ()) -> int:
    """A free port on ``host`` such that ``port + offset`` is free too for every offset given, all of them
    within :data:`FREE_PORT_RANGE`."""
    import random

    low, high = FREE_PORT_RANGE
    top = high - max(also_free_offsets, default=0)
    for _ in range(500):
        port = random.randint(low, top)
        if port_free(host, port) and all(port_free(host, port + off) for off in also_free_offsets):
            return port
    raise ServiceError(f"could not find a free port on {host}")


def require_ports_free(service: str, host: str, ports: list[int], *, grace: float = 5.0) -> None:
    """Raise a clear :class:`ServiceError` when one of ``ports`` is still taken after ``grace`` seconds (a
    multi-threaded server killed a moment ago can look dead while its last threads still hold its sockets)."""
    deadline = time.monotonic() + grace
    for port in ports:
        while not port_free(host, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not port_free(host, port):
            raise ServiceError(
                f"{service}: port {host}:{port} is already in use by another process. "
                f"Stop that process or choose other ports (see `lepton up --help` / LEPTON_* settings)."
            )


@dataclass
class ManagedProcess:
    """A background process owned by Lepton (the leader of its own session), identified by its pid file."""

    name: str
    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir.parent / "logs" / f"{self.name}.log"

    def _record(self) -> dict | None:
        """The pid file's content (pid, start_time, config), or None (a corrupt pid file is removed)."""
        if not self.pid_file.is_file():
            return None
        try:
            info = json.loads(self.pid_file.read_text())
            info["pid"], info["start_time"] = int(info["pid"]), str(info["start_time"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.pid_file.unlink(missing_ok=True)
            return None
        return info

    def _leader_state(self, info: dict) -> str:
        """``alive`` (our leader runs), ``dead`` (it exited; its session may live on) or ``recycled``."""
        pid = info["pid"]
        started = _proc_start_time(pid)
        if started is None:
            return "dead"
        if started != info["start_time"]:
            return "recycled"  # another process has the pid: none of our session can be left
        if _is_zombie(pid):
            _reap(pid)
            return "dead"
        return "alive"

    def pid(self) -> int | None:
        """The pid of the running process we started, or None. A pid file is removed once nothing of the
        session is left (a crashed leader's orphans keep it, so :meth:`stop` can still find them)."""
        info = self._record()
        if info is None:
            return None
        state = self._leader_state(info)
        if state == "alive":
            return info["pid"]
        if state == "recycled" or not session_members(info["pid"]):
            self.pid_file.unlink(missing_ok=True)
        return None

    def running(self) -> bool:
        return self.pid() is not None

    def leftovers(self) -> list[int]:
        """Processes of our session still alive although the leader is gone (e.g. a crashed scheduler's
        LocalExecutor workers)."""
        info = self._record()
        if info is None or self._leader_state(info) != "dead":
            return []
        return session_members(info["pid"])

    def config(self) -> str | None:
        """The :func:`config_digest` the running process was started with (None: unknown or not running)."""
        info = self._record()
        return str(info.get("config")) if info and info.get("config") and self.running() else None

    def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        base_env: dict[str, str] | None = None,
        config: str | None = None,
    ) -> int:
        """Start ``argv`` in a new session (umask 077), logging to :attr:`log_file` (0600); return its pid.

        The child's environment is ``base_env`` (default: this process's) updated with ``env``. Leftovers of
        an earlier session of this service are stopped first. ``config`` (default: a digest of ``argv`` and
        ``env``) is recorded for :meth:`config`.
        """
        if self._record() is not None:
            self.stop()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open_private_append(self.log_file) as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**(os.environ if base_env is None else base_env), **(env or {})},
                cwd=cwd,
                start_new_session=True,
                umask=SERVICE_UMASK,
            )
        started = None
        for _ in range(50):
            started = _proc_start_time(proc.pid)
            if started:
                break
            time.sleep(0.01)
        record = {
            "pid": proc.pid,
            "start_time": started,
            "argv": argv[:2],
            "config": config or config_digest(argv, env),
        }
        write_secret(self.pid_file, json.dumps(record).encode())
        return proc.pid

    def stop(self, timeout: float = 20.0, grace: float = MEMBER_GRACE_S) -> bool:
        """Stop the session we started: the leader (SIGTERM, SIGKILL after ``timeout``), then every process
        left in its session (SIGTERM, SIGKILL after ``grace``). Return True if something was stopped."""
        info = self._record()
        if info is None:
            return False
        sid = info["pid"]
        state = self._leader_state(info)
        if state == "recycled":
            self.pid_file.unlink(missing_ok=True)
            return False
        stopped = False
        if state == "alive":
            _signal_member(sid, sid, signal.SIGTERM)
            stopped = True
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _proc_start_time(sid) is not None and not _is_zombie(sid):
                time.sleep(0.1)
            _signal_member(sid, sid, signal.SIGKILL)  # a no-op when it exited
            _reap(sid)
        members = session_members(sid)
        if members:
            stopped = True
            for pid in members:
                _signal_member(pid, sid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and session_members(sid):
                time.sleep(0.1)
            for pid in session_members(sid):
                _signal_member(pid, sid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and session_members(sid):
                time.sleep(0.05)
        _reap(sid)
        self.pid_file.unlink(missing_ok=True)
        return stopped

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
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


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
