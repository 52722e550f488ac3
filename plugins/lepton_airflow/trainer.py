"""The per-partner trainer task: a DockerOperator whose secrets are minted at execute time.

``LeptonTrainerOperator`` is mapped over partners. In ``execute`` (never at parse time, never in XCom) it
builds the partner's job — presigned URLs for that partner's objects only and a short-lived Vault token
that can decrypt only that partner's key — and passes it in the container's *private* environment.

Runtime: ``docker`` when a daemon answers and the trainer image exists; otherwise the explicit ``local``
runtime runs the same entrypoint (``python -m lepton_tasks.trainer``) as a subprocess, with a loud warning in
the task log (and in the run's report). ``LEPTON_TRAINER_RUNTIME=docker`` makes a missing daemon an error.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

from airflow.providers.docker.operators.docker import DockerOperator

log = logging.getLogger(__name__)


def choose_runtime(settings) -> tuple[str, str]:
    """``(runtime, why)`` for this task: docker | local."""
    from lepton_tasks.ops.embedded.docker import docker_status

    if settings.trainer_runtime == "local":
        return "local", "LEPTON_TRAINER_RUNTIME=local"
    status = docker_status(settings.trainer_image)
    if status.available and status.trainer_image:
        return "docker", status.reason
    if settings.trainer_runtime == "docker":
        raise RuntimeError(f"LEPTON_TRAINER_RUNTIME=docker but Docker cannot run trainers: {status.reason}")
    return "local", status.reason


class LeptonTrainerOperator(DockerOperator):
    """Train (or evaluate) one partner's model in its own container.

    Image, network and GPUs come from Lepton's settings (``LEPTON_TRAINER_IMAGE``, ``LEPTON_TRAINER_NETWORK``,
    ``LEPTON_TRAINER_GPUS``), resolved in :meth:`execute`, like the connections — never at parse time.
    """

    template_fields = (*DockerOperator.template_fields, "run_id_", "partner")

    def __init__(
        self, *, partner: str, mode: str, round_number: int = 0, run_id_: str = "{{ run_id }}", **kwargs: Any
    ) -> None:
        super().__init__(
            image="lepton-trainer",  # replaced by settings.trainer_image in execute()
            command=None,
            auto_remove="success",
            mount_tmp_dir=False,
            do_xcom_push=False,
            **kwargs,
        )
        self.partner = partner
        self.mode = mode
        self.round_number = round_number
        self.run_id_ = run_id_

    def execute(self, context) -> dict[str, Any]:
        from lepton_airflow.connections import lepton_settings
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.adapters.vault import Vault
        from lepton_tasks.federation.plan import trainer_job

        settings = lepton_settings()
        runtime, why = choose_runtime(settings)
        storage = Storage.from_settings(settings)
        vault = Vault.connect(
            settings.vault_addr, settings.vault_token.get_secret_value(), settings.transit_mount
        )
        ttl = self.execution_timeout or timedelta(hours=1)
        job = trainer_job(
            settings,
            storage,
            vault,
            run_id=self.run_id_,
            partner=self.partner,
            mode=self.mode,
            round_number=self.round_number,
            ttl=ttl,
        )
        args = ["--partner", self.partner, "--mode", self.mode, "--round", str(self.round_number)]
        log.info(
            "trainer for %s (%s, round %s) runtime=%s (%s)",
            self.partner,
            self.mode,
            self.round_number,
            runtime,
            why,
        )
        if runtime == "docker":
            self.image = settings.trainer_image
            self.network_mode = settings.trainer_network
            if settings.trainer_gpus:
                from docker.types import DeviceRequest

                self.device_requests = [DeviceRequest(count=settings.trainer_gpus, capabilities=[["gpu"]])]
            self.command = args
            self._private_environment = {"LEPTON_JOB": json.dumps(job)}
            super().execute(context)
        else:
            log.warning(
                "!!! LOCAL RUNTIME: Docker is not available (%s); running the trainer as a subprocess "
                "of the Airflow worker. Partner isolation then relies on the scoped token only. !!!",
                why,
            )
            env = {**os.environ, "LEPTON_JOB": json.dumps(job), "TF_CPP_MIN_LOG_LEVEL": "2"}
            for k in [k for k in env if k.startswith(("AIRFLOW_CONN_", "LEPTON_S3_", "LEPTON_VAULT_"))]:
                env.pop(k)  # the trainer gets nothing but its job, like in a container
            proc = subprocess.run(
                [sys.executable, "-m", "lepton_tasks.trainer", *args],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=ttl.total_seconds(),
            )
            for line in (proc.stdout + proc.stderr).splitlines():
                log.info("trainer: %s", line)
            if proc.returncode != 0:
                raise RuntimeError(f"trainer for {self.partner} exited with {proc.returncode}")
        return {"partner": self.partner, "mode": self.mode, "round": self.round_number, "runtime": runtime}
