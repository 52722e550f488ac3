"""The demo harness: onboard a scenario's partners, drop their data as they would, wait for the event-driven
ingest and the asset-triggered federated training, then add a *centralized reference* (trained on the union
of the partners' data — something a real federation would not have) and print where the report is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_tasks.ops.scenarios import SCENARIOS, Scenario, to_csv_bytes

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ops.airflow_api import AirflowAPI
    from lepton_tasks.ops.embedded.stack import Stack

# the centralized reference trains in this process (see trainer/__init__)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def partner_name(raw: str) -> str:
    """Scenario partner ids (``bank_a``) as DNS-safe partner names (``bank-a``)."""
    return raw.replace("_", "-")


def _scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise SystemExit(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def drop_scenario(
    stack: Stack, scenario: str, *, seed: int = 7, dropped: dict[str, str] | None = None
) -> Iterator[str]:
    """Onboard missing partners and upload each partner's file with that partner's own credentials.

    ``dropped``, when given, receives ``{partner: drop id}`` of the files uploaded (what ingest will stage).
    """
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ingest.stage import drop_id_of
    from lepton_tasks.ops.partners import Registry, SeaweedIdentities, add_partner, drop_as_partner

    sc = _scenario(scenario)
    settings = stack.settings()
    storage = Storage.from_settings(settings)
    existing = Registry(settings.registry_file).load()
    for raw in sc.partners:
        name = partner_name(raw)
        if name not in existing:
            add_partner(
                settings,
                name,
                [sc.dataset],
                storage=storage,
                root_vault=stack.root_vault(),
                identities=SeaweedIdentities(stack.seaweedfs.shell),
            )
            yield f"onboarded partner {name} (inbox s3://{settings.inbox_bucket(name)}/)"
    frames = sc.generate(seed)
    for raw, df in frames.items():
        name = partner_name(raw)
        key = f"{sc.dataset}/{scenario}-seed{seed}.csv"
        data = to_csv_bytes(df)
        drop_as_partner(settings, name, key, data)
        if dropped is not None:
            dropped[name] = drop_id_of(hashlib.sha256(data).hexdigest())
        yield (
            f"{name} dropped s3://{settings.inbox_bucket(name)}/{key} ({len(df)} rows)"
            " with its own credentials"
        )


def _training_run(
    api: AirflowAPI,
    storage: Storage,
    settings: Settings,
    train_dag: str,
    before: set[str],
    expected: set[str],
    rounds: int,
    wait_for_asset_run: float = 120.0,
) -> Iterator[str]:
    """Find the training run that trains on all of ``expected`` (manifest keys); yield ``"run:<id>"`` last.

    The staged-asset events start runs as partners' drops land, so the first new run may have been planned
    with only some of them: a run counts once its ``plan.json`` lists every expected manifest. If none has
    started ``wait_for_asset_run`` seconds after staging, one is started from the API (at once when the drops
    were staged before, e.g. by an earlier demo with the same seed: no new asset event will come).
    """
    from lepton_tasks.federation.plan import run_prefix

    rejected: set[str] = set()
    t0 = time.monotonic()
    while True:
        pending = False
        for r in reversed(api.runs(train_dag)):  # oldest first
            rid = r["dag_run_id"]
            if rid in before or rid in rejected:
                continue
            plan_key = run_prefix(rid) + "plan.json"
            if not storage.exists(settings.models_bucket, plan_key):
                if r["state"] == "failed":
                    rejected.add(rid)
                else:
                    pending = True  # queued, or not planned yet
                continue
            planned = {
                d["manifest"]
                for ds in storage.get_json(settings.models_bucket, plan_key)["drops"].values()
                for d in ds
            }
            if expected <= planned:
                yield f"run:{rid}"
                return
            rejected.add(rid)
            yield f"run {rid} started before all drops were staged; waiting for the next one"
        if not pending and time.monotonic() - t0 >= wait_for_asset_run:  # no asset-triggered run covers them
            yield f"run:{api.trigger(train_dag, {'rounds': rounds})}"
            return
        time.sleep(3)


def centralized_reference(scenario: str, *, seed: int, hparams: dict[str, Any]) -> dict[str, Any]:
    """REFERENCE ONLY: the same pipeline on the union of all partners' data (impossible in a federation)."""
    import pandas as pd

    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.features import GlobalStats, feature_names, merge, transform
    from lepton_tasks.core.metrics import binary_metrics
    from lepton_tasks.ingest.prepare import prepare_drop
    from lepton_tasks.trainer.local import predict, train_local

    sc = _scenario(scenario)
    contract = load_contract(sc.dataset)
    trains, holdouts, stats = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for raw, df in sc.generate(seed).items():
            src = Path(tmp) / f"{raw}.csv"
            src.write_bytes(to_csv_bytes(df))
            prep = prepare_drop(src, contract, object_key=f"{sc.dataset}/{raw}.csv", out_dir=Path(tmp) / raw)
            trains.append(pd.read_parquet(prep.train_path))
            holdouts.append(pd.read_parquet(prep.holdout_path))
            stats.append(prep.stats)
    gstats = GlobalStats.from_stats(merge(stats), contract)
    names = feature_names(contract, gstats)
    train = transform(pd.concat(trains, ignore_index=True), contract, gstats)
    hold = transform(pd.concat(holdouts, ignore_index=True), contract, gstats)
    res = train_local(
        train,
        contract.model,
        names,
        epochs=hparams["local_epochs"] * hparams["rounds"],
        batch_size=hparams["batch_size"],
        learning_rate=hparams["learning_rate"],
        seed=hparams["seed"],
    )
    p = predict(hold, contract.model, names, res.weights)
    m = binary_metrics(hold["label"].to_numpy(), p)
    return {
        "label": "centralized reference (union of all partners' data; not available in a real federation)",
        "overall": m,
    }


def run_demo(
    stack: Stack, scenario: str, *, seed: int = 7, rounds: int = 5, timeout: float = 1800.0
) -> Iterator[str]:
    """The whole mission on the embedded stack; yields progress lines."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.plan import run_prefix
    from lepton_tasks.federation.publish import publish_run
    from lepton_tasks.ingest.stage import MANIFEST, drop_prefix
    from lepton_tasks.ops.airflow_api import AirflowAPI

    sc = _scenario(scenario)
    settings = stack.settings()
    af = stack.airflow(settings)
    api = AirflowAPI(af.url, "admin", af.admin_password() or "")
    deadline = time.monotonic() + 120
    train_dag = f"lepton_train_{sc.dataset}"
    while not (api.dag_exists("lepton_ingest") and api.dag_exists(train_dag)):
        if time.monotonic() > deadline:
            raise SystemExit(
                "the DAGs were not registered within 120 s: see `lepton logs airflow-dag-processor`"
            )
        time.sleep(3)
    for dag_id in ("lepton_ingest", train_dag):
        api.unpause(dag_id)
    before = {r["dag_run_id"] for r in api.runs(train_dag)}
    dropped: dict[str, str] = {}
    yield from drop_scenario(stack, scenario, seed=seed, dropped=dropped)
    storage = Storage.from_settings(settings)
    # these drops' manifests, not just any staged data (a second demo finds the first one's drops staged)
    expected = {f"{drop_prefix(p, sc.dataset, d)}{MANIFEST}" for p, d in dropped.items()}
    yield f"waiting for the inbox watcher to ingest the drops (event-driven; see {af.url}/dags/lepton_ingest)"
    t0 = time.monotonic()
    known = all(storage.exists(settings.staging_bucket, k) for k in expected)  # the same files, staged before
    while not all(storage.exists(settings.staging_bucket, k) for k in expected):
        if time.monotonic() - t0 > 600:
            raise SystemExit("drops were not staged within 10 min: see the lepton_ingest runs in the UI")
        time.sleep(3)
    yield (
        "these files were staged before (same content): starting a training run"
        if known
        else f"all {len(dropped)} partners staged in {time.monotonic() - t0:.0f}s; "
        "waiting for the training run"
    )
    run_id = None
    for line in _training_run(
        api,
        storage,
        settings,
        train_dag,
        before,
        expected,
        rounds,
        wait_for_asset_run=0.0 if known else 120.0,
    ):
        if line.startswith("run:"):
            run_id = line[4:]
        else:
            yield line
    if run_id is None:  # _training_run yields "run:<id>" last, or raises
        raise SystemExit(f"no training run of {train_dag} was found or started")
    yield f"training run {run_id}: {af.url}/dags/{train_dag}/runs/{run_id}"
    state = api.wait_run(train_dag, run_id, timeout)
    if state != "success":
        raise SystemExit(f"training run {run_id} ended {state}: see {af.url}/dags/{train_dag}/runs/{run_id}")
    plan = storage.get_json(settings.models_bucket, run_prefix(run_id) + "plan.json")
    ref = centralized_reference(scenario, seed=seed, hparams=plan["hparams"])
    runtime = storage.get_json(settings.models_bucket, run_prefix(run_id) + "metrics.json")["runtime"]
    out = publish_run(settings, storage, run_id=run_id, runtime=runtime, centralized=ref)
    m = out["metrics"]
    fed_auc = m["final"]["overall"].get("auc")
    lo_auc = m["local_only"]["overall"].get("auc")
    yield (
        f"federated AUC (union of holdouts) {fed_auc:.4f} | "
        f"centralized reference {ref['overall']['auc']:.4f} | "
        f"mean local-only (on the union) {lo_auc:.4f}"
        if fed_auc is not None and lo_auc is not None
        else json.dumps(m["final"])
    )
    yield f"REPORT: {out['report_path']}"
    yield f"model version {out['version']}: {out['model_url']}"
    yield f"Airflow UI: {af.url}  (user admin; password in {af.password_file()})"
