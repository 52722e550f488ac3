"""
### Lepton ingest: a partner's drop becomes validated, cleaned, encrypted, staged data

**Starts** when a partner drops a file under `<dataset>/` in its inbox bucket (an `AssetWatcher` polls every
5 s), **daily** as a sweep of anything not yet handled, or **from the UI** with a partner and optionally one
object key.

Each drop is one mapped task (a transaction keyed by the drop's content hash): download → Great Expectations
validation against the dataset contract → cleaning → deterministic split → federated statistics (train split
only) → Tink streaming-AEAD encryption under the partner's Vault transit key → staging, manifest last. A bad drop
is moved to the partner's `quarantine/` folder with `reason.json` and the task fails loudly; other drops are
unaffected. Datasets that received new staged data announce it through an Asset, which starts training.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, AssetWatcher, Param, dag, get_current_context, task
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from lepton_airflow.assets import DATASETS, staged_asset
from lepton_airflow.inbox_trigger import InboxTrigger

INBOXES = Asset(
    name="lepton-inboxes",
    uri="s3://inbox/",
    watchers=[AssetWatcher(name="lepton_inbox_watcher", trigger=InboxTrigger(poll_interval=5.0))],
)


@dag(
    dag_id="lepton_ingest",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"), assets=INBOXES),
    catchup=False,
    max_active_runs=4,
    doc_md=__doc__,
    tags=["lepton", "ingest"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20), "owner": "lepton"},
    params={
        "partner": Param(
            None,
            type=["null", "string"],
            pattern="^[a-z][a-z0-9-]{1,30}[a-z0-9]$",
            description="Ingest only this partner's inbox (UI runs). Empty: every partner.",
        ),
        "object_key": Param(
            None,
            type=["null", "string"],
            maxLength=512,
            description="One object key in that inbox, e.g. banks/2026-11.csv. Empty: all new.",
        ),
    },
)
def lepton_ingest():
    @task
    def discover() -> list[dict[str, str]]:
        """Which drops this run handles: the watcher's payload, the UI's Params, or a sweep."""
        from lepton_airflow.connections import lepton_settings
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.ingest.stage import list_new_drops
        from lepton_tasks.ops.partners import Registry

        ctx = get_current_context()
        params = ctx["params"]
        drops: list[dict[str, str]] = []
        for events in (ctx.get("triggering_asset_events") or {}).values():
            for event in events:
                drops.extend((event.extra or {}).get("payload", {}).get("drops", []))
        settings = lepton_settings()
        if params.get("partner") and params.get("object_key"):
            drops = [{"partner": params["partner"], "key": params["object_key"]}]
        elif not drops:
            partners = (
                [params["partner"]]
                if params.get("partner")
                else sorted(Registry(settings.registry_file).load())
            )
            drops = list_new_drops(Storage.from_settings(settings), settings, partners)
        unique = {(d["partner"], d["key"]): {"partner": d["partner"], "key": d["key"]} for d in drops}
        print(f"{len(unique)} drop(s) to ingest: {sorted(unique)}")
        return list(unique.values())

    @task(max_active_tis_per_dagrun=2, execution_timeout=timedelta(hours=2))
    def ingest(drop: dict[str, str]) -> dict:
        """One drop, end to end (see lepton_tasks.ingest.stage.ingest_drop)."""
        from dataclasses import asdict

        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.connections import lepton_settings
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.adapters.vault import Vault
        from lepton_tasks.core.drops import DropError
        from lepton_tasks.ingest.stage import ingest_drop

        settings = lepton_settings()
        storage = Storage.from_settings(settings)
        if not storage.exists(settings.inbox_bucket(drop["partner"]), drop["key"]):
            print(
                f"{drop['partner']}/{drop['key']} is no longer in the inbox (already handled): nothing to do"
            )
            return {"partner": drop["partner"], "object_key": drop["key"], "status": "gone"}
        vault = Vault.connect(
            settings.vault_addr, settings.vault_token.get_secret_value(), settings.transit_mount
        )
        try:
            result = ingest_drop(settings, storage, vault, drop["partner"], drop["key"])
        except DropError as err:  # bad data: quarantined; retrying cannot help, so fail now and loudly
            raise AirflowFailException(f"drop quarantined: {err}") from err
        return asdict(result)

    results = ingest.expand(drop=discover())

    for dataset in DATASETS:

        @task(task_id=f"announce_{dataset}", outlets=[staged_asset(dataset)], trigger_rule="all_done")
        def announce(results: list[dict], dataset: str = dataset) -> None:
            """Emit the dataset's Asset event only if this run staged new data for it."""
            from airflow.sdk.exceptions import AirflowSkipException

            staged = [r for r in results if r and r.get("status") == "staged" and r.get("dataset") == dataset]
            if not staged:
                raise AirflowSkipException(f"no new staged data for {dataset}")
            ctx = get_current_context()
            ctx["outlet_events"][staged_asset(dataset)].extra = {
                "dataset": dataset,
                "drops": [f"{r['partner']}/{r['drop_id']}" for r in staged],
            }
            print(f"announced {len(staged)} new staged drop(s) for {dataset}")

        announce(results)


lepton_ingest()
