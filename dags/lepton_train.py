"""
### Lepton federated training (`lepton_train_<dataset>`): partner containers, rounds, quorum, report, model

**Starts** from the UI (validated Params), weekly, and whenever the ingest DAG announces new staged data for
its dataset (Asset `lepton-staged-<dataset>`): one DAG per dataset, so several datasets staged at once each
start their own training.

1. `plan` verifies every committed drop's signed manifest, merges the partners' federated statistics (train
   splits only) and writes `models/<run_id>/plan.json` + `stats.json`.
2. Each round is a task group: one `LeptonTrainerOperator` per partner (dynamic task mapping; a Docker
   container with a short-lived Vault token that decrypts only that partner's data — or the explicit local
   runtime when no Docker daemon answers), then `aggregate` (FedAvg, FedProx, median, trimmed mean or Krum).
   A partner whose task fails is excluded from that round with its reason (a security failure or a bad job
   fails at once, without retries); fewer than `min_partners` updates fail the run with one message.
   Clearing one partner's task re-runs only that partner; outputs are keyed by run id + round, so re-runs
   are idempotent; the plan is immutable once written. Rounds beyond `rounds` are skipped.
3. `local_only` trains, in each partner's container and alongside the rounds, a model on that partner's data
   alone. `evaluate` scores, inside each partner's container and on its held-out split only, the final global
   model and every partner's local-only model (weights travel, data never does); partners return score
   histograms, so the overall AUC on the union of the holdouts is exact without any row leaving a partner.
   `publish` writes `metrics.json`, `report.html` and the versioned model of the best round, and logs where
   they are. When an earlier step failed, the steps after it skip and `publish` fails naming it: one failure,
   one message.

Adding a dataset is one contract YAML (its `training:` block holds this form's defaults): no code edit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Param, TaskGroup, dag, get_current_context, task
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from lepton_airflow.assets import DATASETS, staged_asset
from lepton_airflow.defaults import default_args
from lepton_airflow.roles import serves
from lepton_airflow.trainer import LeptonTrainerOperator
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.strategies import STRATEGIES

#: the most rounds a run may ask for (the DAG has one task group per possible round)
MAX_ROUNDS = 8
#: transient failures (a service restarting) retry with exponential backoff: 15 s, 30 s, 60 s, 120 s —
#: about four minutes of outage ridden out; permanent failures (bad data, security, quorum) fail at once
DEFAULT_ARGS = default_args(retries=4)


def _param(name: str) -> Any:
    return get_current_context()["params"][name]


def _first_failure(run_id: str) -> str | None:
    """Why the run cannot go on (plan or a round did not complete), or None: the pointer later steps give."""
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.plan import plan_key, run_prefix

    settings = LeptonHook().get_settings()
    storage = Storage.from_settings(settings)
    if not storage.exists(settings.models_bucket, plan_key(run_id)):
        return "the `plan` task failed (no plan was written): see its log"
    for k in range(1, int(_param("rounds")) + 1):
        if not storage.exists(settings.models_bucket, f"{run_prefix(run_id)}round-{k}/global.npz"):
            return f"round {k} did not complete: see the `round_{k}.aggregate` task's log"
    return None


def build(dataset: str) -> Any:
    """The training DAG of one dataset: ``lepton_train_<dataset>``, started by that dataset's staged Asset."""
    d = load_contract(dataset).training

    @dag(
        dag_id=f"lepton_train_{dataset}",
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"),
            assets=staged_asset(dataset),
        ),
        catchup=False,
        max_active_runs=1,
        doc_md=__doc__,
        tags=["lepton", "training", dataset],
        default_args=DEFAULT_ARGS,
        params={
            "partners": Param(
                None,
                type=["null", "array"],
                items={"type": "string"},
                description="Partners to include; empty: every partner with staged data.",
            ),
            "rounds": Param(d.rounds, type="integer", minimum=1, maximum=MAX_ROUNDS),
            "local_epochs": Param(d.local_epochs, type="integer", minimum=1, maximum=100),
            "batch_size": Param(d.batch_size, type="integer", minimum=1, maximum=65536),
            "learning_rate": Param(d.learning_rate, type="number", exclusiveMinimum=0, maximum=1),
            "strategy": Param("fedavg", enum=list(STRATEGIES)),
            "fedprox_mu": Param(
                0.01, type="number", minimum=0, description="FedProx proximal weight (client side)."
            ),
            "trim_beta": Param(0.2, type="number", minimum=0, exclusiveMaximum=0.5),
            "krum_f": Param(0, type="integer", minimum=0, description="Krum: tolerated Byzantine partners."),
            "min_partners": Param(2, type="integer", minimum=1, description="Quorum per round."),
            "seed": Param(42, type="integer", minimum=0),
            "dp_noise_multiplier": Param(
                None,
                type=["null", "number"],
                minimum=0.3,
                description="Record-level differential privacy (DP-SGD) at every partner: the noise "
                "multiplier sigma (Gaussian noise of std sigma x clip on each batch's sum of clipped "
                "per-example gradients). Empty: no DP. Larger is more private and less accurate; each "
                "update's epsilon is in the round summary (bench/privacy/utility.py calibrates sigma to a "
                "target epsilon).",
            ),
            "dp_l2_clip": Param(
                1.0,
                type="number",
                exclusiveMinimum=0,
                description="DP-SGD: each example's gradient is clipped to this L2 norm.",
            ),
            "dp_delta": Param(
                1e-5,
                type="number",
                exclusiveMinimum=0,
                exclusiveMaximum=1,
                description="DP-SGD: the delta of the reported (epsilon, delta); keep it below 1/rows.",
            ),
        },
    )
    def train_dag() -> None:
        @task
        def plan() -> list[str]:
            """Verify manifests, merge federated statistics, write the plan; return the partners."""
            from airflow.sdk.exceptions import AirflowFailException

            from lepton_airflow.hook import LeptonHook
            from lepton_tasks.adapters.storage import Storage
            from lepton_tasks.core.messages import HParams
            from lepton_tasks.federation.plan import QuorumError, plan_run

            ctx = get_current_context()
            p = ctx["params"]
            hook = LeptonHook()
            settings = hook.get_settings()
            vault = hook.get_vault()
            hp = HParams(**{k: p[k] for k in HParams.model_fields if k in p})
            try:
                result = plan_run(
                    settings,
                    Storage.from_settings(settings),
                    vault,
                    run_id=ctx["run_id"],
                    dataset=dataset,
                    partners=p["partners"] or None,
                    hparams=hp,
                )
            except QuorumError as exc:  # retrying cannot add partners
                raise AirflowFailException(str(exc)) from exc
            for key, why in result.excluded.items():
                print(f"EXCLUDED drop {key}: {why}")
            print(f"run {ctx['run_id']}: {dataset}, partners {result.partners}, {hp}")
            return result.partners

        partners = plan()
        previous: Any = partners
        aggregates = []
        for k in range(1, MAX_ROUNDS + 1):
            with TaskGroup(group_id=f"round_{k}", tooltip=f"federated round {k}"):

                @task(task_id="gate")
                def gate(k: int = k) -> None:
                    """Skip this round (and the rest) when it is beyond the requested number of rounds."""
                    from airflow.sdk.exceptions import AirflowSkipException

                    if k > _param("rounds"):
                        raise AirflowSkipException(f"round {k} > rounds={_param('rounds')}")

                train = LeptonTrainerOperator.partial(
                    task_id="train",
                    mode="train",
                    round_number=k,
                    execution_timeout=timedelta(hours=1),
                    map_index_template="{{ task.partner }}",
                ).expand(partner=partners)

                @task(task_id="aggregate", trigger_rule="all_done")
                def aggregate(k: int = k) -> dict[str, Any]:
                    """Aggregate the updates that arrived; fail the run below the quorum (no retries)."""
                    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

                    from lepton_airflow.hook import LeptonHook
                    from lepton_tasks.adapters.storage import Storage
                    from lepton_tasks.federation.plan import (
                        QuorumError,
                        aggregate_round,
                        plan_key,
                        run_prefix,
                    )

                    if k > _param("rounds"):
                        raise AirflowSkipException(f"round {k} not requested")
                    run_id = get_current_context()["run_id"]
                    settings = LeptonHook().get_settings()
                    storage = Storage.from_settings(settings)
                    if not storage.exists(settings.models_bucket, plan_key(run_id)):
                        raise AirflowSkipException("the `plan` task failed: see its log")
                    if k > 1 and not storage.exists(
                        settings.models_bucket, f"{run_prefix(run_id)}round-{k - 1}/global.npz"
                    ):
                        raise AirflowSkipException(
                            f"round {k - 1} did not complete: see round_{k - 1}.aggregate"
                        )
                    try:
                        summary = aggregate_round(settings, storage, run_id=run_id, round_number=k)
                    except QuorumError as exc:
                        raise AirflowFailException(str(exc)) from exc
                    for p, why in summary.excluded.items():
                        print(f"EXCLUDED {p} from round {k}: {why}")
                    print(f"round {k}: aggregated {sorted(summary.partners)}")
                    return {"round": k, "partners": sorted(summary.partners), "excluded": summary.excluded}

                g = gate()
                agg = aggregate()
                previous >> g >> train >> agg
                previous = agg
                aggregates.append(agg)

        # local-only models (each partner's data alone) train alongside the rounds, for the comparison
        local_only = LeptonTrainerOperator.partial(
            task_id="local_only",
            mode="local",
            execution_timeout=timedelta(hours=1),
            map_index_template="{{ task.partner }}",
        ).expand(partner=partners)

        @task(trigger_rule="all_done")
        def rounds_done() -> None:
            """Evaluate only when every requested round completed (else skip, naming what failed)."""
            from airflow.sdk.exceptions import AirflowSkipException

            why = _first_failure(get_current_context()["run_id"])
            if why:
                raise AirflowSkipException(why)

        with TaskGroup(group_id="evaluate", tooltip="held-out evaluation inside each partner's container"):
            evaluate = LeptonTrainerOperator.partial(
                task_id="evaluate",
                mode="evaluate",
                execution_timeout=timedelta(hours=1),
                map_index_template="{{ task.partner }}",
            ).expand(partner=partners)

            @task(trigger_rule="all_done")
            def publish() -> str:
                """metrics.json, report.html, the best round's model; or fail naming the first failure."""
                from airflow.sdk.exceptions import AirflowFailException

                from lepton_airflow.hook import LeptonHook
                from lepton_airflow.trainer import choose_runtime
                from lepton_tasks.adapters.storage import Storage
                from lepton_tasks.federation.publish import PublishError, publish_run

                why = _first_failure(get_current_context()["run_id"])
                if why:
                    raise AirflowFailException(f"nothing to publish: {why}")
                settings = LeptonHook().get_settings()
                runtime, _ = choose_runtime(settings)
                try:
                    out = publish_run(
                        settings,
                        Storage.from_settings(settings),
                        run_id=get_current_context()["run_id"],
                        runtime=runtime,
                    )
                except PublishError as exc:
                    raise AirflowFailException(str(exc)) from exc
                for who, why_excluded in out["metrics"]["excluded"].items():
                    print(f"EXCLUDED {who}: {why_excluded}")
                print(f"REPORT: {out['report_url']}")
                print(f"report (local copy): {out['report_path']}")
                print(f"model version {out['version']} (round {out['published_round']}): {out['model_url']}")
                return str(out["report_url"])

            [*aggregates, local_only] >> rounds_done() >> evaluate >> publish()

    return train_dag()


if serves("lepton_train"):  # only in an Airflow whose role runs it (lepton_airflow.roles)
    for _dataset in DATASETS:
        build(_dataset)
