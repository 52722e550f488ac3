"""Demo helpers shared by the topology demo (``topology_demo``) and the benchmarks: scenario partner names,
dropping a scenario's files as its partners would (``lepton demo drop``, into the ingest-only development
stack), and a *centralized reference* (trained on the union of the partners' data — something a real
federation would not have).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_tasks.ops.scenarios import SCENARIOS, Scenario, to_csv_bytes

if TYPE_CHECKING:
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
