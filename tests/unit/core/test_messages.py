"""Boundary objects: typed, versioned, and an error names the object, where it came from and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lepton_tasks.core.contracts import contract_from_document, contract_sha256, load_contract
from lepton_tasks.core.messages import (
    BOUNDARY_MODELS,
    HParams,
    MessageError,
    RegistryEntry,
    TrainerJob,
    dump,
    load,
)
from lepton_tasks.core.strategies import STRATEGIES
from lepton_tasks.ops.schemas import render

REPO = Path(__file__).resolve().parents[3]


def _job(**over):
    contract = load_contract("banks")
    job = {
        "mode": "train",
        "partner": "acme",
        "dataset": "banks",
        "run_id": "r1",
        "round": 1,
        "contract": contract.document(),
        "contract_sha256": contract.sha256,
        "vault_addr": "http://127.0.0.1:8200",
        "transit_mount": "transit",
        "key_name": "lepton-acme",
        "staging_bucket": "staging",
        "vault_token": "s.secret-token",
        "drops": [],
        "stats_url": "http://x/stats?X-Amz-Signature=abc",
        "output_url": "http://x/out",
        "output_key": "r1/round-1/acme.update",
        "hparams": {
            "local_epochs": 2,
            "local_only_epochs": 10,
            "batch_size": 64,
            "learning_rate": 0.005,
            "seed": 42,
            "fedprox_mu": 0.0,
        },
    }
    job.update(over)
    return job


def test_a_valid_object_round_trips():
    job = load(TrainerJob, json.dumps(_job()), where="LEPTON_JOB")
    assert load(TrainerJob, dump(job), where="again") == job


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda j: j.pop("partner"), "partner"),
        (lambda j: j.update(surprise=1), "surprise"),
        (lambda j: j.update(round="first"), "round"),
        (lambda j: j["hparams"].update(epochs=3), "hparams.epochs"),  # the old name: drift is an error now
        (lambda j: j.update(schema_version=2), "schema_version"),
    ],
    ids=["missing", "unknown", "mistyped", "drifted-name", "unknown-version"],
)
def test_bad_fields_fail_naming_the_object_where_and_the_field(change, field):
    job = _job()
    change(job)
    with pytest.raises(MessageError, match=rf"^LEPTON_JOB: invalid TrainerJob: field {field}\b"):
        load(TrainerJob, json.dumps(job), where="LEPTON_JOB")


def test_secrets_do_not_show_in_the_repr_of_a_job():
    job = load(TrainerJob, _job(), where="t")
    assert "s.secret-token" not in repr(job) and "X-Amz-Signature" not in repr(job)


def test_strategies_have_one_home_and_hparams_use_it():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "median", "trimmed_mean", "krum"}
    with pytest.raises(ValueError, match="strategy"):
        HParams(strategy="mean")
    with pytest.raises(ValueError, match="trim_beta"):
        HParams(trim_beta=0.5)


def test_every_model_carries_a_schema_version():
    for name, model in BOUNDARY_MODELS.items():
        assert "schema_version" in model.model_fields, name
    assert RegistryEntry(run_id="r", version=1).schema_version == 1


def test_committed_json_schemas_match_the_models():
    """docs/schemas is what partners read: regenerate with `lepton schemas export docs/schemas`."""
    expected = render()
    committed = {p.name: p.read_text() for p in (REPO / "docs/schemas").glob("*.json")}
    assert committed == expected


def test_contract_travels_with_its_hash_and_a_changed_contract_is_refused():
    contract = load_contract("banks")
    doc = contract.document()
    assert contract_from_document(doc, contract.sha256) == contract
    changed = {**doc, "version": doc["version"] + 1}
    assert contract_sha256(changed) != contract.sha256
    with pytest.raises(ValueError, match="does not match"):
        contract_from_document(changed, contract.sha256)


def test_training_defaults_live_in_the_contract():
    assert load_contract("ecommerce").training.rounds == 4
    assert load_contract("hospitals").training.batch_size == 32


def test_prose_and_form_defaults_do_not_change_the_contract_hash_but_data_rules_do():
    doc = load_contract("banks").document()
    base = contract_sha256(doc)
    reworded = {**doc, "description": "new words", "training": {**doc["training"], "learning_rate": 0.1}}
    reworded["columns"] = {k: {**v, "description": "x"} for k, v in doc["columns"].items()}
    assert contract_sha256(reworded) == base
    stricter = {**doc, "columns": {**doc["columns"], "balance": {**doc["columns"]["balance"], "min": 1.0}}}
    assert contract_sha256(stricter) != base


def test_dp_settings_are_off_by_default_and_travel_to_the_trainer():
    from lepton_tasks.core.messages import DPTraining, TrainerHParams

    assert HParams().dp_noise_multiplier is None and HParams().dp_training() is None
    hp = HParams(dp_noise_multiplier=1.1, dp_l2_clip=0.5, dp_delta=1e-6)
    assert hp.dp_training() == DPTraining(noise_multiplier=1.1, l2_clip=0.5, delta=1e-6)
    assert DPTraining(noise_multiplier=2.0) == DPTraining(noise_multiplier=2.0, l2_clip=1.0, delta=1e-5)
    # a job without DP (every job written before DP existed) is unchanged and reads as no DP
    job = load(TrainerJob, _job(), where="old")
    assert job.hparams.dp is None and "dp" not in _job()["hparams"]
    dp_job = load(TrainerJob, _job(hparams={**_job()["hparams"], "dp": {"noise_multiplier": 1.1}}), where="j")
    assert dp_job.hparams.dp == DPTraining(noise_multiplier=1.1)
    assert load(TrainerJob, dump(dp_job), where="again") == dp_job
    with pytest.raises(ValueError, match="dp"):
        TrainerHParams(**_job()["hparams"], dp={"noise_multiplier": 1.0, "epsilon": 3})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dp_noise_multiplier", 0.2),  # below the floor: one round's epsilon would run into the hundreds
        ("dp_noise_multiplier", -1.0),
        ("dp_noise_multiplier", float("inf")),
        ("dp_noise_multiplier", float("nan")),
        ("dp_l2_clip", 0.0),
        ("dp_l2_clip", float("inf")),
        ("dp_delta", 0.0),
        ("dp_delta", 1.0),
    ],
)
def test_bad_dp_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HParams(**{"dp_noise_multiplier": 1.0, field: value})


def test_a_privacy_charge_rides_in_the_update_and_the_local_model_meta():
    from lepton_tasks.core.messages import LocalModelMeta, PrivacyCharge, UpdateMeta

    charge = PrivacyCharge(
        noise_multiplier=1.1,
        sampling_rate=0.01,
        steps=10_000,
        l2_clip=1.0,
        delta=1e-5,
        epsilon_this_update=5.632,
    )
    assert charge.sampling == "poisson"
    update = UpdateMeta(partner="a", round=1, run_id="r", n_samples=5, metrics={}, drops=[], privacy=charge)
    assert load(UpdateMeta, dump(update), where="u").privacy == charge
    plain = {k: v for k, v in dump(update).items() if k != "privacy"}
    assert load(UpdateMeta, plain, where="old").privacy is None  # updates without DP read as before
    local = LocalModelMeta(partner="a", run_id="r", n_samples=5, metrics={}, privacy=charge)
    assert load(LocalModelMeta, dump(local), where="l").privacy == charge
    for bad in ({"sampling": "fixed"}, {"sampling_rate": 1.5}, {"steps": -1}, {"epsilon_this_update": -1}):
        with pytest.raises(MessageError, match="privacy"):
            load(UpdateMeta, {**dump(update), "privacy": {**dump(update)["privacy"], **bad}}, where="u")


def test_answers_carry_privacy_additively():
    """Schema version 1 grows optional fields only: what was written before still reads, unchanged."""
    from lepton_tasks.core.messages import BudgetStatus, PrivacyCharge, RoundAnswer, RunPrivacy, SitePrivacy

    charge = PrivacyCharge(
        noise_multiplier=1.1, sampling_rate=0.01, steps=100, l2_clip=1.0, delta=1e-5, epsilon_this_update=0.5
    )
    status = BudgetStatus(
        ledger="banks", epsilon_limit=3.0, delta=1e-5, epsilon_spent=0.5, epsilon_remaining=2.5
    )
    answer = RoundAnswer(mode="train", n_samples=10, privacy=charge, budget=status)
    assert load(RoundAnswer, dump(answer), where="a") == answer
    old = {"schema_version": 1, "mode": "train", "n_samples": 10}
    assert (
        load(RoundAnswer, old, where="old").privacy is None
        and load(RoundAnswer, old, where="old").budget is None
    )
    with pytest.raises(MessageError, match=r"budget\.epsilon_remaining"):
        load(RoundAnswer, {**old, "budget": {**status.model_dump(), "epsilon_remaining": -1}}, where="bad")
    run = RunPrivacy(
        secure_aggregation=False, sites={"a": SitePrivacy(rounds_charged=1, delta=1e-5, epsilon_run=0.5)}
    )
    assert RunPrivacy.model_validate(run.model_dump(mode="json")) == run


# ---------------------------------------------------------------------------------------------------------
# the coordinator's objects: metrics.json, model/VERSION.json, stats.json, the global weights' meta
# ---------------------------------------------------------------------------------------------------------


def test_run_metrics_round_trips_and_carries_what_the_report_reads():
    from lepton_tasks.core.messages import RunMetrics
    from tests.unit.federation.metrics_sample import sample_run_metrics

    metrics = sample_run_metrics()
    text = json.dumps(dump(metrics))
    assert load(RunMetrics, text, where="metrics.json") == metrics
    for name in ("run_id", "rounds", "statistics_round", "final", "lineage", "privacy"):
        assert RunMetrics.model_fields[name].is_required(), name  # the report reads them without a default


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda d: d.pop("privacy"), "privacy", "Field required"),
        (lambda d: d.pop("lineage"), "lineage", "Field required"),
        (lambda d: d.update(local_only={}), "local_only", "Extra inputs are not permitted"),
        (lambda d: d["rounds"][0].update(global_={"auc": 1}), r"rounds\.0\.global_", "Extra inputs"),
        (lambda d: d.update(min_partners="two"), "min_partners", "valid integer"),
        (lambda d: d["final"].update(overall=[]), r"final\.overall", "Input should be an object"),
        (lambda d: d["lineage"].update(published_round=0), r"lineage\.published_round", "greater than"),
        (lambda d: d["exclusions"][0].update(kind="lost"), r"exclusions\.0\.kind", "Input should be"),
        (lambda d: d.update(schema_version=2), "schema_version", "Input should be 1"),
    ],
)
def test_a_missing_unknown_or_mistyped_field_of_metrics_json_names_the_object_and_the_field(
    change, field, problem
):
    from lepton_tasks.core.messages import RunMetrics
    from tests.unit.federation.metrics_sample import sample_run_metrics

    doc = dump(sample_run_metrics())
    change(doc)
    where = "s3://models/federated/r/metrics.json"
    with pytest.raises(MessageError, match=rf"^{where}: invalid RunMetrics: field {field}: .*{problem}"):
        load(RunMetrics, json.dumps(doc), where=where)


def test_model_version_carries_the_runs_lineage():
    from datetime import UTC, datetime

    from lepton_tasks.core.messages import ModelVersion
    from tests.unit.federation.metrics_sample import sample_run_metrics

    lineage = sample_run_metrics().lineage
    version = ModelVersion(
        version=3, dataset="banks", run_id=lineage.run_id, published_at=datetime.now(UTC), lineage=lineage
    )
    assert load(ModelVersion, json.dumps(dump(version)), where="VERSION.json") == version
    with pytest.raises(MessageError, match=r"^VERSION\.json: invalid ModelVersion: field lineage\.drops"):
        bad = dump(version)
        bad["lineage"]["drops"] = {}  # stage 1's lineage: the coordinator never sees a drop
        load(ModelVersion, bad, where="VERSION.json")


def test_the_global_weights_meta_and_the_merged_statistics():
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.messages import GlobalWeightsMeta, MergedStatistics

    initial = GlobalWeightsMeta(run_id="r", round=0, strategy="fedavg", sites=["a", "b"])
    assert load(GlobalWeightsMeta, dump(initial), where="round 0") == initial  # round 0: the initial weights
    with pytest.raises(MessageError, match=r"^g: invalid GlobalWeightsMeta: field round: .*greater than"):
        load(GlobalWeightsMeta, {**dump(initial), "round": -1}, where="g")
    with pytest.raises(MessageError, match=r"field partners: Extra inputs"):
        load(GlobalWeightsMeta, {**dump(initial), "partners": []}, where="g")

    stats = MergedStatistics(
        statistics=SufficientStats(dataset="banks", contract_version=1, rows=3),
        feature_names=["balance"],
        sites=["a"],
    )
    assert load(MergedStatistics, json.dumps(dump(stats)), where="stats.json") == stats
    with pytest.raises(MessageError, match=r"^stats\.json: invalid MergedStatistics: field feature_names"):
        load(
            MergedStatistics,
            {k: v for k, v in dump(stats).items() if k != "feature_names"},
            where="stats.json",
        )
