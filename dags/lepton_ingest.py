"""
### Lepton ingest: a partner's drop becomes validated, cleaned, encrypted, staged data

**Starts** when a partner drops a file under `<dataset>/` in its inbox bucket (an `AssetWatcher` polls every
5 s, and announces again a drop that was not handled 10 minutes later: a failed ingest retries by itself),
**daily** as a sweep of anything not yet handled, or **from the UI** with a partner and optionally one
object key.

Each drop is a transaction keyed by its content hash and its contract: download → check the partner is
onboarded for the dataset → Great Expectations validation against the dataset contract → cleaning →
deterministic split → federated statistics (train split only) → Tink streaming-AEAD encryption under the
partner's Vault transit key → staging, manifest last. The `ingest` tasks are mapped over batches (one drop
per task, the grid names it `partner/key`; past 1,024 drops a few per task, one after the other). A bad drop
is moved to the partner's `quarantine/` folder with `reason.json`, and its task fails at once (no retry:
the data will not change); other drops are unaffected. A drop that failed for another reason (storage or
Vault down) is retried. Datasets that received new staged data announce it through an Asset (and, at an
enrolled site, to the coordinator with a signed announcement in its exchange bucket), which starts
training. The last task, `summary`, lists every drop's outcome and **fails the run** when a drop was
quarantined or could not be ingested, with the reasons in its log.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, AssetWatcher, Param, dag, get_current_context, task
from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from lepton_airflow.assets import DATASETS, staged_asset
from lepton_airflow.defaults import default_args
from lepton_airflow.inbox_trigger import InboxTrigger
from lepton_airflow.roles import serves

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
    default_args=default_args(retries=2),
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
    def discover() -> list[dict]:
        """Which drops this run handles (the watcher's payload, the UI's Params, or a sweep), in batches."""
        from airflow.sdk.configuration import conf

        from lepton_airflow.hook import LeptonHook
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.core.drops import batch_drops, batch_label, cap_list
        from lepton_tasks.ingest.stage import list_new_drops
        from lepton_tasks.ops.partners import Registry

        ctx = get_current_context()
        params = ctx["params"]
        drops: list[dict[str, str]] = []
        for events in (ctx.get("triggering_asset_events") or {}).values():
            for event in events:
                drops.extend((event.extra or {}).get("payload", {}).get("drops", []))
        settings = LeptonHook().get_settings()
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
        batches = batch_drops(
            [unique[k] for k in sorted(unique)], conf.getint("core", "max_map_length", fallback=1024)
        )
        print(
            f"{len(unique)} drop(s) to ingest in {len(batches)} task(s): "
            f"{cap_list(f'{p}/{k}' for p, k in sorted(unique))}"
        )
        return [{"label": batch_label(b), "drops": b} for b in batches]

    @task(
        max_active_tis_per_dagrun=2,
        execution_timeout=timedelta(hours=2),
        map_index_template="{{ task.op_kwargs['batch']['label'] }}",
    )
    def ingest(batch: dict) -> list[dict]:
        """A batch of drops, one after the other (see lepton_tasks.ingest.stage.ingest_batch)."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_airflow.hook import LeptonHook
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.ingest.stage import ingest_batch
        from lepton_tasks.ops.partners import Registry

        hook = LeptonHook()
        settings = hook.get_settings()
        vault = hook.get_vault()
        results = [
            r.to_dict()
            for r in ingest_batch(
                settings,
                Storage.from_settings(settings),
                vault,
                batch["drops"],
                allowed=Registry(settings.registry_file).allowed_datasets(),
                mark_seen=False,  # announce_<dataset> marks them handled once announced
            )
        ]
        for r in results:
            print(
                f"{r['partner']}/{r['object_key']}: {r['status']}"
                + (f" ({r['error']})" if r["error"] else "")
            )
        quarantined = [r for r in results if r["status"] == "quarantined"]
        failed = [r for r in results if r["status"] == "failed"]
        if quarantined or failed:
            # the results travel even though the task fails: the drops staged in this batch are announced
            get_current_context()["ti"].xcom_push("return_value", results)
        if quarantined:  # bad data: retrying cannot help, so fail now and loudly
            raise AirflowFailException(
                "; ".join(f"{r['partner']}/{r['object_key']} quarantined: {r['error']}" for r in quarantined)
            )
        if failed:  # storage, Vault…: retried (the drops already staged are reported again, not redone)
            raise RuntimeError(
                "; ".join(f"{r['partner']}/{r['object_key']} failed: {r['error']}" for r in failed)
            )
        return results

    batches = discover()
    results = ingest.expand(batch=batches)

    announcements = []
    for dataset in DATASETS:

        @task(task_id=f"announce_{dataset}", outlets=[staged_asset(dataset)], trigger_rule="all_done")
        def announce(results: list[list[dict]], dataset: str = dataset) -> None:
            """Emit the dataset's Asset event only if this run staged new data for it; then mark those
            drops handled (until then the inbox trigger would announce them again)."""
            from airflow.sdk.exceptions import AirflowSkipException

            from lepton_airflow.hook import LeptonHook
            from lepton_tasks.adapters.storage import Storage
            from lepton_tasks.ingest.stage import mark_announced

            staged = [
                r
                for batch in results
                for r in batch or []
                if r.get("status") == "staged" and r.get("dataset") == dataset
            ]
            if not staged:
                raise AirflowSkipException(f"no new staged data for {dataset}")
            ctx = get_current_context()
            ctx["outlet_events"][staged_asset(dataset)].extra = {
                "dataset": dataset,
                "drops": [f"{r['partner']}/{r['drop_id']}" for r in staged],
            }
            hook = LeptonHook()
            settings = hook.get_settings()
            mark_announced(Storage.from_settings(settings), settings, staged)
            print(f"announced {len(staged)} new staged drop(s) for {dataset}")
            # an enrolled site also tells its coordinator (dataset and time only); a storage error retries
            # this task (the drops above stay staged and announced locally); no bundle: skipped, logged
            from lepton_tasks.site.announce import announce_staged

            if sent := announce_staged(settings, hook.get_vault, dataset):
                print(f"announced {dataset} to the coordinator: s3://{sent.bucket}/{sent.key}")

        announcements.append(announce(results))

    @task(trigger_rule="all_done")
    def summary(batches: list[dict], results: list[list[dict]]) -> None:
        """Every drop's outcome; fails the run when a drop was quarantined or could not be ingested."""
        from airflow.sdk.exceptions import AirflowFailException

        from lepton_tasks.ingest.stage import summarize

        drops = [d for b in batches for d in b["drops"]]
        text, problems = summarize(drops, [r for batch in results for r in batch or []])
        print(text)
        if problems:
            raise AirflowFailException(f"{len(problems)} of {len(drops)} drop(s) were not staged:\n" + text)

    announcements >> summary(batches, results)


if serves("lepton_ingest"):  # only in an Airflow whose role runs it (lepton_airflow.roles)
    lepton_ingest()
