"""Waiting for one round's answers without holding a worker slot: a deferrable trigger and its operator.

``CollectAnswersOperator`` (one per round of the ``lepton_federated`` DAG) reads the headers of the jobs
its round sent (``federation.run_records.read_sent``) and defers at once to :class:`AnswersTrigger`, which
runs in the triggerer: every ``poll_interval`` seconds it looks at every site's replies
(``coordinator.poll_round`` → ``federation.exchange.collect_answers``, blocking S3 calls in a thread) and
fires ONE event when every site has a final outcome (accepted, refused, rejected) or the round's deadline —
the expiry of the jobs sent — has passed. The event is small and JSON-ready: the run, the round, why the
wait ended and each site's status. On resume (``execute_complete``, in a worker again) the operator calls
``coordinator.decide_round``, which collects once more and decides: merge / aggregate / evaluate, or fail
the run below the quorum with one message naming every excluded site and why (``AirflowFailException``:
no retry can add a site). A site still pending on resume (the trigger ended on a storage outage) sends the
task back to the trigger.

Under secure aggregation (the run's spec sets ``secure_aggregation``) the statistics and train rounds go on
after their answers: on resume the operator calls ``secagg_driver.secure_aggregation_step``, which starts
the round's aggregation over the accepted sites, and defers again to the same trigger in its ``secure`` mode
(``secagg_driver.poll_secure_aggregation``: the current phase's replies, until every site replied or the
phase's jobs expired); each resume advances one phase (keys → shares → masked inputs → reveal) until the
step unmasks the sum and decides the round. No task is added to the DAG: a run without secure aggregation
never enters this path, and a secure one holds no worker slot between phases. A failed aggregation (fewer
sites than its threshold) fails the task at once naming every site lost and why.

A storage outage while polling is logged and polled again (the round is not judged on an outage); other
errors end the trigger with an error event: the task fails at once when no retry can fix it (a damaged
registry, a record that does not validate), else with its retries (the exchange refused access). The
trigger needs no task context: it builds its settings from the environment (``LeptonHook.from_env``), like
the inbox trigger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

#: how long past the round's deadline the task may stay deferred before Airflow fails it (a lost trigger)
DEFERRAL_GRACE = timedelta(minutes=15)


def _statuses(run_id: str, round_number: int, secure: bool = False) -> dict[str, str]:
    """One poll: each site's status for the round, or (``secure``) in the current phase of the round's secure
    aggregation (blocking; runs in a thread). No aggregation in progress: ``{}`` (nothing to wait for)."""
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.coordinator import poll_round
    from lepton_tasks.federation.enrollment import SiteRegistry
    from lepton_tasks.federation.secagg_driver import poll_secure_aggregation

    settings = LeptonHook.from_env()
    if secure:
        phase = poll_secure_aggregation(
            Storage.from_settings(settings),
            settings.models_bucket,
            SiteRegistry(settings.site_registry_file),
            run_id,
            round_number,
        )
        return {} if phase is None else phase[1]
    outcome = poll_round(
        Storage.from_settings(settings),
        settings.models_bucket,
        SiteRegistry(settings.site_registry_file),
        run_id,
        round_number,
    )
    return {site: out.status.value for site, out in outcome.sites.items()}


#: S3 error codes of a server that is busy or restarting (anything else is an answer, not an outage)
TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})


def _transient(exc: BaseException) -> bool:
    """An outage the next poll may not see: the storage did not answer, or answered "busy"."""
    import urllib3
    from minio.error import S3Error

    from lepton_tasks.adapters.storage import StorageUnavailable

    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_S3_CODES
    return isinstance(exc, StorageUnavailable | urllib3.exceptions.HTTPError | OSError)


def _permanent(exc: BaseException) -> bool:
    """An error no retry fixes: a damaged registry or a record that does not validate."""
    from lepton_tasks.federation.enrollment import EnrollmentError

    return isinstance(exc, EnrollmentError | ValueError)


class AnswersTrigger(BaseTrigger):
    """Polls the exchange for round ``round_number`` of run ``run_id`` until every site has a final outcome
    or ``deadline`` (ISO 8601, UTC) has passed; then yields one event::

        {"run_id", "round", "ended": "complete" | "deadline" | "error", "statuses": {site: status},
         "error": str | None, "permanent": bool}

    ``complete``: every site answered, refused or was rejected; ``deadline``: the jobs expired first (the
    silent sites are ``missing`` — or still ``pending`` when the last poll before the deadline failed).
    ``secure``: wait for the replies to the current phase of the round's secure aggregation instead (its
    jobs' expiry is ``deadline``).
    """

    def __init__(
        self,
        run_id: str,
        round_number: int,
        deadline: str,
        poll_interval: float = 5.0,
        secure: bool = False,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.round_number = int(round_number)
        self.deadline = deadline
        self.poll_interval = float(poll_interval)
        self.secure = bool(secure)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "lepton_airflow.answers_trigger.AnswersTrigger",
            {
                "run_id": self.run_id,
                "round_number": self.round_number,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "secure": self.secure,
            },
        )

    def _event(
        self, ended: str, statuses: dict[str, str], error: str | None = None, *, permanent: bool = False
    ) -> TriggerEvent:
        return TriggerEvent(
            {
                "run_id": self.run_id,
                "round": self.round_number,
                "ended": ended,
                "statuses": statuses,
                "error": error,
                "permanent": permanent,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = datetime.fromisoformat(self.deadline).astimezone(UTC)
        statuses: dict[str, str] = {}
        while True:
            try:
                statuses = await asyncio.to_thread(_statuses, self.run_id, self.round_number, self.secure)
            except Exception as exc:  # noqa: BLE001 - sorted below: an outage polls again, the rest ends it
                if not _transient(exc):
                    log.error("round %d of %s: cannot collect: %s", self.round_number, self.run_id, exc)
                    yield self._event(
                        "error", statuses, f"{type(exc).__name__}: {exc}", permanent=_permanent(exc)
                    )
                    return
                log.warning("round %d: polling the exchange failed, again soon: %s", self.round_number, exc)
            else:
                pending = sorted(s for s, st in statuses.items() if st == "pending")
                if not pending:  # "missing" only once a job expired: the deadline ended the wait
                    ended = "deadline" if "missing" in statuses.values() else "complete"
                    log.info("round %d of %s: %s: %s", self.round_number, self.run_id, ended, statuses)
                    yield self._event(ended, statuses)
                    return
                log.info("round %d: waiting for %s", self.round_number, ", ".join(pending))
            now = datetime.now(UTC)
            if now >= deadline:
                log.info("round %d of %s: deadline %s passed", self.round_number, self.run_id, self.deadline)
                yield self._event("deadline", statuses)
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, (deadline - now).total_seconds())))


class CollectAnswersOperator(BaseOperator):
    """Waits (deferred) for the answers to round ``round_number``'s jobs, then decides the round.

    :param round_number: the exchange round (0 statistics, 1..R train) or ``"evaluation"`` (round R+1 of
        the run's spec)
    :param poll_interval: seconds between two looks at the exchange buckets (templated)
    Returns the round's brief (accepted sites, excluded sites with their reasons) to XCom.
    """

    template_fields: Sequence[str] = ("round_number", "poll_interval")
    ui_color = "#e8f0fe"

    def __init__(self, *, round_number: int | str, poll_interval: float | str = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_number = round_number
        self.poll_interval = poll_interval

    def _run_id(self, context: Context) -> str:
        from lepton_tasks.federation.run_records import exchange_run_id

        return exchange_run_id(context["run_id"])

    def _round(self, storage: Any, bucket: str, run_id: str) -> int:
        from lepton_tasks.federation.run_records import read_spec

        if self.round_number == "evaluation":
            return read_spec(storage, bucket, run_id).evaluation_round
        return int(self.round_number)

    def execute(self, context: Context) -> Any:
        from lepton_airflow.hook import LeptonHook
        from lepton_tasks.federation.run_records import read_sent, round_deadline

        hook = LeptonHook()
        settings = hook.get_settings()
        storage = hook.get_storage(settings)
        run_id = self._run_id(context)
        round_ = self._round(storage, settings.models_bucket, run_id)
        sent = read_sent(storage, settings.models_bucket, run_id, round_)
        self._defer(run_id, round_, round_deadline(sent))

    def _defer(self, run_id: str, round_: int, deadline: datetime, *, secure: bool = False) -> None:
        remaining = max(timedelta(0), deadline - datetime.now(UTC))
        self.defer(
            trigger=AnswersTrigger(
                run_id=run_id,
                round_number=round_,
                deadline=deadline.isoformat(),
                poll_interval=float(self.poll_interval),
                secure=secure,
            ),
            method_name="execute_complete",
            timeout=remaining + DEFERRAL_GRACE,
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.hook import LeptonHook
        from lepton_tasks.adapters.signing import SigningError, TransitSigner
        from lepton_tasks.federation.coordinator import CoordinatorError, RoundNotComplete, decide_round
        from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry
        from lepton_tasks.federation.run_records import RoundRecord, read_sent, read_spec, round_deadline
        from lepton_tasks.federation.secagg_driver import secure_aggregation_step

        event = event or {}
        if event.get("ended") == "error":
            message = f"collecting round {event.get('round')} failed: {event.get('error')}"
            if event.get("permanent"):
                raise AirflowFailException(message)
            raise RuntimeError(message)  # e.g. access denied to the exchange: the task's retries apply
        hook = LeptonHook()
        settings = hook.get_settings()
        storage = hook.get_storage(settings)
        run_id = self._run_id(context)
        round_ = self._round(storage, settings.models_bucket, run_id)
        try:  # the coordinator's own key tells a replaced job from a removed one in the report
            coordinator_key: Any = TransitSigner.from_vault(
                hook.get_vault(), settings.coordinator_key_name
            ).public_key()
        except SigningError as exc:
            log.warning("cannot read the coordinator's public key (diagnosis only): %s", exc)
            coordinator_key = None
        spec = read_spec(storage, settings.models_bucket, run_id)
        secure = spec.secure_aggregation and spec.mode_of(round_) != "evaluate"
        try:
            if secure:
                step = secure_aggregation_step(
                    storage,
                    settings.models_bucket,
                    SiteRegistry(settings.site_registry_file),
                    TransitSigner.from_vault(hook.get_vault(), settings.coordinator_key_name),
                    run_id,
                    round_,
                    coordinator_key=coordinator_key,
                )
                if not isinstance(
                    step, RoundRecord
                ):  # an aggregation phase in progress: wait for its replies
                    deadline = max(h.expires_at for h in step.jobs.values())
                    print(
                        f"round {round_}: secure aggregation {step.aggregation_id}, phase {step.phase.value}"
                    )
                    self._defer(run_id, round_, deadline, secure=True)
                    raise AssertionError("unreachable: defer raises")
                record = step
            else:
                record = decide_round(
                    storage,
                    settings.models_bucket,
                    SiteRegistry(settings.site_registry_file),
                    run_id,
                    round_,
                    coordinator_key=coordinator_key,
                )
        except RoundNotComplete as exc:
            log.info("%s: waiting again", exc)
            sent = read_sent(storage, settings.models_bucket, run_id, round_)
            self._defer(run_id, round_, round_deadline(sent))
            raise AssertionError("unreachable: defer raises") from None
        except (CoordinatorError, EnrollmentError) as exc:  # quorum, registry: a retry cannot fix it
            raise AirflowFailException(str(exc)) from exc
        except SigningError as exc:  # starting or advancing an aggregation signs its phase jobs
            import hvac.exceptions

            if isinstance(exc.__cause__, hvac.exceptions.Forbidden | hvac.exceptions.InvalidPath):
                raise AirflowFailException(
                    f"cannot sign with {settings.coordinator_key_name}: {exc}"
                ) from exc
            raise
        for site, why in record.excluded.items():
            print(f"EXCLUDED {site} from round {record.round} ({record.mode}): {why}")
        print(f"round {record.round} ({record.mode}): sites {', '.join(record.accepted)}")
        return record.brief()
