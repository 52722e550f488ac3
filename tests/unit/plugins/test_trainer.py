"""The site trainer's pure parts (``lepton_airflow.trainer``): a failed trainer's exit code and stderr tail,
secrets scrubbed, container hardening options, addresses through the trainer gateway, the local runtime.
(How the site classifies an exit code: tests/unit/site/test_trainer_failures.py.)"""

from __future__ import annotations

import json

import pytest
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


@pytest.mark.parametrize(
    ("code", "meaning"),
    [
        (1, "unexpected error"),
        (2, "bad job"),
        (3, "security failure"),
        (4, "transient failure"),
        (137, "killed"),
    ],
)
def test_a_failed_trainer_is_named_with_its_exit_code_and_meaning(code, meaning):
    exc = trainer.exited("acme", code, ["first", "security error: manifest signature does not verify"])
    assert isinstance(exc, trainer.TrainerFailed) and exc.exit_code == code
    assert f"trainer for acme failed: {meaning} (exit code {code})" in str(exc)
    assert "manifest signature does not verify" in str(exc)


def test_failure_message_holds_the_last_20_stderr_lines_without_secrets():
    lines = [f"line {i}" for i in range(50)]
    lines[-1] = (
        "GET http://172.18.0.1:8333/staging/x?X-Amz-Credential=AK%2F1&X-Amz-Signature=abcdef0123 failed"
    )
    lines[-2] = "token s.AbCdEfGhIjKlMnOpQrStUvWx1234 denied"
    text = str(trainer.exited("acme", 1, lines))
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


def test_local_runtime_names_a_bad_job_with_its_exit_code_and_stderr():
    """A real trainer process given an invalid job exits 2: ``TrainerFailed`` says why, with its stderr."""
    with pytest.raises(trainer.TrainerFailed, match=r"bad job \(exit code 2\)") as err:
        trainer.run_local(
            ["--partner", "acme", "--mode", "train"], json.dumps({"partner": "acme"}), _ttl(), "test", "acme"
        )
    assert err.value.exit_code == 2
    assert "bad job" in str(err.value).split("stderr lines:", 1)[1]


def _ttl():
    from datetime import timedelta

    return timedelta(minutes=2)
