"""LeptonTrainerOperator's pure parts: exit codes → retry or not, stderr tail, secrets scrubbed, container
hardening options, addresses through the trainer gateway, no write to DockerOperator's private attributes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException
from pydantic import SecretStr

from lepton_airflow import trainer
from lepton_tasks.adapters.settings import Settings


def _settings(**kw) -> Settings:
    base = {
        "vault_addr": "http://127.0.0.1:8200",
        "s3_endpoint": "127.0.0.1:8333",
        "vault_token": SecretStr("s.operator"),
    }
    return Settings(**{**base, **kw})


@pytest.mark.parametrize(("code", "meaning"), [(2, "bad job"), (3, "security failure")])
def test_bad_job_and_security_failure_are_not_retried(code, meaning):
    exc = trainer.failure("acme", code, ["first", "security error: manifest signature does not verify"])
    assert isinstance(exc, AirflowFailException)
    assert f"trainer for acme failed: {meaning} (exit code {code})" in str(exc)
    assert "manifest signature does not verify" in str(exc)


@pytest.mark.parametrize("code", [1, 4, 137])
def test_other_exit_codes_fail_normally_and_are_retried(code):
    exc = trainer.failure("acme", code, ["boom"])
    assert not isinstance(exc, AirflowFailException)
    assert isinstance(exc, trainer.TrainerFailed) and f"(exit code {code})" in str(exc) and "boom" in str(exc)


def test_failure_message_holds_the_last_20_stderr_lines_without_secrets():
    lines = [f"line {i}" for i in range(50)]
    lines[-1] = (
        "GET http://172.18.0.1:8333/staging/x?X-Amz-Credential=AK%2F1&X-Amz-Signature=abcdef0123 failed"
    )
    lines[-2] = "token s.AbCdEfGhIjKlMnOpQrStUvWx1234 denied"
    text = str(trainer.failure("acme", 1, lines))
    assert "line 29" not in text and "line 30" in text
    assert "abcdef0123" not in text and "AK%2F1" not in text and "X-Amz-Signature=[redacted]" in text
    assert "s.AbCdEfGhIjKlMnOpQrStUvWx1234" not in text


def test_container_is_hardened():
    spec = trainer.container_spec(_settings(trainer_memory="3g", trainer_cpus=1.5), network="lepton-trainers")
    assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"]
    assert spec["security_opt"] == ["no-new-privileges"] and spec["privileged"] is False
    assert spec["mem_limit"] == spec["memswap_limit"] == "3g"
    assert spec["nano_cpus"] == 1_500_000_000 and spec["pids_limit"] == trainer.PIDS_LIMIT
    assert spec["network_mode"] == "lepton-trainers"
    assert set(spec["tmpfs"]) == {"/tmp", trainer.TRAINER_HOME}
    assert "uid=10001" in spec["tmpfs"][trainer.TRAINER_HOME]
    assert "device_requests" not in spec
    assert len(trainer.container_spec(_settings(trainer_gpus=1), network="x")["device_requests"]) == 1


def test_loopback_addresses_go_through_the_gateway():
    s = trainer.via_gateway(_settings(), "172.18.0.1")
    assert s.vault_addr == "http://172.18.0.1:8200" and s.s3_endpoint == "172.18.0.1:8333"
    compose = _settings(vault_addr="http://vault:8200", s3_endpoint="minio:9000")
    assert trainer.via_gateway(compose, "172.18.0.1") is compose


def test_no_write_to_private_attributes_of_docker_operator():
    """The operator sets no ``self._x`` attribute (DockerOperator's private state stays its own)."""
    tree = ast.parse(Path(trainer.__file__).read_text())
    writes = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.startswith("_")
    ]
    allowed = {"_vault"}  # _WrappedTokenVault's own attribute, not an operator's
    assert set(writes) <= allowed, f"writes to private attributes: {set(writes) - allowed}"


def test_local_runtime_maps_a_bad_job_to_no_retry_with_its_stderr():
    """A real trainer process given an invalid job exits 2: the task fails at once, saying why."""
    op = trainer.LeptonTrainerOperator(task_id="t", partner="acme", mode="train", run_id_="r")
    with pytest.raises(AirflowFailException, match=r"bad job \(exit code 2\)") as err:
        op._run_local(
            ["--partner", "acme", "--mode", "train"], json.dumps({"partner": "acme"}), _ttl(), "test"
        )
    assert "bad job" in str(err.value).split("stderr lines:", 1)[1]


def _ttl():
    from datetime import timedelta

    return timedelta(minutes=2)
