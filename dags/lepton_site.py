"""
### Lepton site jobs (`lepton_site`): the coordinator's round jobs, verified, approved and answered HERE

Runs in a partner's own Airflow (a **site**). **Starts** when the site's exchange watcher (an `AssetWatcher`
on `ExchangeTrigger`, outbound only: it lists the site's exchange bucket on the coordinator's storage with
the site's bucket-scoped credentials every `LEPTON_EXCHANGE_POLL_SECONDS`, default 10 s) finds a new job;
one DAG run per job (a run that receives several at once maps over them; the grid names each job
`<run> round <k>`). From the UI: one job key (Param), or none to sweep every job the site has not finished.

1. `handle` authenticates the job with the coordinator key pinned in the site's policy, checks it is for
   this site, this bucket and the current round, then the policy (dataset and contract, strategy, rounds,
   minimum partners, privacy budget) and the global weights' hash. A forged, tampered, replayed or moved
   job is **rejected** (nothing is sent); a job the policy refuses gets a **signed refusal** with its
   reasons; both fail the task at once, without retries, naming the reason. A storage error retries.
   A job that needs no approval is then trained and answered **in the same task** (one task between the
   job's arrival and its answer: the site's part of every federated round); one that needs approval waits.
2. `approve` (only for jobs waiting for approval): a person at the site approves or rejects the job in this
   Airflow's *Required actions* page (Airflow's human-in-the-loop `ApprovalOperator`), before the policy's
   deadline. No training happens before that decision.
3. `answer` (only for those jobs) reads its approver's decision and trains, or sends a signed refusal for a
   rejection or no decision by the deadline.

Training runs the trainer container on the site's own staged data (the job's global weights and a
one-partner plan are laid out in the site's own `models` bucket: `lepton_tasks.site.local_run`), then the
site signs and uploads the update and the answer. A site that cannot train says so with a signed refusal,
so the coordinator excludes it at once instead of at the round's deadline: `no_usable_data` (no committed
drop under the job's contract; at once) or `trainer_failed` (a trainer exit other than the transient 4, or
no usable output: at once; Vault/S3 down or exit 4: retried, and refused on the task's last try). Every
object written to the exchange is in the site's outbound log first.

Secure aggregation: a round job with `secure_aggregation` is trained as above, but its update (or its
statistics) stays at the site, encrypted under the site's `lepton-secagg-<site>` Vault key, and the answer
carries neither. The coordinator's phase jobs that follow (`lepton-secagg-*`: setup, roster, inbox,
survivors) are announced by the same watcher and taken by `handle` without a trainer run and without
approval (the approval covered the round's job): the site joins (checking the setup is bound to the job
it answered), shares its keys, masks its held input, and reveals. A site without that key refuses secure
jobs (`secure_aggregation_unavailable`).

4. `summary` fails the run when a job was not answered (rejected, refused, failed), so a red run is a job
   that did not go through; the reasons are in the task logs.

The site's files (enrollment bundle, policy, state, outbound log) are in `<data dir>/site`; which partner's
staged data it trains: `LEPTON_SITE_PARTNER` (default: the site's name); its signing key:
`LEPTON_SITE_KEY_NAME` (default `site-sign-<site>`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetWatcher, Param, dag, get_current_context, task

from lepton_airflow.approval import SiteApprovalOperator
from lepton_airflow.defaults import default_args
from lepton_airflow.exchange_trigger import ExchangeTrigger
from lepton_airflow.roles import serves
from lepton_tasks.adapters.settings import load_settings

EXCHANGE_JOBS = Asset(
    name="lepton-exchange-jobs",
    uri="s3://exchange/jobs/",
    watchers=[
        AssetWatcher(
            name="lepton_exchange_watcher",
            trigger=ExchangeTrigger(poll_interval=load_settings().exchange_poll_seconds),
        )
    ],
)
#: transient failures (storage, Vault) retry with backoff; security and policy failures fail at once
DEFAULT_ARGS = default_args(retries=3)
#: how long one trainer run may take (its presigned URLs and token live as long)
TRAINER_TIMEOUT = timedelta(hours=1)


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


def _last_try() -> bool:
    """Whether the running task is on its last try (a transient trainer failure then becomes a refusal)."""
    ctx = get_current_context()
    return ctx["ti"].try_number > (ctx["task"].retries or 0)


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

    @task(map_index_template="{{ task.op_kwargs['job']['label'] }}", execution_timeout=2 * TRAINER_TIMEOUT)
    def handle(job: dict[str, str]) -> dict[str, Any]:
        """Authenticate + policy, then train and answer when no approval is needed
        (lepton_tasks.site.training.take_job); rejected/refused: no retry."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.trainer import trainer_runner
        from lepton_tasks.site.training import JobNotAccepted, SiteTrainingError, Verified, take_job

        try:
            result = take_job(
                _site(), job["key"], runner=trainer_runner(timeout=TRAINER_TIMEOUT), last_try=_last_try()
            )
        except (JobNotAccepted, SiteTrainingError) as exc:
            raise AirflowFailException(str(exc)) from exc
        if isinstance(result, Verified):
            print(f"{job['key']}: waits for the site's approver (until {result.deadline})")
            return result.to_dict()
        print(f"{job['key']}: {result.status.value}; wrote {', '.join(result.written)}")
        return {"key": job["key"], "status": result.status.value, "written": list(result.written)}

    @task(trigger_rule="all_done")
    def approval_requests(handled: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """One approval request per job that waits for the site's approver (none: `approve` and `answer`
        expand to nothing and are skipped without running)."""
        return [
            {
                "subject": f"Approve the coordinator's job {h['label']}?",
                "body": h["description"],
                "job_key": h["key"],
                "job_label": h["label"],
                "deadline": h["deadline"],
            }
            for h in handled or []
            if h and h["status"] == "waiting"
        ]

    @task(
        trigger_rule="all_done",
        map_index_template="{{ task.op_kwargs['request']['job_label'] }}",
        execution_timeout=2 * TRAINER_TIMEOUT,
    )
    def answer(request: dict[str, Any]) -> dict[str, Any]:
        """Train on the approver's "Approve", or send the signed refusal (rejected, no decision in time)."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.approval import decision
        from lepton_airflow.trainer import trainer_runner
        from lepton_tasks.site.training import JobNotAccepted, SiteTrainingError, answer_job

        ti = get_current_context()["ti"]  # `approve` is mapped over the same requests: same map index
        reply = ti.xcom_pull(task_ids="approve", map_indexes=ti.map_index)
        approved = decision(reply)
        print(
            f"{request['job_label']}: the approver chose {(reply or {}).get('chosen_options') or 'nothing'}"
        )
        key = request["job_key"]
        try:
            outcome = answer_job(
                _site(),
                key,
                approved=approved,
                runner=trainer_runner(timeout=TRAINER_TIMEOUT),
                last_try=_last_try(),
            )
        except (JobNotAccepted, SiteTrainingError) as exc:
            raise AirflowFailException(str(exc)) from exc
        print(f"{key}: {outcome.status.value}; wrote {', '.join(outcome.written)}")
        return {"key": key, "status": outcome.status.value, "written": list(outcome.written)}

    @task(trigger_rule="all_done")
    def summary(
        jobs: list[dict[str, str]],
        handled: list[dict[str, Any] | None],
        answered: list[dict[str, Any] | None],
    ) -> None:
        """Fail the run when a job was not answered (the reasons are in `handle`'s and `answer`'s logs)."""
        from airflow.sdk.exceptions import AirflowFailException

        done = {h["key"]: h["status"] for h in handled or [] if h and h["status"] != "waiting"}
        done |= {a["key"]: a["status"] for a in answered or [] if a}
        for j in jobs:
            print(f"{j['label']}: {done.get(j['key'], 'NOT ANSWERED')}")
        missing = [j["label"] for j in jobs if j["key"] not in done]
        if missing:
            raise AirflowFailException(
                f"{len(missing)} of {len(jobs)} job(s) not answered: {', '.join(missing)}"
            )

    found = jobs()
    handled = handle.expand(job=found)
    requests = approval_requests(handled)
    approve = SiteApprovalOperator.partial(
        task_id="approve", map_index_template="{{ task.job_label }}"
    ).expand_kwargs(requests)
    answered = answer.expand(request=requests)
    approve >> answered
    summary(found, handled, answered)


if serves("lepton_site"):  # only in an Airflow whose role runs it (lepton_airflow.roles)
    lepton_site()
