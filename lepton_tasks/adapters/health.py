"""Service health probes: one typed answer per service (Vault, S3) and one clear error when any is down.

A task that needs Vault and S3 (the trainer operator) probes both *before* it mints a token or starts a
container: when one is down, the try fails at once with :class:`ServicesDown`, naming each service and its
address, instead of failing later deep inside a client library. It is a transient error (a plain
``RuntimeError``), so Airflow's retries with exponential backoff apply. The probes themselves live with
the clients: :func:`lepton_tasks.adapters.vault.vault_health` and
:meth:`lepton_tasks.adapters.storage.Storage.health`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the tail of every "service down" message: what happens next
RETRY_HINT = "Airflow retries this task with backoff"

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\[\]]+")


@dataclass(frozen=True)
class ServiceHealth:
    """One probe's answer. ``problem`` (empty when ``ok``) completes "<service> at <address> …"."""

    service: str
    address: str
    ok: bool
    problem: str = ""

    @property
    def message(self) -> str:
        return (
            f"{self.service} at {self.address} is up"
            if self.ok
            else f"{self.service} at {self.address} {self.problem}"
        )


class ServicesDown(RuntimeError):
    """A service a task needs is down (transient: the task's retries with backoff apply)."""

    def __init__(self, down: list[ServiceHealth]) -> None:
        self.down = down
        super().__init__(f"{'; '.join(h.message for h in down)}; {RETRY_HINT}")


def require_up(*healths: ServiceHealth) -> None:
    """Raise :class:`ServicesDown` naming every service that is not ok; return when all are."""
    down = [h for h in healths if not h.ok]
    if down:
        raise ServicesDown(down)


def connection_problem(exc: BaseException, timeout: float) -> str:
    """A short "is unreachable: …" for a connection failure (the OS error, not a library's traceback)."""
    chain = _chain(exc)
    for e in chain:
        if (found := _ERRNO.search(str(e))) is not None:
            return f"is unreachable: {found.group(0).strip()}"
    text = " ".join(str(e) for e in chain)
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return f"is unreachable: no answer within {timeout:g} s"
    return f"is unreachable: {type(exc).__name__}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen
