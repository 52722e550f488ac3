"""When the site cannot train (lepton_tasks.site.training): which failures become a signed refusal at once,
which only on the task's last try (Airflow retries the others), and what the refusal's message may say.

- no usable data → ``no_usable_data`` at once (retrying cannot add data);
- a trainer exit other than 4, an update or evaluation missing or unreadable → ``trainer_failed`` at once;
- exit 4, a service down (the trainer's health probe), the runtime failing otherwise → raised (retried) and
  ``trainer_failed`` on the last try;
- the message names the exit code and the kind of the trainer's last error, never its text (a data value,
  an address, a path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lepton_tasks.adapters.health import ServiceHealth, ServicesDown
from lepton_tasks.adapters.settings import Settings
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.messages import RoundJob, TrainerHParams
from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode
from lepton_tasks.site.training import (
    SiteTrainer,
    TrainerFailed,
    TrainerRun,
    local_run_id,
    trainer_error_kind,
    trainer_refusal,
)
from tests.unit.site.fakes import MemoryStorage

SECRET_VALUE = "Alice Smith"  # a record's value the trainer's error text might quote
ADDRESS = "10.20.30.40:8333"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (f"error: ValueError: could not convert string to float: '{SECRET_VALUE}'", "error: ValueError"),
        (
            f"transient error (a service did not answer; retry): ConnectionError: {ADDRESS} refused",
            "transient error: ConnectionError",
        ),
        (f"security error: the manifest of s3://staging/{SECRET_VALUE} does not verify", "security error"),
        (f"bad job: it is for {SECRET_VALUE}/train, not a/train", "bad job"),
        (f"KeyError: '{SECRET_VALUE}'", "KeyError"),
        ("error: could not read the split", "error"),
        ("2026-01-01 12:00:00 trainer[lepton.trainer] INFO partner a: train (run r, round 1)", None),
        ('  File "/app/lepton_tasks/trainer/local.py", line 3, in train', None),
        ("errors: 3 rows", None),
        (SECRET_VALUE, None),
        ("", None),
    ],
)
def test_only_the_kind_of_the_trainers_last_error_line_is_kept(line, kind):
    assert trainer_error_kind(line) == kind


def _failed(code: int, *tail: str) -> TrainerFailed:
    return TrainerFailed(f"trainer exited {code}: " + "\n".join(tail), exit_code=code, stderr_tail=tail)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (1, "the trainer exited with code 1 (unexpected error); its last error: error: ValueError"),
        (2, "the trainer exited with code 2 (bad job); its last error: error: ValueError"),
        (3, "the trainer exited with code 3 (security failure); its last error: error: ValueError"),
        (137, "the trainer exited with code 137 (killed by signal 9); its last error: error: ValueError"),
    ],
)
def test_a_trainer_exit_other_than_transient_refuses_at_once_naming_code_and_kind(code, says):
    exc = _failed(
        code, "Traceback (most recent call last):", f"error: ValueError: bad value '{SECRET_VALUE}'"
    )
    assert not exc.transient
    message = trainer_refusal(exc, last_try=False)
    assert message == says
    assert SECRET_VALUE not in message


@pytest.mark.parametrize("code", [137, -9])  # Docker's 128 + n, a subprocess's -n
def test_a_trainer_killed_without_an_error_line_is_named_by_its_code(code):
    message = trainer_refusal(_failed(code, "2026-01-01 trainer INFO epoch 1/3"), last_try=False)
    assert message == f"the trainer exited with code {code} (killed by signal 9)"


def test_exit_4_is_retried_and_refused_only_on_the_last_try():
    exc = _failed(4, f"transient error (a service did not answer; retry): ConnectionError: {ADDRESS}")
    assert exc.transient
    assert trainer_refusal(exc, last_try=False) is None
    message = trainer_refusal(exc, last_try=True)
    assert message == (
        "the trainer exited with code 4 (transient failure); its last error: transient error: "
        "ConnectionError on the task's last try"
    )
    assert ADDRESS not in message


def test_a_service_down_is_retried_and_refused_on_the_last_try_naming_the_service_not_its_address():
    down = ServicesDown([ServiceHealth("Vault", f"http://{ADDRESS}", False, "is unreachable")])
    assert trainer_refusal(down, last_try=False) is None
    message = trainer_refusal(down, last_try=True)
    assert message == "the trainer could not be started: Vault did not answer, up to the task's last try"
    assert ADDRESS not in (message or "")


def test_any_other_runtime_failure_is_retried_and_refused_on_the_last_try_by_its_type_only():
    exc = RuntimeError(f"nothing answers on the trainer network's gateway {ADDRESS}")
    assert trainer_refusal(exc, last_try=False) is None
    assert trainer_refusal(exc, last_try=True) == (
        "the trainer could not be run (RuntimeError), up to the task's last try"
    )


# ------------------------------------------------------------------------ SiteTrainer with a fake storage

RUN = "fed-1"
SETTINGS = Settings(vault_addr="http://127.0.0.1:8200", s3_endpoint="127.0.0.1:8333")
UPDATE_KEY = f"{local_run_id(RUN)}/round-3/site-a.update"


def _trainer(
    runner: Callable[[TrainerRun], None], *, last_try: bool, storage: MemoryStorage | None = None
) -> SiteTrainer:
    storage = storage or MemoryStorage()
    for bucket in (SETTINGS.models_bucket, SETTINGS.staging_bucket):
        storage.ensure_bucket(bucket)
    fake: Any = storage  # the Storage calls SiteTrainer makes, in memory
    vault: Any = None  # never called: the staging these tests use holds no manifest to verify
    return SiteTrainer(
        SETTINGS, fake, vault, partner="site-a", run_id=RUN, round_=2, runner=runner, last_try=last_try
    )


def _raises(exc: BaseException) -> Callable[[TrainerRun], None]:
    def run(req: TrainerRun) -> None:
        raise exc

    return run


def _refusal(call: Callable[[], object]) -> CannotAnswer:
    with pytest.raises(CannotAnswer) as err:
        call()
    return err.value


@pytest.mark.parametrize("last_try", [False, True])
def test_a_security_failure_of_the_trainer_refuses_on_any_try(last_try):
    trainer = _trainer(_raises(_failed(3, "security error: the split's SHA-256 differs")), last_try=last_try)
    refusal = _refusal(trainer._train)
    assert refusal.code == SiteRefusalCode.TRAINER_FAILED.value == "trainer_failed"
    assert refusal.reason() == {
        "code": "trainer_failed",
        "field": "trainer",
        "message": "the trainer exited with code 3 (security failure); its last error: security error",
    }


def test_a_transient_trainer_failure_raises_for_a_retry_then_refuses_on_the_last_try():
    failed = _failed(4, "transient error (a service did not answer; retry): ReadTimeout: x")
    with pytest.raises(TrainerFailed):
        _trainer(_raises(failed), last_try=False)._train()
    down = ServicesDown([ServiceHealth("S3", ADDRESS, False, "is unreachable")])
    with pytest.raises(ServicesDown):
        _trainer(_raises(down), last_try=False)._train()
    refusal = _refusal(_trainer(_raises(down), last_try=True)._train)
    assert refusal.code == "trainer_failed" and "S3 did not answer" in refusal.message


def test_a_trainer_that_writes_no_update_or_an_unreadable_one_is_refused_at_once():
    refusal = _refusal(_trainer(lambda req: None, last_try=False)._train)
    assert refusal.message == "the trainer exited with code 0 but wrote no update"

    storage = MemoryStorage()

    def junk(req: TrainerRun) -> None:
        assert (req.run_id, req.mode, req.round_number) == (local_run_id(RUN), "train", 3)
        storage.put_bytes(SETTINGS.models_bucket, UPDATE_KEY, f"not weights: {SECRET_VALUE}".encode())

    refusal = _refusal(_trainer(junk, last_try=False, storage=storage)._train)
    assert refusal.code == "trainer_failed"
    assert refusal.message.startswith("the trainer's output is not an update (")
    assert SECRET_VALUE not in refusal.message


def test_no_committed_drop_is_refused_as_no_usable_data_before_any_trainer_runs():
    ran: list[TrainerRun] = []
    contract = load_contract("banks")
    job = RoundJob(
        mode="statistics",
        dataset="banks",
        contract=contract.document(),
        contract_sha256=contract.sha256,
        strategy="fedavg",
        rounds=1,
        min_partners=1,
        hparams=TrainerHParams(
            local_epochs=1, local_only_epochs=1, batch_size=16, learning_rate=0.01, seed=1, fedprox_mu=0.0
        ),
    )
    refusal = _refusal(lambda: _trainer(ran.append, last_try=False)(job, None))
    assert refusal.code == SiteRefusalCode.NO_USABLE_DATA.value == "no_usable_data"
    assert refusal.field == "dataset"
    assert refusal.message == (
        "site-a has no verified, committed banks drop under the job's contract "
        "(0 staged, 0 failed verification)"
    )
    assert ran == []


@pytest.mark.parametrize("last_try", [False, True])
def test_a_stale_trainer_image_refuses_at_once_even_when_the_task_wraps_it(last_try):
    """The trainer operator raises a stale image as ``AirflowFailException`` (no retry) from the
    ``StaleImageError``: the site must still refuse at once, or the coordinator waits for the deadline."""
    from lepton_tasks.ops.images import StaleImageError

    try:
        try:
            raise StaleImageError("lepton-trainer:latest was built from other trainer sources")
        except StaleImageError as exc:
            raise RuntimeError("not retried: a retry cannot fix this") from exc
    except RuntimeError as wrapped:
        message = trainer_refusal(wrapped, last_try=last_try)
    assert message is not None and "stale image" in message
    assert "lepton-trainer" not in message  # the refusal names the problem, not the site's image names
