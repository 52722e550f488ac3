"""The site's small local state: which jobs it handled, which message ids it accepted, how far each run got.

One JSON file, mode 0600, in the site's data directory (never in the exchange bucket: the coordinator could
rewrite it there). It holds:

- ``seen_ids``: the message ids of jobs the site accepted and answered or refused — the ``seen_ids`` that
  :func:`lepton_tasks.core.exchange.open_message` rejects as replays;
- ``rounds``: per run, the highest round whose job the site accepted. A job of an earlier round of that
  run is stale: :func:`lepton_tasks.site.jobs.handle_job` passes it as ``min_round``, so a withheld job
  released after the site moved on is rejected as a replay;
- ``handled``: object key → outcome (``answered``, ``refused``, ``rejected:<reason>``) of every job key the
  site finished with, so a poll does not fetch it again (:func:`lepton_tasks.site.jobs.poll_jobs`);
- ``waiting``: object key → when the site first received a job that waits for a human's approval (the
  approval deadline counts from there).

The site's privacy ledgers (:mod:`lepton_tasks.core.privacy`) live beside the state file, mode 0600:
``<state stem>.privacy.json`` for the site-wide budget and ``<state stem>.privacy.<dataset>.json`` for a
dataset with a budget of its own (:meth:`SiteState.ledger_path`). They are read and written only inside a
state transaction (:meth:`SiteState.read_ledger`, :meth:`SiteState.write_ledger`), under the same lock.

:meth:`SiteState.transaction` holds an exclusive ``flock`` on a lock file beside the state for the whole
transaction, so two job tasks of one site never interleave their read-modify-write; the file is replaced
atomically (temp file, ``fsync``, rename).
"""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import UUID4, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from lepton_tasks.core import privacy
from lepton_tasks.core.files import write_private
from lepton_tasks.core.site_policy import SITE_LEDGER, BudgetScope

__all__ = ["SiteState", "SiteStateError", "StateDoc"]

STATE_MODE: Final = 0o600


class SiteStateError(RuntimeError):
    """The state file cannot be used safely (wrong mode, not a file, invalid content); names the file."""


class StateDoc(BaseModel):
    """The state file's content (schema version 1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    seen_ids: set[UUID4] = Field(default_factory=set)
    rounds: dict[str, int] = Field(default_factory=dict)
    handled: dict[str, str] = Field(default_factory=dict)
    waiting: dict[str, AwareDatetime] = Field(default_factory=dict)

    def min_round(self, run_id: str) -> int:
        """The earliest round of ``run_id`` still acceptable: the highest one accepted so far (a coordinator
        may re-send a round's job; the message id stops a replay of the same one)."""
        return self.rounds.get(run_id, 0)

    def accept_round(self, run_id: str, round_: int) -> None:
        self.rounds[run_id] = max(round_, self.rounds.get(run_id, 0))

    def finish(self, key: str, outcome: str, message_id: uuid.UUID | None = None) -> None:
        """Record that the job at ``key`` is done with (answered, refused or rejected)."""
        self.handled.setdefault(key, outcome)  # the first outcome stands (a later replay does not rewrite it)
        self.waiting.pop(key, None)
        if message_id is not None:
            self.seen_ids.add(message_id)

    def received_at(self, key: str, now: datetime) -> datetime:
        """When the waiting job at ``key`` was first received (``now`` on the first call)."""
        return self.waiting.setdefault(key, now)


class SiteState:
    """The state file at ``path`` (created on the first transaction; its directory is made 0700 if new)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")
        self._locked = False

    def __repr__(self) -> str:
        return f"SiteState({str(self.path)!r})"

    def _open_private(self, path: Path, flags: int) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, STATE_MODE)
        except OSError as exc:
            raise SiteStateError(f"{path}: cannot open ({exc.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            os.close(fd)
            raise SiteStateError(f"{path}: must be a regular file of mode 600 (is {st.st_mode & 0o777:o})")
        return fd

    def read(self) -> StateDoc:
        """The current state (empty when there is no file yet); no lock: a snapshot for polling."""
        try:
            fd = self._open_private(self.path, os.O_RDONLY)
        except SiteStateError:
            if not self.path.exists():
                return StateDoc()
            raise
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            return StateDoc.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise SiteStateError(f"{self.path}: not a site state (field {where}: {err['msg']})") from None

    def _write(self, doc: StateDoc) -> None:
        write_private(self.path, doc.model_dump_json().encode(), STATE_MODE)

    @contextmanager
    def transaction(self) -> Iterator[StateDoc]:
        """Lock, read, yield the state to change, write it back when the block ends without an exception."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self._open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._locked = True
            doc = self.read()
            yield doc
            self._write(doc)
        finally:
            self._locked = False
            os.close(lock)  # releases the lock

    # ------------------------------------------------------------------------------------ privacy ledgers

    def ledger_path(self, ledger: str) -> Path:
        """The file of the privacy ledger ``ledger`` (a dataset's name, or ``SITE_LEDGER`` for the site's)."""
        suffix = "" if ledger == SITE_LEDGER else f".{ledger}"
        return self.path.with_name(f"{self.path.stem}.privacy{suffix}.json")

    def _require_lock(self) -> None:
        if not self._locked:
            raise RuntimeError(f"{self}: privacy ledgers are read and written inside a state transaction")

    def read_ledger(self, scope: BudgetScope) -> privacy.PrivacyLedger:
        """The ledger of ``scope`` with the policy's budget (a new, empty one if there is no file yet).

        The policy is the budget's source of truth: a changed epsilon or delta applies to the charges
        already recorded (the ledger recomputes what they spent at the new delta).
        """
        self._require_lock()
        budget = privacy.PrivacyBudget(epsilon=scope.budget.epsilon, delta=scope.budget.delta)
        path = self.ledger_path(scope.ledger)
        try:
            fd = self._open_private(path, os.O_RDONLY)
        except SiteStateError:
            if not path.exists():
                return privacy.PrivacyLedger(budget=budget)
            raise
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            ledger = privacy.PrivacyLedger.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise SiteStateError(f"{path}: not a privacy ledger (field {where}: {err['msg']})") from None
        return ledger.model_copy(update={"budget": budget})

    def write_ledger(self, scope: BudgetScope, ledger: privacy.PrivacyLedger) -> None:
        """Replace the ledger file of ``scope`` atomically (mode 0600)."""
        self._require_lock()
        privacy.save_ledger(self.ledger_path(scope.ledger), ledger)
