"""Fault scenario: Vault (or S3) goes down for ``--outage`` seconds just as a partner's trainer task starts.
Does the task ride it out under the training DAG's retry policy, and how long does it take?

What is real: a throwaway embedded stack (OpenBao + SeaweedFS on free 127.0.0.1 ports, in a temp dir), one
onboarded partner with one ingested drop and a planned run, and ``LeptonTrainerOperator.execute`` exactly as a
worker runs it (Airflow's connections in ``AIRFLOW_CONN_*``; health probe, token minting, job wrapping, the
trainer entrypoint; ``--runtime local`` by default: the trainer as a subprocess). The outage is the real
service process stopped and started again (OpenBao auto-unseals).

What is simulated: the scheduler. Each try runs here in turn, and the wait between tries is what Airflow 3's
``TaskInstance.next_retry_datetime`` computes for the policy (exponential backoff with its deterministic
per-try jitter, capped by ``max_retry_delay``), without the scheduler's own loop latency (a few seconds per
retry in a real deployment). Policies:

- ``before``: ``retries=2, retry_delay=10 s``, no backoff (the DAG before issue 12);
- ``after``: ``retries=4, retry_delay=15 s, retry_exponential_backoff=2.0, max_retry_delay=2 min`` (the DAG
  now).

    PATH=.venv/bin:$PATH .venv/bin/python bench/faults/service_outage.py --service vault --outage 90

Prints one line per try (start offset, duration, outcome, the first line of its error) and a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTNER, RUN_ID, DATASET = "fault-a", "fault-run-1", "hospitals"


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    delay: timedelta
    backoff: float = 1.0
    max_delay: timedelta | None = None

    def wait_before_retry(self, try_number: int, task_id: str) -> float:
        """Seconds between try ``try_number`` failing and the next, as Airflow 3.3 computes it
        (``airflow.models.taskinstance.TaskInstance.next_retry_datetime``)."""
        if self.backoff in (0, 1.0):
            wait = self.delay
        else:
            min_backoff = max(1, math.ceil(self.delay.total_seconds() * self.backoff ** (try_number - 1)))
            ti_hash = int(
                hashlib.sha1(
                    f"lepton_train#{task_id}#None#{try_number}".encode(), usedforsecurity=False
                ).hexdigest(),
                16,
            )
            wait = timedelta(seconds=min_backoff + ti_hash % min_backoff)
        if self.max_delay is not None:
            wait = min(wait, self.max_delay)
        return wait.total_seconds()


POLICIES = {
    "before": RetryPolicy(retries=2, delay=timedelta(seconds=10)),
    "after": RetryPolicy(retries=4, delay=timedelta(seconds=15), backoff=2.0, max_delay=timedelta(minutes=2)),
}


def _ports():
    """Free loopback ports below the ephemeral range (32768+), so that no client connection's source port
    takes a service's port while it is down (``Ports.free`` picks ephemeral ports: a restart can then find
    its port taken). gRPC offsets (+10000) stay below the range too."""
    import random

    from lepton_tasks.ops.embedded.process import port_free
    from lepton_tasks.ops.embedded.stack import Ports

    for _ in range(200):
        base = random.randrange(12000, 22000, 100)
        ports = Ports(
            vault=base,
            s3=base + 10,
            s3_master=base + 20,
            s3_volume=base + 30,
            s3_filer=base + 40,
            s3_admin=base + 50,
            airflow=base + 60,
        )
        wanted = [base, base + 1, base + 60, *(base + o for o in range(10, 60, 10))]
        wanted += [p + 10000 for p in range(base + 10, base + 60, 10)]
        if all(port_free("127.0.0.1", p) for p in wanted):
            return ports
    raise RuntimeError("no free block of ports below the ephemeral range")


def _prepare(stack) -> None:
    """One partner, one ingested drop, a planned one-round run."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.federation.plan import HParams, plan_run
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.partners import SeaweedIdentities, add_partner, drop_as_partner
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    settings = stack.settings()
    storage = Storage.from_settings(settings)
    operator = Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value())
    add_partner(
        settings,
        PARTNER,
        [DATASET],
        storage=storage,
        root_vault=stack.root_vault(),
        identities=SeaweedIdentities(stack.seaweedfs.shell),
    )
    df = sorted(SCENARIOS[DATASET].generate(5).items())[0][1]
    drop_as_partner(settings, PARTNER, f"{DATASET}/fault.csv", to_csv_bytes(df))
    ingest_drop(settings, storage, operator, PARTNER, f"{DATASET}/fault.csv")
    hp = HParams(rounds=1, local_epochs=1, batch_size=64, learning_rate=0.01, min_partners=1, seed=1)
    plan_run(settings, storage, operator, run_id=RUN_ID, dataset=DATASET, partners=[PARTNER], hparams=hp)


def run_scenario(stack, service: str, outage: float, policy_name: str) -> dict:
    from lepton_airflow.trainer import LeptonTrainerOperator

    policy = POLICIES[policy_name]
    proc = {"vault": stack.openbao, "s3": stack.seaweedfs}[service]
    task_id = f"train_round_1.{PARTNER}"
    tries: list[dict] = []
    t0 = time.monotonic()
    proc.stop()
    stopped_at = time.monotonic() - t0
    back: dict[str, float] = {}

    def restart() -> None:
        time.sleep(max(0.0, outage - (time.monotonic() - t0)))
        while True:
            try:
                proc.start()
                break
            except Exception as exc:  # noqa: BLE001 - recorded; the service comes back when it can
                print(f"[{policy_name}] restart failed, again in 2 s: {exc}", flush=True)
                time.sleep(2)
        back["at"] = time.monotonic() - t0

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    outcome = "failed"
    for try_number in range(1, policy.retries + 2):
        began = time.monotonic()
        start = began - t0
        op = LeptonTrainerOperator(
            task_id=f"t-{try_number}", partner=PARTNER, mode="train", round_number=1, run_id_=RUN_ID
        )
        try:
            op.execute(context={})
            error = ""
        except Exception as exc:  # noqa: BLE001 - a try's failure is what this benchmark records
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:220]}"
        took = time.monotonic() - began
        tries.append(
            {"try": try_number, "start_s": round(start, 1), "took_s": round(took, 1), "error": error}
        )
        print(
            f"[{policy_name}] try {try_number} at {start:6.1f}s ({took:5.1f}s): {error or 'SUCCESS'}",
            flush=True,
        )
        if not error:
            outcome = "succeeded"
            break
        if try_number <= policy.retries:
            time.sleep(policy.wait_before_retry(try_number, task_id))
    restarter.join()
    return {
        "policy": policy_name,
        "service": service,
        "outage_s": outage,
        "stopped_after_s": round(stopped_at, 1),
        "service_back_at_s": round(back.get("at", float("nan")), 1),
        "outcome": outcome,
        "task_done_at_s": round(time.monotonic() - t0, 1) if outcome == "succeeded" else None,
        "tries": tries,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--service", choices=("vault", "s3"), default="vault")
    parser.add_argument("--outage", type=float, default=90.0, help="seconds the service stays down")
    parser.add_argument("--policy", choices=("before", "after", "both"), default="both")
    parser.add_argument("--runtime", choices=("local", "docker"), default="local")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="lepton-faults-"))
    os.environ["AIRFLOW_HOME"] = str(home / "airflow")  # before anything imports airflow
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.pop("LEPTON_DATA_DIR", None)
    sys.path[:0] = [str(REPO), str(REPO / "plugins")]
    from lepton_tasks.ops.embedded.airflow import airflow_connections
    from lepton_tasks.ops.embedded.stack import Stack

    stack = Stack(home / "stack", ports=_ports())
    stack.up(with_airflow=False)
    if args.service == "s3" and args.runtime == "local" and stack.gateway_proc.stop():
        # the trainer gateway listens on the S3 port at the Docker network's gateway address, and SeaweedFS
        # refuses to start while any address holds its port ("Port allocation failed"): a restarted
        # SeaweedFS would never come back (see README.md). The local runtime does not need the gateway.
        print(
            "stopped the trainer gateway (a SeaweedFS restart fails while it holds the S3 port)", flush=True
        )
    results = []
    try:
        _prepare(stack)
        for key, value in airflow_connections(stack.airflow_settings()).items():
            os.environ[key] = value
        os.environ["LEPTON_DATA_DIR"] = str(stack.data_dir)
        os.environ["LEPTON_TRAINER_RUNTIME"] = args.runtime
        for name in ("before", "after") if args.policy == "both" else (args.policy,):
            results.append(run_scenario(stack, args.service, args.outage, name))
    finally:
        stack.down()
    summary = json.dumps(results, indent=1)
    print(summary)
    if args.json:
        args.json.write_text(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
