"""How the trainer reads its job from the environment (``read_job_env``) and the exit codes of what can go
wrong before any data is touched. Unwrapping against a real OpenBao (once, refused when spent or
substituted) is in tests/integration/test_trainer_container.py."""

from __future__ import annotations

import socket

import pytest

from lepton_tasks.trainer.__main__ import (
    EXIT_BAD_JOB,
    EXIT_TRANSIENT,
    JOB_TOKEN_ENV,
    JOB_VAULT_ENV,
    PLAIN_JOB_ENV,
    BadJobError,
    TransientError,
    main,
    read_job_env,
)


def _closed_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_plain_job_is_read_and_removed_from_the_environment():
    env = {PLAIN_JOB_ENV: '{"x": 1}', "PATH": "/bin"}
    assert read_job_env(env) == ('{"x": 1}', PLAIN_JOB_ENV)
    assert env == {"PATH": "/bin"}


def test_no_job_at_all_is_a_bad_job():
    with pytest.raises(BadJobError, match=f"neither {JOB_TOKEN_ENV} nor {PLAIN_JOB_ENV} is set"):
        read_job_env({})


def test_a_wrapping_token_without_its_vault_address_is_a_bad_job():
    env = {JOB_TOKEN_ENV: "s.abc"}
    with pytest.raises(BadJobError, match=f"{JOB_VAULT_ENV} .* is not"):
        read_job_env(env)
    assert env == {}


def test_every_job_variable_leaves_the_environment_even_when_unwrapping_fails():
    """The wrapping token takes precedence over a plain job; neither stays behind for child processes."""
    env = {JOB_TOKEN_ENV: "s.abc", JOB_VAULT_ENV: _closed_addr(), PLAIN_JOB_ENV: "{}"}
    with pytest.raises(TransientError, match=r"is unreachable: \[Errno 111\] Connection refused"):
        read_job_env(env)
    assert env == {}


def test_exit_codes_before_the_job_is_read(monkeypatch, capsys):
    for var in (JOB_TOKEN_ENV, JOB_VAULT_ENV, PLAIN_JOB_ENV):
        monkeypatch.delenv(var, raising=False)
    assert main(["--partner", "a", "--mode", "train"]) == EXIT_BAD_JOB
    assert "bad job: neither" in capsys.readouterr().err
    monkeypatch.setenv(JOB_TOKEN_ENV, "s.not-a-real-token-but-long-enough")
    monkeypatch.setenv(JOB_VAULT_ENV, _closed_addr())
    assert main(["--partner", "a", "--mode", "train"]) == EXIT_TRANSIENT  # Vault down: retry, not security
    err = capsys.readouterr().err
    assert err.startswith("transient error") and "not-a-real-token" not in err
