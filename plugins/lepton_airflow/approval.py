"""The site's approval of one coordinator job: Airflow's human-in-the-loop ``ApprovalOperator``, bounded by
the site policy's deadline.

A site whose policy requires approval asks a person in its own Airflow (*Required actions*) before it trains
on its data for the coordinator. ``dags/lepton_site.py`` maps :class:`SiteApprovalOperator` over the jobs
that wait for a decision; its `answer` task then reads the decision from this task's XCom
(``chosen_options``) and trains, or sends the signed refusal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

__all__ = ["SiteApprovalOperator", "decision"]


class SiteApprovalOperator(ApprovalOperator):
    """``ApprovalOperator`` for one job: its deadline is the site policy's (counted from when the site first
    saw the job), and a "Reject" is recorded, not turned into skipped tasks: `answer` sends the signed
    refusal for it. (On timeout the task fails; `answer` then refuses with ``approval_timeout``.)

    ``job_key``/``job_label``: the job's exchange key and its grid label (``<run> round <k>``);
    ``deadline``: ISO 8601 (UTC), or ``None`` for the operator's own ``response_timeout``.
    """

    def __init__(self, *, job_key: str, job_label: str, deadline: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_key = job_key
        self.job_label = job_label
        self.deadline = deadline

    def execute(self, context: Any) -> Any:
        """Ask for the decision with what is left of the site's deadline; fail at once when none is left."""
        if self.deadline:
            left = datetime.fromisoformat(self.deadline) - datetime.now(UTC)
            if left <= timedelta(0):  # a retry after the deadline: no one may approve any more
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(f"the site's approval deadline {self.deadline} has passed")
            self.response_timeout = left
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The approver's response, as ``HITLOperator`` returns it: no downstream task is skipped on Reject
        (the site must still send its refusal)."""
        return HITLOperator.execute_complete(self, context, event)


def decision(reply: dict[str, Any] | None) -> bool | None:
    """The approver's decision in a :class:`SiteApprovalOperator`'s XCom: ``True`` approved, ``False``
    rejected, ``None`` no decision (the task timed out or failed, or there was nothing to decide)."""
    chosen = (reply or {}).get("chosen_options") or []
    if not chosen:
        return None
    return {ApprovalOperator.APPROVE: True, ApprovalOperator.REJECT: False}.get(chosen[0])
