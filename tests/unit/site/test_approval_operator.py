"""The site's approval step (plugins/lepton_airflow/approval.py): no approval after the site policy's
deadline, a "Reject" that skips nothing (the site must still send its signed refusal), and the decision as
`answer` reads it from the task's XCom."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException

from lepton_airflow.approval import SiteApprovalOperator, decision

KEY = "jobs/fed-1/0001/0b0e8c0e-5a2b-4c9e-9f8e-1c2d3e4f5a6b.json"


def _operator(deadline: str | None) -> SiteApprovalOperator:
    return SiteApprovalOperator(
        task_id="approve",
        subject="Approve the coordinator's job fed-1 round 1?",
        body="…",
        job_key=KEY,
        job_label="fed-1 round 1",
        deadline=deadline,
    )


def test_no_one_may_approve_after_the_sites_deadline():
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    with pytest.raises(AirflowFailException, match=re.escape(f"approval deadline {past} has passed")):
        _operator(past).execute(context={})


def test_a_reject_is_returned_to_answer_and_skips_nothing():
    """``ApprovalOperator`` would skip the downstream tasks on Reject (through the task instance in the
    context); the site's returns the response untouched, so `answer` runs and sends the refusal."""
    from airflow.providers.standard.operators.empty import EmptyOperator

    with DAG("approval-test", schedule=None):
        op = _operator(None)
        op >> EmptyOperator(task_id="answer")
    event = {
        "chosen_options": ["Reject"],
        "params_input": {},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "approver", "name": "the site's approver"},
    }
    reply = op.execute_complete(context={}, event=event)  # no task instance: nothing could be skipped
    assert reply["chosen_options"] == ["Reject"] and decision(dict(reply)) is False


@pytest.mark.parametrize(("chosen", "expected"), [(["Approve"], True), (["Reject"], False), ([], None)])
def test_the_decision_is_read_from_the_approvers_reply(chosen, expected):
    assert decision({"chosen_options": chosen, "params_input": {}}) is expected


def test_no_reply_is_no_decision():
    assert decision(None) is None
