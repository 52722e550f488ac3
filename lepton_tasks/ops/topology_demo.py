"""The federated demo across separate stacks: a coordinator and N sites (:mod:`lepton_tasks.ops.topology`),
each with its own Airflow, OpenBao and SeaweedFS.

1. ``up``: create, start and enroll the topology (idempotent).
2. ``ingest``: at each site, in the site's OWN stack, onboard the site's partner (``Settings.site_partner``,
   default the site's name) and drop one scenario partner's file into its inbox with that partner's own
   credentials; the site's ``lepton_ingest`` (its inbox watcher) stages it.
3. ``federated``: trigger ``lepton_federated`` on the coordinator's Airflow (REST API); the sites' exchange
   watchers start ``lepton_site`` runs that answer each round's job; the coordinator publishes its report.
4. ``references``: what the federated AUC is judged against, computed by the demo outside the protocol (a
   real federation has neither): a centralized model on the pooled files and each site's local-only model.

Every phase is timed (wall clock, ``time.monotonic``); the memory of every process of every stack is sampled
while it runs (PSS: shared pages split between the processes sharing them, so the sum is what the machine
holds; trainer containers are not counted: they run under the Docker daemon).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

if TYPE_CHECKING:
    from lepton_tasks.ops.airflow_api import AirflowAPI
    from lepton_tasks.ops.embedded.stack import Stack
    from lepton_tasks.ops.topology import Topology

DAG_WAIT_S = 180.0
#: how often the coordinator looks for the sites' answers in the demo (the DAG's default is 10 s: on one
#: machine every look is a few local S3 requests, and each look saved is time off every round)
DEMO_POLL_S = 2.0


def site_names(scenario: str) -> list[str]:
    """The demo's sites: one per scenario partner, named after it (``bank_a`` → ``bank-a``)."""
    from lepton_tasks.ops.demo import partner_name

    return [partner_name(raw) for raw in SCENARIOS[scenario].partners]


class TopologyDemoError(RuntimeError):
    """A demo step that did not complete; the message names the step, the stack and where to look."""


@dataclass
class TopologyDemoResult:
    root: Path
    sites: tuple[str, ...]
    run_id: str = ""
    state: str = ""
    report_url: str = ""
    report_path: str = ""
    #: phase → seconds (wall clock)
    timings: dict[str, float] = field(default_factory=dict)
    #: the most every stack's processes held together while the demo ran (bytes, PSS), 0 if not measured
    peak_pss: int = 0
    #: AUC on each site's holdout and of the federated model on the union of the holdouts
    auc: dict[str, float | None] = field(default_factory=dict)
    #: AUC on the union of the holdouts of the demo's references (computed by the demo from the files it
    #: generated, outside the protocol): "centralized" (pooled data) and "mean local-only" (each site alone)
    references: dict[str, float | None] = field(default_factory=dict)
    excluded: dict[str, Any] = field(default_factory=dict)
    ui: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
def _api(stack: Stack) -> AirflowAPI:
    from lepton_tasks.ops.airflow_api import AirflowAPI

    af = stack.airflow(stack.settings())
    return AirflowAPI(af.url, "admin", af.admin_password() or "")


def _wait_dags(api: AirflowAPI, dags: tuple[str, ...], where: str, timeout: float = DAG_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not all(api.dag_exists(d) for d in dags):
        if time.monotonic() > deadline:
            raise TopologyDemoError(
                f"{where}: the DAGs {', '.join(dags)} were not registered within {timeout:.0f} s "
                "(see its dag-processor log under <data dir>/logs)"
            )
        time.sleep(3)
    for d in dags:
        api.unpause(d)


class _MemorySampler:
    """Samples the PSS of every process of the given stacks every ``every`` seconds in a thread."""

    def __init__(self, stacks: list[Stack], every: float = 5.0) -> None:
        self.stacks = stacks
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        import psutil  # type: ignore[import-untyped]

        from lepton_tasks.ops.embedded.process import session_members

        pids: set[int] = set()
        for stack in self.stacks:
            for pid_file in (stack.data_dir / "run").glob("*.pid"):
                try:
                    leader = int(json.loads(pid_file.read_text())["pid"])
                except (OSError, ValueError, KeyError):
                    continue
                pids |= set(session_members(leader))
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a measurement must never break the demo
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every)

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------------------
def check_trainer_image(stack: Stack) -> str:
    """Fail before anything starts when the sites' trainer image is missing or older than the trainer's
    sources: a site's ``answer`` refuses a stale image at once (no retry), so every round would wait for
    its deadline. No Docker daemon: nothing to check (the sites' trainers then run locally)."""
    import docker.errors  # binds ``docker`` too

    from lepton_tasks.ops.images import trainer_image_freshness

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException:
        return "no Docker daemon answers: trainers run locally"
    fresh = trainer_image_freshness(client, stack.settings().trainer_image)
    if fresh.stale:
        raise TopologyDemoError(fresh.reason)
    return fresh.reason


def bring_up(topo: Topology, dataset: str = "banks") -> Iterator[str]:
    """Start every stack and enroll every site (both idempotent); a new site's policy allows ``dataset``."""
    from lepton_tasks.ops.topology import SiteSetup

    yield check_trainer_image(topo.site(topo.sites[0]))
    for org, started in topo.up().items():
        fresh = [service for service, new in started.items() if new]
        yield f"{org}: {'started ' + ', '.join(fresh) if fresh else 'already running'}"
    for site, fingerprint in topo.enroll(SiteSetup(datasets=(dataset,))).items():
        yield f"{site}: enrolled, key pinned {fingerprint}"


def drop_at_site(stack: Stack, site: str, frame_csv: bytes, *, dataset: str, key: str) -> tuple[str, str]:
    """Onboard the site's partner in the site's OWN stack (once) and drop ``frame_csv`` into its inbox with
    the partner's credentials. Returns ``(partner, expected manifest key in the site's staging bucket)``."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ingest.stage import MANIFEST, drop_id_of, drop_prefix
    from lepton_tasks.ops.partners import Registry, SeaweedIdentities, add_partner, drop_as_partner

    settings = stack.settings()
    partner = settings.site_partner or site
    if partner not in Registry(settings.registry_file).load():
        add_partner(
            settings,
            partner,
            [dataset],
            storage=Storage.from_settings(settings),
            root_vault=stack.root_vault(),
            identities=SeaweedIdentities(stack.seaweedfs.shell),
        )
    drop_as_partner(settings, partner, key, frame_csv)
    drop = drop_id_of(hashlib.sha256(frame_csv).hexdigest())
    return partner, f"{drop_prefix(partner, dataset, drop)}{MANIFEST}"


def ingest_at_sites(topo: Topology, scenario: str, *, seed: int, timeout: float = 600.0) -> Iterator[str]:
    """Each site's partner drops one scenario partner's file (site i gets partner i); waits until every site
    staged its drop in its own staging bucket."""
    from lepton_tasks.adapters.storage import Storage

    sc = SCENARIOS[scenario]
    if len(topo.sites) > len(sc.partners):
        raise TopologyDemoError(
            f"scenario {scenario!r} has {len(sc.partners)} partners' files for {len(topo.sites)} sites"
        )
    frames = sc.generate(seed)
    expected: dict[str, tuple[Stack, str]] = {}
    for site, raw in zip(topo.sites, sc.partners, strict=False):
        stack = topo.site(site)
        _wait_dags(_api(stack), ("lepton_ingest", "lepton_site"), f"site {site}")
        data = to_csv_bytes(frames[raw])
        partner, manifest = drop_at_site(
            stack, site, data, dataset=sc.dataset, key=f"{sc.dataset}/{scenario}-seed{seed}.csv"
        )
        expected[site] = (stack, manifest)
        yield (
            f"{site}: partner {partner} dropped {scenario}:{raw} ({len(frames[raw])} rows) "
            "with its own credentials"
        )
    t0 = time.monotonic()
    pending = dict(expected)
    while pending:
        for site, (stack, manifest) in list(pending.items()):
            settings = stack.settings()
            if Storage.from_settings(settings).exists(settings.staging_bucket, manifest):
                del pending[site]
                yield f"{site}: staged in {time.monotonic() - t0:.0f} s (s3://{settings.staging_bucket}/{manifest})"
        if pending and time.monotonic() - t0 > timeout:
            raise TopologyDemoError(
                f"not staged within {timeout:.0f} s at {', '.join(pending)}: see their lepton_ingest runs"
            )
        if pending:
            time.sleep(2)


def federated_run(
    topo: Topology,
    dataset: str,
    *,
    rounds: int | None,
    min_partners: int,
    poll_seconds: float = DEMO_POLL_S,
    timeout: float = 1800.0,
    result: TopologyDemoResult,
) -> Iterator[str]:
    """Trigger ``lepton_federated`` at the coordinator (``rounds`` None: the contract's default) and wait for
    it; fills ``result``."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core.messages import RunMetrics, load
    from lepton_tasks.federation.run_records import exchange_run_id, run_prefix

    coordinator = topo.coordinator()
    api = _api(coordinator)
    _wait_dags(api, ("lepton_federated",), "the coordinator")
    conf = {
        "dataset": dataset,
        "rounds": rounds,
        "min_partners": min_partners,
        "poll_seconds": poll_seconds,
        "round_deadline_minutes": 30,
    }
    run_id = api.trigger("lepton_federated", conf)
    af = coordinator.airflow(coordinator.settings())
    yield f"coordinator: lepton_federated run {run_id}: {af.url}/dags/lepton_federated/runs/{run_id}"
    result.run_id = run_id
    result.state = api.wait_run("lepton_federated", run_id, timeout, poll=3.0)
    if result.state != "success":
        raise TopologyDemoError(
            f"lepton_federated run {run_id} ended {result.state}: "
            f"see {af.url}/dags/lepton_federated/runs/{run_id}"
        )
    cs = coordinator.settings()
    storage = Storage.from_settings(cs)
    exchange_id = exchange_run_id(run_id)
    prefix = run_prefix(exchange_id)
    metrics_key = prefix + "metrics.json"
    metrics = load(
        RunMetrics,
        storage.get_bytes(cs.models_bucket, metrics_key),
        where=f"s3://{cs.models_bucket}/{metrics_key}",
    )
    result.report_url = f"s3://{cs.models_bucket}/{prefix}report.html"
    result.report_path = str(cs.data_dir / "reports" / "federated" / exchange_id / "report.html")
    for site, m in metrics.final.per_partner.items():
        result.auc[site] = m.get("auc")
    result.auc["federated (union of holdouts)"] = metrics.final.overall.get("auc")
    result.excluded = dict(metrics.excluded)


def references(topo: Topology, scenario: str, *, seed: int, result: TopologyDemoResult) -> Iterator[str]:
    """REFERENCES ONLY, impossible in a real federation: the centralized model on the pooled scenario files
    (:func:`lepton_tasks.ops.demo.centralized_reference`) and each site's local-only model scored on every
    site's holdout (:func:`lepton_tasks.ops.inprocess_run.local_only_baseline`), with the run's own
    hyper-parameters; both train in this process."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.run_records import exchange_run_id, read_spec
    from lepton_tasks.ops.demo import centralized_reference
    from lepton_tasks.ops.inprocess_run import local_only_baseline

    cs = topo.coordinator().settings()
    spec = read_spec(Storage.from_settings(cs), cs.models_bucket, exchange_run_id(result.run_id))
    hp = spec.hparams
    ref = centralized_reference(
        scenario,
        seed=seed,
        hparams={
            "rounds": spec.rounds,
            "local_epochs": hp.local_epochs,
            "batch_size": hp.batch_size,
            "learning_rate": hp.learning_rate,
            "seed": hp.seed,
        },
    )
    result.references["centralized"] = ref["overall"].get("auc")
    yield "centralized reference trained on the pooled files"
    local = local_only_baseline(topo, spec.run_id)
    result.references["mean local-only"] = local.mean_union_auc
    yield f"local-only models trained and scored at {', '.join(sorted(local.union))}"


def run_topology_demo(
    root: Path,
    sites: list[str] | tuple[str, ...] | None = None,
    *,
    rounds: int | None = None,
    scenario: str = "banks",
    seed: int = 7,
    timeout: float = 1800.0,
    progress: Callable[[str], None] = print,
) -> TopologyDemoResult:
    """The whole federated demo across separate stacks (see the module docstring); the stacks stay up.
    ``sites`` None: one site per scenario partner (:func:`site_names`); ``rounds`` None: the contract's."""
    from lepton_tasks.ops.topology import Topology

    if scenario not in SCENARIOS:
        raise TopologyDemoError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    topo = Topology.create(root, list(sites or site_names(scenario)))
    result = TopologyDemoResult(root=root, sites=topo.sites)
    with _MemorySampler(list(topo.stacks().values())) as mem:
        for phase, steps in (
            ("up", lambda: bring_up(topo, SCENARIOS[scenario].dataset)),
            ("ingest", lambda: ingest_at_sites(topo, scenario, seed=seed)),
            (
                "federated",
                lambda: federated_run(
                    topo,
                    SCENARIOS[scenario].dataset,
                    rounds=rounds,
                    min_partners=len(topo.sites),
                    timeout=timeout,
                    result=result,
                ),
            ),
            ("references", lambda: references(topo, scenario, seed=seed, result=result)),
        ):
            t0 = time.monotonic()
            for line in steps():
                progress(f"{phase} +{time.monotonic() - t0:.0f}s | {line}")
            result.timings[phase] = round(time.monotonic() - t0, 1)
    result.peak_pss = mem.peak
    result.ui = {org: d["airflow"] for org, d in topo.describe().items()}
    return result
