"""
### Lepton federated training over the sites (`lepton_federated`): the coordinator's DAG

The coordinator never connects to a site and holds none of their data or keys: it writes signed jobs into
each enrolled site's exchange bucket (its own object storage) and reads back the sites' signed answers. Each
site trains on its own data in its own Airflow; this DAG only plans, waits, aggregates, evaluates and
publishes.

**Starts** when a site announces new staged data (a signed `announcements/<dataset>/<id>.json` in its
exchange bucket, verified with its pinned key by the `lepton-announcements` Asset's watcher: that dataset,
the other Params' defaults), on the cron `LEPTON_FEDERATED_CRON` when set (the Params' defaults), or from
the UI with validated Params: the dataset (one of the contracts), the sites (empty: every
enrolled site whose key is pinned), rounds, strategy, quorum (`min_partners`), the round deadline and the
local training settings (empty: the contract's `training:` defaults).

1. `start` checks the sites against the registry (enrolled, pinned, this consortium) and writes the run's
   immutable spec: the dataset's contract and its sha256, the sites, the hyper-parameters.
2. `statistics` (round 0): `send` signs one statistics job per site (or skips, naming the task that
   failed before it); `collect` **defers** to a trigger that
   polls the exchange (no worker slot held while sites work) until every site answered, refused or was
   rejected, or the round deadline passed; then it merges the statistics and builds the round-0 model.
   With DP each site noises its counts, sums and sums of squares once (`dp_statistics_epsilon`, default 1)
   and charges that to its budget; a numeric feature without a declared range refuses a DP run in `start`.
3. `round_1` … `round_8`: the same two steps with train jobs (merged statistics + the previous global
   weights); `collect` aggregates the accepted updates with the run's strategy. The first round beyond
   `rounds` skips in its `send`; the later ones skip without running a task.
   With `secure_aggregation` on (fedavg/fedprox only, at least 3 sites: `start` refuses anything else
   before a job goes out), the statistics and train rounds' answers carry no statistics or update: once
   they are in, `collect` runs the round's secure aggregation (Bonawitz et al.) in the same task, deferring
   between its phases (keys, shares, masked inputs, reveal), and decides the round on the unmasked sum alone.
   A run without it never enters that path (no extra task).
4. `evaluation`: each site scores the final model on its held-out split (metrics + a score histogram).
   With DP the histogram leaves as one noisy release costing at most `dp_evaluation_epsilon` (default 1),
   which each site reserves in its budget from the first train round on.
5. `publish` writes `metrics.json`, `report.html` (every excluded site, per round, and why: deadline missed,
   refused with the site's reasons, verification failure, training failure) and the versioned model.

A site's failure excludes that site from the round, never the run. A round with fewer usable sites than
`min_partners` fails its `collect` at once (no retry can add a site) with ONE message naming every excluded
site and why; the later steps skip, naming that task, and `publish` is marked upstream-failed so the run
ends failed. Security failures (a site no longer pinned, the signing key refused) fail at once; storage and
Vault outages retry with exponential backoff.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, AssetWatcher, Param, TaskGroup, dag, get_current_context, task
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from lepton_airflow.announcements_trigger import AnnouncementsTrigger
from lepton_airflow.answers_trigger import CollectAnswersOperator
from lepton_airflow.defaults import default_args
from lepton_airflow.roles import serves
from lepton_tasks.adapters.settings import load_settings
from lepton_tasks.core.contracts import available
from lepton_tasks.core.strategies import STRATEGIES

#: the most train rounds a run may ask for (one task group per possible round)
MAX_ROUNDS = 8
#: transient failures (a service restarting) retry with exponential backoff: 15 s … 2 min
DEFAULT_ARGS = default_args(retries=4)
DATASETS = available()
#: the sites' signed announcements of new staged data (verified by the watcher: a forged one starts nothing)
ANNOUNCEMENTS = Asset(
    name="lepton-announcements",
    uri="s3://exchange/announcements/",
    watchers=[
        AssetWatcher(
            name="lepton_announcements_watcher",
            trigger=AnnouncementsTrigger(poll_interval=load_settings().announcements_poll_seconds),
        )
    ],
)


def schedule(cron: str | None = None, on_announcements: bool | None = None) -> Any:
    """The announcements, or the announcements OR ``cron`` (``LEPTON_FEDERATED_CRON``, UTC) when set; with
    ``LEPTON_FEDERATED_ON_ANNOUNCEMENTS=false`` the cron alone (none: UI/REST runs only)."""
    settings = load_settings()
    cron = (settings.federated_cron if cron is None else cron).strip()
    if on_announcements is None:
        on_announcements = settings.federated_on_announcements
    timetable = CronTriggerTimetable(cron, timezone="UTC") if cron else None
    if not on_announcements:
        return timetable
    return (
        ANNOUNCEMENTS if timetable is None else AssetOrTimeSchedule(timetable=timetable, assets=ANNOUNCEMENTS)
    )


def _coordinator() -> tuple[Any, Any, str, str]:
    """``(hook, storage, bucket, exchange run id)`` of the current task."""
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.federation.run_records import exchange_run_id

    hook = LeptonHook()
    settings = hook.get_settings()
    run_id = exchange_run_id(get_current_context()["run_id"])
    return hook, hook.get_storage(settings), settings.models_bucket, run_id


def _round_of(spec: Any, which: int | str) -> int:
    return spec.evaluation_round if which == "evaluation" else int(which)


@dag(
    dag_id="lepton_federated",
    schedule=schedule(),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["lepton", "federated", "coordinator"],
    default_args=DEFAULT_ARGS,
    params={
        "dataset": Param(DATASETS[0], enum=DATASETS, description="The dataset (its contract) to train on."),
        "sites": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            description="Sites to include; empty: every enrolled site whose key is pinned.",
        ),
        "rounds": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=MAX_ROUNDS,
            description="Train rounds; empty: the contract's default.",
        ),
        "strategy": Param("fedavg", enum=list(STRATEGIES)),
        "min_partners": Param(2, type="integer", minimum=1, description="Quorum: usable sites per round."),
        "round_deadline_minutes": Param(
            60,
            type="number",
            exclusiveMinimum=0,
            maximum=7 * 24 * 60,
            description="How long sites have to answer a round's job; a silent site is then excluded.",
        ),
        "poll_seconds": Param(
            10, type="number", minimum=0.1, maximum=600, description="How often the exchange is polled."
        ),
        "local_epochs": Param(None, type=["null", "integer"], minimum=1, maximum=100),
        "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=65536),
        "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1),
        "fedprox_mu": Param(0.01, type="number", minimum=0, description="FedProx proximal weight."),
        "trim_beta": Param(0.2, type="number", minimum=0, exclusiveMaximum=0.5),
        "krum_f": Param(0, type="integer", minimum=0, description="Krum: tolerated Byzantine sites."),
        "seed": Param(42, type="integer", minimum=0),
        "dp_noise_multiplier": Param(
            None,
            type=["null", "number"],
            minimum=0.3,
            description="Record-level DP-SGD at every site (noise multiplier sigma); empty: no DP.",
        ),
        "dp_l2_clip": Param(1.0, type="number", exclusiveMinimum=0),
        "secure_aggregation": Param(
            False,
            type="boolean",
            description="Secure aggregation: the coordinator learns only the sum of the sites' "
            "statistics and updates (fedavg/fedprox, at least 3 sites).",
        ),
        "dp_delta": Param(1e-5, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
        "dp_evaluation_epsilon": Param(
            1.0,
            type="number",
            exclusiveMinimum=0,
            description="With DP: what the evaluation round's one noisy release of a site's score histogram "
            "may cost (epsilon at dp_delta); each site derives its noise from it and reserves it when it "
            "trains, so a site that trained can always evaluate.",
        ),
        "dp_statistics_epsilon": Param(
            1.0,
            type="number",
            exclusiveMinimum=0,
            description="With DP: what the statistics round's one noisy release of a site's counts, sums and "
            "sums of squares may cost (epsilon at dp_delta); each site charges it to its budget.",
        ),
    },
)
def lepton_federated() -> None:
    @task
    def start() -> dict[str, Any]:
        """Check the sites against the registry and write the run's spec (contract, sites, settings)."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_tasks.core.contracts import load_contract
        from lepton_tasks.core.messages import DPTraining, TrainerHParams
        from lepton_tasks.federation.announcements import announced_dataset
        from lepton_tasks.federation.coordinator import CoordinatorError, start_run
        from lepton_tasks.federation.enrollment import SiteRegistry

        ctx = get_current_context()
        p = dict(ctx["params"])
        events = ctx.get("triggering_asset_events") or {}
        if dataset := announced_dataset(
            (e.extra for e in events.get(ANNOUNCEMENTS, ())), DATASETS
        ):  # started by the sites' announcements: train on what they announced (the other Params: defaults)
            print(f"started by the sites' announcements of new staged data for {dataset}")
            p["dataset"] = dataset
        hook, storage, bucket, _ = _coordinator()
        settings = hook.get_settings()
        d = load_contract(p["dataset"]).training
        rounds = int(p["rounds"] or min(d.rounds, MAX_ROUNDS))
        local_epochs = int(p["local_epochs"] or d.local_epochs)
        dp = None
        if p["dp_noise_multiplier"] is not None:
            dp = DPTraining(
                noise_multiplier=p["dp_noise_multiplier"],
                l2_clip=p["dp_l2_clip"],
                delta=p["dp_delta"],
                evaluation_epsilon=p["dp_evaluation_epsilon"],
                statistics_epsilon=p["dp_statistics_epsilon"],
            )
        hparams = TrainerHParams(
            local_epochs=local_epochs,
            local_only_epochs=local_epochs * rounds,
            batch_size=int(p["batch_size"] or d.batch_size),
            learning_rate=float(p["learning_rate"] or d.learning_rate),
            seed=int(p["seed"]),
            fedprox_mu=float(p["fedprox_mu"]) if p["strategy"] == "fedprox" else 0.0,
            dp=dp,
        )
        try:
            spec = start_run(
                storage,
                bucket,
                SiteRegistry(settings.site_registry_file),
                airflow_run_id=ctx["run_id"],
                consortium=settings.consortium,
                dataset=p["dataset"],
                sites=p["sites"] or None,
                rounds=rounds,
                strategy=p["strategy"],
                min_partners=int(p["min_partners"]),
                round_deadline_minutes=float(p["round_deadline_minutes"]),
                hparams=hparams,
                trim_beta=float(p["trim_beta"]),
                krum_f=int(p["krum_f"]),
                secure_aggregation=bool(p["secure_aggregation"]),
            )
        except CoordinatorError as exc:  # sites not enrolled/pinned, quorum: a retry cannot fix it
            raise AirflowFailException(str(exc)) from exc
        print(
            f"run {spec.run_id}: {spec.dataset} ({spec.contract}), sites {', '.join(spec.sites)}, "
            f"{spec.rounds} round(s), {spec.strategy}, min_partners {spec.min_partners}, "
            f"secure aggregation {'on' if spec.secure_aggregation else 'off'}"
        )
        return {"run_id": spec.run_id, "sites": spec.sites, "rounds": spec.rounds}

    @task(task_id="send")
    def send(which: int | str) -> dict[str, str]:
        """Sign and write this round's job into every site's exchange bucket (once per round) -- only when
        the round is requested and everything before it completed; else skip, naming the task whose log
        says why (one failure, one message)."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from lepton_tasks.adapters.signing import SigningError, TransitSigner
        from lepton_tasks.federation.coordinator import CoordinatorError, blocked_by, send_jobs
        from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry
        from lepton_tasks.federation.run_records import read_spec

        hook, storage, bucket, run_id = _coordinator()
        settings = hook.get_settings()
        if why := blocked_by(storage, bucket, run_id, 0):
            raise AirflowSkipException(why)
        spec = read_spec(storage, bucket, run_id)
        if isinstance(which, int) and which > spec.rounds:
            raise AirflowSkipException(f"round {which} not requested (rounds={spec.rounds})")
        round_ = _round_of(spec, which)
        if why := blocked_by(storage, bucket, run_id, round_):
            raise AirflowSkipException(why)
        signer = TransitSigner.from_vault(hook.get_vault(), settings.coordinator_key_name)
        try:
            sent = send_jobs(storage, bucket, signer, SiteRegistry(settings.site_registry_file), spec, round_)
        except (EnrollmentError, CoordinatorError) as exc:  # a site unpinned/removed, the contract changed
            raise AirflowFailException(str(exc)) from exc
        except SigningError as exc:
            import hvac.exceptions

            if isinstance(exc.__cause__, hvac.exceptions.Forbidden | hvac.exceptions.InvalidPath):
                raise AirflowFailException(  # the coordinator's key or its token is wrong: no retry
                    f"cannot sign with {settings.coordinator_key_name}: {exc}"
                ) from exc
            raise
        print(
            f"round {round_} ({spec.mode_of(round_)}): jobs sent to {', '.join(sorted(sent))}; "
            f"deadline {max(h.expires_at for h in sent.values()).isoformat()}"
        )
        return {site: str(h.message_id) for site, h in sent.items()}

    failables: list[Any] = []
    first = start()
    failables.append(first)
    previous: Any = first
    groups: list[tuple[str, int | str, str]] = [("statistics", 0, "statistics round: merged statistics")]
    groups += [(f"round_{k}", k, f"federated round {k}") for k in range(1, MAX_ROUNDS + 1)]
    groups.append(("evaluation", "evaluation", "held-out evaluation of the final model at every site"))
    collects: list[Any] = []
    for group_id, which, tooltip in groups:
        with TaskGroup(group_id=group_id, tooltip=tooltip):
            # a train round after a skipped one skips without running a task; after a failure its `send`
            # runs to skip naming the failed task. The evaluation's `send` waits for every round.
            s = send.override(
                trigger_rule="none_skipped" if isinstance(which, int) and which > 0 else "all_done"
            )(which)
            c = CollectAnswersOperator(
                task_id="collect",
                round_number=which,
                poll_interval="{{ params.poll_seconds }}",
                # no execution_timeout: Airflow would cap the deferral with it; the operator's own deferral
                # timeout is the round's deadline plus a grace period
            )
            (collects if which == "evaluation" else previous) >> s >> c
            failables += [s, c]
            collects.append(c)
            previous = c

    @task(trigger_rule="none_failed")
    def publish() -> str:
        """metrics.json, report.html (every exclusion and why) and the versioned model."""
        from airflow.sdk.exceptions import AirflowSkipException

        from lepton_tasks.federation.coordinator import blocked_by
        from lepton_tasks.federation.publish import publish_run
        from lepton_tasks.federation.run_records import read_spec

        hook, storage, bucket, run_id = _coordinator()
        why = blocked_by(storage, bucket, run_id, 0)
        if why:
            raise AirflowSkipException(why)
        spec = read_spec(storage, bucket, run_id)
        why = blocked_by(storage, bucket, run_id, spec.evaluation_round + 1)
        if why:
            raise AirflowSkipException(why)
        out = publish_run(
            storage,
            bucket,
            spec,
            report_dir=hook.get_settings().data_dir / "reports" / "federated" / run_id,
        )
        for who, why_excluded in out["excluded"].items():
            print(f"EXCLUDED {who}: {why_excluded}")
        print(f"REPORT: {out['report_url']}")
        print(f"report (local copy): {out['report_path']}")
        print(f"model version {out['version']} (round {out['published_round']}): {out['model_url']}")
        return str(out["report_url"])

    # publish's direct upstreams are every task that can fail: a failure anywhere marks it upstream-failed
    # (the run ends failed, with that one task's message) while everything after the failure skips
    failables >> publish()


if serves("lepton_federated"):  # only in an Airflow whose role runs it (lepton_airflow.roles)
    lepton_federated()
