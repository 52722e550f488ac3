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
   A partner whose task fails after its retries is excluded from that round; fewer than `min_partners`
   updates fail the round. Clearing one partner's task re-runs only that partner; outputs are keyed by
   run id + round, so re-runs are idempotent. Rounds beyond `rounds` are skipped.
3. `local_only` trains, in each partner's container and alongside the rounds, a model on that partner's data
   alone. `evaluate` scores, inside each partner's container and on its held-out split only, the final global
   model and every partner's local-only model (weights travel, data never does); partners return score
   histograms, so the overall AUC on the union of the holdouts is exact without any row leaving a partner.
   `publish` writes `metrics.json`, `report.html` and the versioned model, and logs where they are.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TaskGroup, dag, get_current_context, task
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from lepton_airflow.assets import DATASETS, staged_asset
from lepton_airflow.trainer import LeptonTrainerOperator

MAX_ROUNDS = 8
STRATEGIES = ["fedavg", "fedprox", "median", "trimmed_mean", "krum"]


def _param(name: str):
    return get_current_context()["params"][name]


#: per-dataset defaults for the trigger form (measured: see README "Measured results")
DEFAULTS = {
    "banks": {"rounds": 5, "local_epochs": 2, "batch_size": 64, "learning_rate": 0.005},
    "hospitals": {"rounds": 5, "local_epochs": 2, "batch_size": 32, "learning_rate": 0.005},
    "ecommerce": {"rounds": 4, "local_epochs": 1, "batch_size": 128, "learning_rate": 0.003},
}


def build(dataset: str):
    """The training DAG of one dataset: ``lepton_train_<dataset>``, started by that dataset's staged Asset."""
    d = DEFAULTS[dataset]

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
        default_args={"retries": 2, "retry_delay": timedelta(seconds=10), "owner": "lepton"},
        params={
            "partners": Param(
                [],
                type="array",
                items={"type": "string"},
                description="Partners to include; empty: every partner with staged data.",
            ),
            "rounds": Param(d["rounds"], type="integer", minimum=1, maximum=MAX_ROUNDS),
            "local_epochs": Param(d["local_epochs"], type="integer", minimum=1, maximum=100),
            "batch_size": Param(d["batch_size"], type="integer", minimum=1, maximum=65536),
            "learning_rate": Param(d["learning_rate"], type="number", exclusiveMinimum=0, maximum=1),
            "strategy": Param("fedavg", enum=STRATEGIES),
            "fedprox_mu": Param(
                0.01, type="number", minimum=0, description="FedProx proximal weight (client side)."
            ),
            "trim_beta": Param(0.2, type="number", minimum=0, exclusiveMaximum=0.5),
            "krum_f": Param(0, type="integer", minimum=0, description="Krum: tolerated Byzantine partners."),
            "min_partners": Param(2, type="integer", minimum=1, description="Quorum per round."),
            "seed": Param(42, type="integer", minimum=0),
        },
    )
    def train_dag():
        @task
        def plan() -> list[str]:
            """Verify manifests, merge federated statistics, write the plan; return the partners."""
            from lepton_airflow.connections import lepton_settings
            from lepton_tasks.adapters.storage import Storage
            from lepton_tasks.adapters.vault import Vault
            from lepton_tasks.federation.plan import HParams, plan_run

            ctx = get_current_context()
            p = ctx["params"]
            settings = lepton_settings()
            vault = Vault.connect(
                settings.vault_addr, settings.vault_token.get_secret_value(), settings.transit_mount
            )
            hp = HParams(
                rounds=p["rounds"],
                local_epochs=p["local_epochs"],
                batch_size=p["batch_size"],
                learning_rate=p["learning_rate"],
                strategy=p["strategy"],
                min_partners=p["min_partners"],
                seed=p["seed"],
                fedprox_mu=p["fedprox_mu"],
                trim_beta=p["trim_beta"],
                krum_f=p["krum_f"],
            )
            result = plan_run(
                settings,
                Storage.from_settings(settings),
                vault,
                run_id=ctx["run_id"],
                dataset=dataset,
                partners=p["partners"] or None,
                hparams=hp,
            )
            print(f"run {ctx['run_id']}: {dataset}, partners {result['partners']}, {hp}")
            return result["partners"]

        partners = plan()
        previous = partners
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
                ).expand(partner=partners)

                @task(task_id="aggregate", trigger_rule="all_done")
                def aggregate(k: int = k) -> dict:
                    """Aggregate the updates that arrived; fail the round below the quorum."""
                    from airflow.sdk.exceptions import AirflowSkipException

                    from lepton_airflow.connections import lepton_settings
                    from lepton_tasks.adapters.storage import Storage
                    from lepton_tasks.federation.plan import aggregate_round

                    if k > _param("rounds"):
                        raise AirflowSkipException(f"round {k} not requested")
                    settings = lepton_settings()
                    summary = aggregate_round(
                        settings,
                        Storage.from_settings(settings),
                        run_id=get_current_context()["run_id"],
                        round_number=k,
                    )
                    print(
                        f"round {k}: aggregated {sorted(summary['partners'])}; excluded {summary['excluded']}"
                    )
                    return {
                        "round": k,
                        "partners": sorted(summary["partners"]),
                        "excluded": summary["excluded"],
                    }

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
        ).expand(partner=partners)

        with TaskGroup(group_id="evaluate", tooltip="held-out evaluation inside each partner's container"):
            evaluate = LeptonTrainerOperator.partial(
                task_id="evaluate",
                mode="evaluate",
                execution_timeout=timedelta(hours=1),
                trigger_rule="all_done",
            ).expand(partner=partners)

            @task(trigger_rule="all_done")
            def publish() -> str:
                """metrics.json, report.html, the versioned model; print where the report is."""
                from lepton_airflow.connections import lepton_settings
                from lepton_airflow.trainer import choose_runtime
                from lepton_tasks.adapters.storage import Storage
                from lepton_tasks.federation.publish import publish_run

                settings = lepton_settings()
                runtime, _ = choose_runtime(settings)
                out = publish_run(
                    settings,
                    Storage.from_settings(settings),
                    run_id=get_current_context()["run_id"],
                    runtime=runtime,
                )
                print(f"REPORT: {out['report_url']}")
                print(f"report (local copy): {out['report_path']}")
                print(f"model version {out['version']}: {out['model_url']}")
                return out["report_url"]

            [*aggregates, local_only] >> evaluate >> publish()

    return train_dag()


for _dataset in DATASETS:
    build(_dataset)
