"""The site policy: the file loads only when coherent; check_job returns every violation with its reason."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from lepton_tasks.adapters.signing import PublicKey, fingerprint
from lepton_tasks.core.site_policy import (
    SITE_LEDGER,
    JobSummary,
    PolicyError,
    PrivacyBudget,
    RefusalCode,
    SitePolicy,
    approval_deadline,
    check_job,
    load_policy,
    parse_policy,
    refusal_codes,
    render_yaml,
    write_policy,
)

BANKS_SHA = "5d1c" * 16
HOSPITALS_SHA = "a0b1" * 16


@pytest.fixture(scope="module")
def coordinator_key() -> str:
    return base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()


@pytest.fixture
def document(coordinator_key: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "site": "bank-a",
        "consortium": "credit-risk",
        "coordinator": {"public_key": coordinator_key, "fingerprint": fingerprint(coordinator_key)},
        "datasets": [
            {"name": "banks", "contract_sha256": BANKS_SHA},
            {"name": "hospitals", "contract_sha256": HOSPITALS_SHA},
        ],
        "min_partners": 3,
        "max_rounds": 20,
        "allowed_strategies": ["fedavg", "median"],
        "require_secure_aggregation": True,
        "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
        "approval": {"required": True, "deadline": "PT24H"},
    }


@pytest.fixture
def policy(document: dict[str, Any]) -> SitePolicy:
    return parse_policy(document)


def allowed_job(**overrides: Any) -> JobSummary:
    values: dict[str, Any] = {
        "consortium": "credit-risk",
        "dataset": "banks",
        "contract_hash": BANKS_SHA,
        "rounds": 20,
        "strategy": "fedavg",
        "min_partners": 3,
        "secure_aggregation": True,
        "differential_privacy": True,
    }
    values.update(overrides)
    return JobSummary(**values)


# ------------------------------------------------------------------------------------------------ the file


YAML_POLICY = """\
schema_version: 1
site: bank-a
consortium: credit-risk
coordinator:
  public_key: "{key}"
  fingerprint: "{fp}"
datasets:
  - name: banks
    contract_sha256: "{banks}"
min_partners: 3
max_rounds: 20
allowed_strategies: [fedavg, median]
require_secure_aggregation: true
privacy_budget: {{epsilon: 8, delta: 1e-5}}   # YAML 1.1 reads 1e-5 as a string; the model takes it
approval: {{required: true, deadline: PT24H}}
"""

TOML_POLICY = """\
schema_version = 1
site = "bank-a"
consortium = "credit-risk"
min_partners = 3
max_rounds = 20
allowed_strategies = ["median", "fedavg"]
require_secure_aggregation = true

[coordinator]
public_key = "{key}"
fingerprint = "{fp}"

[[datasets]]
name = "banks"
contract_sha256 = "{banks}"

[privacy_budget]
epsilon = 8.0
delta = 1e-5

[approval]
required = true
deadline = "PT24H"
"""


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_yaml_and_toml_policies_load_to_the_same_policy(tmp_path, coordinator_key):
    values = {"key": coordinator_key, "fp": fingerprint(coordinator_key).upper(), "banks": BANKS_SHA}
    from_yaml = load_policy(_write(tmp_path / "policy.yaml", YAML_POLICY.format(**values)))
    from_toml = load_policy(_write(tmp_path / "policy.toml", TOML_POLICY.format(**values), 0o644))
    assert from_yaml == from_toml
    assert from_yaml.coordinator.fingerprint == fingerprint(coordinator_key)  # normalized
    assert from_yaml.privacy_budget == PrivacyBudget(epsilon=8.0, delta=1e-5)
    assert from_yaml.approval.deadline == timedelta(hours=24)
    assert from_yaml.allowed_strategies == frozenset({"fedavg", "median"})
    assert from_yaml.dataset("banks") is not None and from_yaml.dataset("weather") is None


def test_render_yaml_round_trips_and_write_policy_is_private(tmp_path, policy):
    assert parse_policy(yaml.safe_load(render_yaml(policy))) == policy
    path = tmp_path / "site" / "policy.yaml"
    write_policy(policy, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_policy(path) == policy
    odd = policy.model_copy(
        update={"approval": policy.approval.model_copy(update={"deadline": timedelta(seconds=90)})}
    )
    assert parse_policy(yaml.safe_load(render_yaml(odd))) == odd


def test_a_policy_others_may_modify_is_refused(tmp_path, policy):
    path = _write(tmp_path / "policy.yaml", render_yaml(policy), 0o664)
    with pytest.raises(PolicyError, match="chmod 600"):
        load_policy(path)
    assert load_policy(path, check_permissions=False) == policy


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("policy.json", "{}", r"\.yaml, \.yml or \.toml"),
        ("policy.yaml", "a: [", "not valid YAML"),
        ("policy.toml", "a = ", "not valid TOML"),
        ("policy.yaml", "- 1\n- 2\n", "mapping"),
        ("policy.yaml", "schema_version: 2\n", "schema_version is 2; this Lepton reads version 1"),
    ],
)
def test_unreadable_files_say_why(tmp_path, name, text, match):
    with pytest.raises(PolicyError, match=match):
        load_policy(_write(tmp_path / name, text))
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_a_fingerprint_that_does_not_match_the_key_is_refused(document):
    document["coordinator"]["fingerprint"] = fingerprint(
        base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    )
    with pytest.raises(PolicyError, match=r"field coordinator: .*does not match the public key"):
        parse_policy(document)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("coordinator", "public_key"), "not-a-key", "coordinator.public_key"),
        (("coordinator", "fingerprint"), "abcd", "coordinator.fingerprint"),
        (("site",), "Bank A", "site"),
        (("min_partners",), 0, "min_partners"),
        (("max_rounds",), 0, "max_rounds"),
        (("allowed_strategies",), [], "allowed_strategies"),
        (("allowed_strategies",), ["FedAvg"], "allowed_strategies.0"),
        (("privacy_budget", "epsilon"), 0, "privacy_budget.epsilon"),
        (("privacy_budget", "delta"), 1.0, "privacy_budget.delta"),
        (("privacy_budget", "delta"), 0, "privacy_budget.delta"),  # DP-SGD has no (ε, 0) guarantee
        (
            ("datasets",),
            [
                {
                    "name": "banks",
                    "contract_sha256": BANKS_SHA,
                    "privacy_budget": {"epsilon": -1, "delta": 1e-5},
                }
            ],
            "datasets.0.privacy_budget.epsilon",
        ),
        (("approval",), {"required": True}, "approval"),
        (("approval",), {"required": True, "deadline": "PT0S"}, "approval"),
        (("datasets",), [{"name": "banks", "contract_sha256": "ABC"}], "datasets.0.contract_sha256"),
        (("datasets",), [{"name": "banks", "contract_sha256": BANKS_SHA}] * 2, "datasets"),
        (("surprise",), True, "surprise"),
    ],
)
def test_invalid_fields_are_named(document, path, value, field):
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(PolicyError, match=rf"field {field}: "):
        parse_policy(document)


def test_required_fields_have_no_defaults(document):
    for field in ("require_secure_aggregation", "min_partners", "max_rounds", "approval", "coordinator"):
        incomplete = {k: v for k, v in document.items() if k != field}
        with pytest.raises(PolicyError, match=f"field {field}: Field required"):
            parse_policy(incomplete)


def test_the_policy_is_frozen(policy):
    with pytest.raises(ValidationError):
        policy.max_rounds = 1000


def test_the_pinned_key_carries_the_version_when_pinned(document, coordinator_key):
    assert parse_policy(document).coordinator.pinned_key() == coordinator_key
    document["coordinator"]["key_version"] = 2
    pinned = parse_policy(document).coordinator.pinned_key()
    assert pinned == PublicKey("coordinator", 2, coordinator_key)


# ------------------------------------------------------------------------------------------------ check_job


def test_a_job_within_the_policy_is_allowed(policy):
    assert check_job(policy, allowed_job()) == []
    assert check_job(policy, allowed_job(rounds=1, min_partners=10, strategy="median")) == []
    assert check_job(policy, allowed_job(dataset="hospitals", contract_hash=HOSPITALS_SHA)) == []
    # the budget binds training only: statistics and evaluation jobs run without DP-SGD
    assert check_job(policy, allowed_job(mode="statistics", differential_privacy=False)) == []
    assert check_job(policy, allowed_job(mode="evaluate", differential_privacy=False)) == []


@pytest.mark.parametrize(
    ("overrides", "code", "field", "words"),
    [
        ({"consortium": "ad-tech"}, RefusalCode.WRONG_CONSORTIUM, "consortium", "'ad-tech'"),
        ({"dataset": "weather"}, RefusalCode.DATASET_NOT_ALLOWED, "dataset", "allowed: banks, hospitals"),
        ({"contract_hash": "f" * 64}, RefusalCode.CONTRACT_MISMATCH, "contract_hash", "ffffffffffff"),
        ({"contract_hash": HOSPITALS_SHA}, RefusalCode.CONTRACT_MISMATCH, "contract_hash", "5d1c5d1c5d1c"),
        ({"rounds": 21}, RefusalCode.TOO_MANY_ROUNDS, "rounds", "at most 20"),
        ({"strategy": "krum"}, RefusalCode.STRATEGY_NOT_ALLOWED, "strategy", "allowed: fedavg, median"),
        ({"min_partners": 2}, RefusalCode.TOO_FEW_PARTNERS, "min_partners", "at least 3"),
        (
            {"secure_aggregation": False},
            RefusalCode.SECURE_AGGREGATION_REQUIRED,
            "secure_aggregation",
            "secure",
        ),
        (
            {"differential_privacy": False},
            RefusalCode.PRIVACY_REQUIRED,
            "hparams.dp",
            "only with differential privacy (the site's budget: ε ≤ 8, δ = 1e-05)",
        ),
    ],
)
def test_each_violation_is_refused_with_its_reason(policy, overrides, code, field, words):
    refusals = check_job(policy, allowed_job(**overrides))
    assert [(r.code, r.field) for r in refusals] == [(code, field)]
    assert words in refusals[0].message


def test_every_violation_is_reported_at_once(policy):
    job = allowed_job(
        consortium="ad-tech",
        dataset="weather",
        rounds=50,
        strategy="krum",
        min_partners=1,
        secure_aggregation=False,
        differential_privacy=False,
    )
    assert refusal_codes(check_job(policy, job)) == [
        "wrong_consortium",
        "dataset_not_allowed",  # (no contract check for a dataset the site does not train on)
        "too_many_rounds",
        "strategy_not_allowed",
        "too_few_partners",
        "secure_aggregation_required",
        # (no privacy check either: the dataset is not granted, so no budget applies to it)
    ]


def test_optional_requirements_off_allow_more(document):
    document["require_secure_aggregation"] = False
    del document["privacy_budget"]
    document["approval"] = {"required": False}
    relaxed = parse_policy(document)
    assert check_job(relaxed, allowed_job(secure_aggregation=False, differential_privacy=False)) == []
    assert approval_deadline(relaxed, datetime(2026, 1, 1, tzinfo=UTC)) is None


def test_the_approval_deadline_counts_from_reception(policy):
    received = datetime(2026, 1, 1, 9, 30, tzinfo=UTC)
    assert approval_deadline(policy, received) == datetime(2026, 1, 2, 9, 30, tzinfo=UTC)


def test_refusals_serialize_for_the_refusal_message(policy):
    refusals = check_job(policy, allowed_job(rounds=21))
    assert [r.model_dump(mode="json") for r in refusals] == [
        {
            "code": "too_many_rounds",
            "field": "rounds",
            "message": "the job runs 21 rounds; this site allows at most 20",
        }
    ]


# ------------------------------------------------------------------------------------------- privacy budget


def test_a_policy_file_without_any_budget_still_loads_and_needs_no_dp(document):
    """Files written before budgets existed: no field is required, and they keep their meaning."""
    del document["privacy_budget"]
    policy = parse_policy(document)
    assert all(d.privacy_budget is None for d in policy.datasets)
    assert policy.budget_for("banks") is None
    assert check_job(policy, allowed_job(differential_privacy=False)) == []


def test_a_datasets_own_budget_takes_precedence_over_the_sites(document):
    document["datasets"][1]["privacy_budget"] = {"epsilon": 2.0, "delta": 1e-6}
    policy = parse_policy(document)
    own = policy.budget_for("hospitals")
    shared = policy.budget_for("banks")
    assert (
        own is not None and own.ledger == "hospitals" and own.budget == PrivacyBudget(epsilon=2, delta=1e-6)
    )
    assert shared is not None and shared.ledger == SITE_LEDGER
    assert shared.budget == PrivacyBudget(epsilon=8.0, delta=1e-5)
    refusals = check_job(
        policy, allowed_job(dataset="hospitals", contract_hash=HOSPITALS_SHA, differential_privacy=False)
    )
    assert [(r.code, r.field) for r in refusals] == [(RefusalCode.PRIVACY_REQUIRED, "hparams.dp")]
    assert "its budget: ε ≤ 2, δ = 1e-06" in refusals[0].message


def test_a_budget_on_one_dataset_only_requires_dp_there(document):
    del document["privacy_budget"]
    document["datasets"][0]["privacy_budget"] = {"epsilon": 3.0, "delta": 1e-5}
    policy = parse_policy(document)
    assert policy.budget_for("hospitals") is None
    assert (
        check_job(
            policy, allowed_job(dataset="hospitals", contract_hash=HOSPITALS_SHA, differential_privacy=False)
        )
        == []
    )
    assert refusal_codes(check_job(policy, allowed_job(differential_privacy=False))) == ["privacy_required"]


def test_a_per_dataset_budget_round_trips_through_yaml(document, tmp_path):
    document["datasets"][0]["privacy_budget"] = {"epsilon": 3.0, "delta": 1e-5}
    policy = parse_policy(document)
    path = tmp_path / "policy.yaml"
    write_policy(policy, path)
    assert load_policy(path) == policy
    assert "privacy_budget" not in yaml.safe_load(path.read_text())["datasets"][1]  # unset stays unset
