"""The coordinator's driver of a round's secure aggregation: start it, advance it phase by phase, finish it.

Secure aggregation (``RunSpec.secure_aggregation``, Bonawitz et al. 2017 through
:mod:`lepton_tasks.federation.secagg_round`): a site's statistics and updates never cross on their own. In the
statistics round and every train round the sites answer the round's job WITHOUT their statistics or update
(they keep them at the site); once the round's answers are in, :func:`secure_aggregation_step` starts an
aggregation over the accepted sites (each setup bound to the job the site answered) and, called again as each
phase's replies arrive, advances it (keys → shares → masked inputs → reveal) and finishes it: the coordinator
unmasks only the sum over the sites whose masked input arrived (weighted FedAvg ``sum n w / sum n``, or the
merged statistics) and decides the round with it (:func:`~lepton_tasks.federation.coordinator.decide_round`
``secure=``). The aggregation's state lives beside the round (``round-<kkkk>/secagg.json``,
:func:`read_aggregation`); the collect task's trigger looks at the phase in progress through
:func:`poll_secure_aggregation`, and its operator steps the aggregation on
(``plugins/lepton_airflow/answers_trigger.py``). No Airflow import here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.messages import RoundAnswer
from lepton_tasks.core.secagg_messages import UpdateLayout
from lepton_tasks.federation.coordinator import (
    RoundNotComplete,
    SecureAggregationFailed,
    _contract,
    _judge,
    _quorum_or_record,
    _record,
    _unusable,
    decide_round,
    initial_weights,
    poll_round,
)
from lepton_tasks.federation.enrollment import SiteRegistry
from lepton_tasks.federation.exchange import RoundOutcome
from lepton_tasks.federation.run_records import (
    Exclusion,
    RoundRecord,
    RunSpec,
    _global_weights,
    _record_key,
    _secagg_key,
    read_record,
    read_sent,
    read_spec,
    round_deadline,
)

if TYPE_CHECKING:
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core.signatures import PublicKey, Signer
    from lepton_tasks.federation.secagg_round import AggregationState

__all__ = [
    "SECAGG_UPDATE_CLIP",
    "poll_secure_aggregation",
    "read_aggregation",
    "secure_aggregation_step",
]

log = logging.getLogger(__name__)

#: secure aggregation: the largest absolute value of a weight in a site's update (``UpdateLayout.clip``); a
#: site whose model holds a larger one refuses to mask it rather than clip it silently
SECAGG_UPDATE_CLIP: Final = 64.0


def read_aggregation(storage: Storage, bucket: str, run_id: str, round_: int) -> AggregationState | None:
    """The round's secure aggregation as the last step left it (``None``: not started)."""
    from lepton_tasks.federation.secagg_round import AggregationState

    key = _secagg_key(run_id, round_)
    if not storage.exists(bucket, key):
        return None
    return AggregationState.model_validate_json(storage.get_bytes(bucket, key))


def _write_aggregation(storage: Storage, bucket: str, state: AggregationState) -> None:
    storage.put_bytes(
        bucket,
        _secagg_key(state.run_id, state.round),
        state.model_dump_json().encode(),
        content_type="application/json",
    )


def _update_layout(
    storage: Storage, bucket: str, spec: RunSpec, round_: int, contract: Contract
) -> UpdateLayout:
    """A train round's public ring layout: the shapes of the global weights the sites trained from, the
    clip bound :data:`SECAGG_UPDATE_CLIP` and the contract's largest row count as the sample bound."""
    _, global_prev, _ = _global_weights(storage, bucket, spec.run_id, round_ - 1)
    return UpdateLayout(
        shapes=[list(np.shape(w)) for w in global_prev],
        clip=SECAGG_UPDATE_CLIP,
        max_samples=contract.rows.max,
    )


def _secure_failure(
    storage: Storage,
    bucket: str,
    spec: RunSpec,
    round_: int,
    outcome: RoundOutcome,
    answers: Mapping[str, RoundAnswer],
    exclusions: list[Exclusion],
    warnings: list[str],
    exc: Exception,
) -> SecureAggregationFailed:
    """Record the round as failed (for ``blocked_by`` and the post-mortem) and the one error to raise."""
    lost = getattr(exc, "lost", {})
    remaining = sorted(getattr(exc, "remaining", ()))
    exclusions = exclusions + [
        _unusable(s, round_, "secagg_dropout", f"left the secure aggregation: {lost.get(s, 'dropped out')}")
        for s in sorted(set(answers) - set(remaining))
    ]
    mode = spec.mode_of(round_)
    record = _record(spec, round_, mode, remaining, exclusions, {}, None, outcome, warnings)
    record = record.model_copy(update={"quorum_met": False})
    storage.put_json(bucket, _record_key(spec.run_id, round_), record.model_dump(mode="json"))
    return SecureAggregationFailed(f"round {round_} ({mode}): {exc}")


class _ReadOnly:
    """The signer of an exchange that only reads (polling a phase): it never signs."""

    def sign(self, data: bytes) -> str:
        raise RuntimeError("polling a secure aggregation signs nothing")


def poll_secure_aggregation(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    run_id: str,
    round_: int,
    *,
    now: datetime | None = None,
) -> tuple[str, dict[str, str], datetime] | None:
    """One look at the round's secure aggregation (what the trigger calls): ``(phase, each site's status in
    it, the phase's deadline)``, or ``None`` when no aggregation is in progress (not started, or decided)."""
    from lepton_tasks.federation import secagg_round as sr

    state = read_aggregation(storage, bucket, run_id, round_)
    record = read_record(storage, bucket, run_id, round_)
    if state is None or (record is not None and record.quorum_met):
        return None
    exchange = sr.CoordinatorExchange(storage, _ReadOnly(), registry, state.consortium)
    replies = sr.collect(exchange, state, now=now)
    deadline = max(h.expires_at for h in state.jobs.values())
    return state.phase.value, {s: r.status.value for s, r in replies.sites.items()}, deadline


def secure_aggregation_step(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    signer: Signer,
    run_id: str,
    round_: int,
    *,
    now: datetime | None = None,
    coordinator_key: str | PublicKey | None = None,
    build_initial: Callable[[Contract, Sequence[str], int], list[np.ndarray]] = initial_weights,
) -> AggregationState | RoundRecord:
    """One step of round ``round_``'s secure aggregation; call it again until it returns the round's record.

    - not started: the round's answers must be complete (else :class:`RoundNotComplete`); below the
      quorum the round fails as :func:`decide_round` fails it
      (:class:`~lepton_tasks.federation.coordinator.QuorumError`); else the aggregation starts over the
      accepted sites, each setup bound to the job the site answered (the phase deadline is the run's round
      deadline), and its state is returned;
    - a phase in progress whose replies are not all in before its deadline: the state, unchanged;
    - a complete phase: :func:`~lepton_tasks.federation.secagg_round.advance` to the next (the new state),
      or after the reveal :func:`~lepton_tasks.federation.secagg_round.finish` and :func:`decide_round` on
      the sum (the record).

    The state is written to ``round-<kkkk>/secagg.json`` after every step. Fewer sites than the protocol's
    threshold at any phase ends the round: the record is written (quorum not met) and
    :class:`SecureAggregationFailed` names every site lost and why."""
    from lepton_tasks.federation import secagg_round as sr

    existing = read_record(storage, bucket, run_id, round_)
    if existing is not None and existing.quorum_met:
        return existing
    spec = read_spec(storage, bucket, run_id)
    mode = spec.mode_of(round_)
    if not spec.secure_aggregation or mode == "evaluate":
        raise ValueError(f"round {round_} ({mode}) of run {run_id} does not run under secure aggregation")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    exchange = sr.CoordinatorExchange(storage, signer, registry, spec.consortium)
    contract = _contract(spec)
    state = read_aggregation(storage, bucket, run_id, round_)
    outcome = poll_round(storage, bucket, registry, run_id, round_, now=now, coordinator_key=coordinator_key)
    if not outcome.complete:
        raise RoundNotComplete(
            f"round {round_}: waiting for {', '.join(outcome.pending)} until "
            f"{round_deadline(read_sent(storage, bucket, run_id, round_)).isoformat()}"
        )
    answers, exclusions, warnings = _judge(outcome, round_, mode)
    try:
        if state is None:
            accepted = sorted(answers)
            check = _record(spec, round_, mode, accepted, exclusions, {}, None, outcome, warnings)
            _quorum_or_record(storage, bucket, spec, check)
            sent = read_sent(storage, bucket, run_id, round_)
            layout: dict[str, Any] = (
                {"statistics": sr.statistics_layout(contract), "bits": 64}
                if mode == "statistics"
                else {"update": _update_layout(storage, bucket, spec, round_, contract), "bits": 64}
            )
            state = sr.start(
                exchange,
                run_id=run_id,
                round=round_,
                purpose="statistics" if mode == "statistics" else "update",
                sites=accepted,
                for_jobs={s: sent[s] for s in accepted},
                contract=contract,
                ttl=spec.deadline,
                now=now,
                **layout,
            )
            _write_aggregation(storage, bucket, state)
            log.info("run %s round %d: secure aggregation %s started", run_id, round_, state.aggregation_id)
            return state
        replies = sr.collect(exchange, state, now=now)
        if not replies.complete:
            return state
        if state.phase is not sr.Phase.REVEAL:
            state = sr.advance(exchange, state, replies, now=now)
            _write_aggregation(storage, bucket, state)
            log.info("run %s round %d: secure aggregation now in phase %s", run_id, round_, state.phase.value)
            return state
        result = sr.finish(exchange, state, replies, contract=contract)
    except (sr.SecAggRoundFailed, ValueError) as exc:
        if isinstance(exc, sr.PhaseIncomplete):
            raise
        raise _secure_failure(
            storage, bucket, spec, round_, outcome, answers, exclusions, warnings, exc
        ) from exc
    return decide_round(
        storage,
        bucket,
        registry,
        run_id,
        round_,
        now=now,
        coordinator_key=coordinator_key,
        build_initial=build_initial,
        secure=result,
    )
