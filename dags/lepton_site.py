"""
### Lepton site jobs (`lepton_site`): the coordinator's round jobs, verified, approved and answered HERE

Runs in a partner's own Airflow (a **site**). **Starts** when the site's exchange watcher (an `AssetWatcher`
on `ExchangeTrigger`, outbound only: it lists the site's exchange bucket on the coordinator's storage with
the site's bucket-scoped credentials) finds a new job; one DAG run per job (a run that receives several at
once maps over them; the grid names each job `<run> round <k>`). From the UI: one job key (Param), or none
to sweep every job the site has not finished.

1. `verify` authenticates the job with the coordinator key pinned in the site's policy, checks it is for
   this site, this bucket and the current round, then the policy (dataset and contract, strategy, rounds,
   minimum partners, privacy budget) and the global weights' hash. A forged, tampered, replayed or moved
   job is **rejected** (nothing is sent); a job the policy refuses gets a **signed refusal** with its
   reasons; both fail the task at once, without retries, naming the reason. A storage error retries.
2. `approve` (only for a policy that requires approval): a person at the site approves or rejects the job
   in this Airflow's *Required actions* page (Airflow's human-in-the-loop `ApprovalOperator`), before the
   policy's deadline. No training happens before that decision.
3. `answer` trains on the site's own staged data in the trainer container (the same trainer and image as
   single-stack training; the job's global weights and a one-partner plan are laid out in the site's own
   `models` bucket), then signs and uploads the update and the answer; a rejection by the approver, or no
   decision by the deadline, sends a signed refusal instead. Every object written to the exchange is in the
   site's outbound log first.
4. `summary` fails the run when a job was not answered (rejected, refused, failed), so a red run is a job
   that did not go through; the reasons are in the task logs.

The site's files (enrollment bundle, policy, state, outbound log) are in `<data dir>/site`; which partner's
staged data it trains: `LEPTON_SITE_PARTNER` (default: the site's name); its signing key:
`LEPTON_SITE_KEY_NAME` (default `site-sign-<site>`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Asset, AssetWatcher, Param, dag, get_current_context, task

from lepton_airflow.exchange_trigger import ExchangeTrigger
from lepton_airflow.roles import serves

EXCHANGE_JOBS = Asset(
    name="lepton-exchange-jobs",
    uri="s3://exchange/jobs/",
    watchers=[AssetWatcher(name="lepton_exchange_watcher", trigger=ExchangeTrigger(poll_interval=10.0))],
)
#: transient failures (storage, Vault) retry with backoff; security and policy failures fail at once
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "lepton",
    "retries": 3,
    "retry_delay": timedelta(seconds=15),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=2),
}


class SiteApprovalOperator(ApprovalOperator):
    """``ApprovalOperator`` for one job: its deadline is the site policy's (counted from when the site first
    saw the job), and a "Reject" is recorded, not turned into skipped tasks: `answer` sends the signed
    refusal for it. (On timeout the task fails; `answer` then refuses with ``approval_timeout``.)"""

    def __init__(self, *, job_key: str, job_label: str, deadline: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_key = job_key
        self.job_label = job_label
        self.deadline = deadline

    def execute(self, context: Any) -> Any:
        if self.deadline:
            left = datetime.fromisoformat(self.deadline) - datetime.now(UTC)
            if left <= timedelta(0):  # a retry after the deadline: no one may approve any more
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(f"the site's approval deadline {self.deadline} has passed")
            self.response_timeout = left
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return HITLOperator.execute_complete(self, context, event)


def _site() -> Any:
    """The site's clients and files; a missing or invalid enrollment, policy or state fails at once."""
    from airflow.sdk.exceptions import AirflowFailException

    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.core.site_policy import PolicyError
    from lepton_tasks.federation.enrollment import EnrollmentError
    from lepton_tasks.site.state import SiteStateError
    from lepton_tasks.site.training import Site

    hook = LeptonHook()
    try:
        return Site.open(hook.get_settings(), hook.get_vault())
    except (EnrollmentError, PolicyError, SiteStateError, FileNotFoundError) as exc:
        raise AirflowFailException(f"this site is not set up (`lepton site import`): {exc}") from exc


@dag(
    dag_id="lepton_site",
    schedule=EXCHANGE_JOBS,
    catchup=False,
    max_active_runs=8,
    doc_md=__doc__,
    tags=["lepton", "site", "exchange"],
    default_args=DEFAULT_ARGS,
    params={
        "job_key": Param(
            None,
            type=["null", "string"],
            pattern=r"^jobs/[^/]+/[0-9]{4,}/[0-9a-f-]{36}\.json$",
            description="One job key in the site's exchange bucket (UI runs). Empty: every unfinished job.",
        ),
    },
)
def lepton_site() -> None:
    @task
    def jobs() -> list[dict[str, str]]:
        """The jobs this run handles: the watcher's events, the UI's job key, or a sweep."""
        from lepton_tasks.site.jobs import poll_jobs
        from lepton_tasks.site.training import job_label

        ctx = get_current_context()
        keys: list[str] = []
        for events in (ctx.get("triggering_asset_events") or {}).values():
            for event in events:
                key = (event.extra or {}).get("payload", {}).get("job_key")
                if key:
                    keys.append(key)
        if ctx["params"].get("job_key"):
            keys = [ctx["params"]["job_key"]]
        elif not keys:
            site = _site()
            doc = site.state.read()  # a job waiting for its approver already has a run: not swept again
            keys = poll_jobs(site.exchange, site.bucket, last_seen={*doc.handled, *doc.waiting})
        unique = list(dict.fromkeys(keys))
        print(f"{len(unique)} job(s): {', '.join(unique) or 'none'}")
        return [{"key": k, "label": job_label(k)} for k in unique]

    @task(map_index_template="{{ task.op_kwargs['job']['label'] }}")
    def verify(job: dict[str, str]) -> dict[str, Any]:
        """Authenticate + policy (lepton_tasks.site.training.verify_job); security/policy: no retry."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_tasks.site.training import JobNotAccepted, SiteTrainingError, verify_job

        try:
            verified = verify_job(_site(), job["key"])
        except (JobNotAccepted, SiteTrainingError) as exc:
            raise AirflowFailException(str(exc)) from exc
        print(
            f"{job['key']}: {verified.status}"
            + (f" (until {verified.deadline})" if verified.deadline else "")
        )
        return verified.to_dict()

    @task(trigger_rule="all_done")
    def approval_requests(verified: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """One approval request per job that waits for the site's approver."""
        return [
            {
                "subject": f"Approve the coordinator's job {v['label']}?",
                "body": v["description"],
                "job_key": v["key"],
                "job_label": v["label"],
                "deadline": v["deadline"],
            }
            for v in verified
            if v and v["status"] == "waiting"
        ]

    @task(trigger_rule="all_done")
    def decisions(verified: list[dict[str, Any] | None], requests: list[dict[str, Any]]) -> list[dict]:
        """Each verified job with its approver's decision (None: none needed, or none given in time)."""
        ti = get_current_context()["ti"]
        out = []
        asked = {r["job_key"]: i for i, r in enumerate(requests or [])}
        for v in verified:
            if not v:
                continue
            approved = None
            if v["status"] == "waiting":
                reply = ti.xcom_pull(task_ids="approve", map_indexes=asked[v["key"]])
                chosen = (reply or {}).get("chosen_options") or []
                approved = (
                    {ApprovalOperator.APPROVE: True, ApprovalOperator.REJECT: False}.get(chosen[0])
                    if chosen
                    else None
                )
                print(f"{v['label']}: approver chose {chosen or 'nothing'}")
            out.append({"key": v["key"], "label": v["label"], "approved": approved})
        return out

    @task(map_index_template="{{ task.op_kwargs['job']['label'] }}", execution_timeout=timedelta(hours=2))
    def answer(job: dict[str, Any]) -> dict[str, Any]:
        """Train in the trainer container on the site's own data, sign, upload (or send the refusal)."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.trainer import LeptonTrainerOperator
        from lepton_tasks.site.training import JobNotAccepted, SiteTrainingError, TrainerRun, answer_job

        ctx = get_current_context()

        def run_trainer(req: TrainerRun) -> None:  # the single-stack trainer task, run for this job
            LeptonTrainerOperator(
                task_id=f"trainer_{req.mode}",
                partner=req.partner,
                mode=req.mode,
                round_number=req.round_number,
                run_id_=req.run_id,
                execution_timeout=timedelta(hours=1),
            ).execute(ctx)

        try:
            outcome = answer_job(_site(), job["key"], approved=job["approved"], runner=run_trainer)
        except (JobNotAccepted, SiteTrainingError) as exc:
            raise AirflowFailException(str(exc)) from exc
        print(f"{job['key']}: {outcome.status.value}; wrote {', '.join(outcome.written)}")
        return {"key": job["key"], "status": outcome.status.value, "written": list(outcome.written)}

    @task(trigger_rule="all_done")
    def summary(jobs: list[dict[str, str]], answered: list[dict[str, Any] | None]) -> None:
        """Fail the run when a job was not answered (the reasons are in `verify`'s and `answer`'s logs)."""
        from airflow.sdk.exceptions import AirflowFailException

        done = {a["key"]: a["status"] for a in answered or [] if a}
        for j in jobs:
            print(f"{j['label']}: {done.get(j['key'], 'NOT ANSWERED')}")
        missing = [j["label"] for j in jobs if j["key"] not in done]
        if missing:
            raise AirflowFailException(
                f"{len(missing)} of {len(jobs)} job(s) not answered: {', '.join(missing)}"
            )

    found = jobs()
    verified = verify.expand(job=found)
    requests = approval_requests(verified)
    approve = SiteApprovalOperator.partial(
        task_id="approve", map_index_template="{{ task.job_label }}"
    ).expand_kwargs(requests)
    decided = decisions(verified, requests)
    approve >> decided
    answered = answer.expand(job=decided)
    summary(found, answered)


if serves("lepton_site"):  # only in an Airflow whose role runs it (lepton_airflow.roles)
    lepton_site()
