"""Local training with record-level DP: DP-SGD on Poisson batches, the charge it reports, FedProx with it,
refusals, and the trainer passing the job's DP settings through and the charge back."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.messages import DPTraining
from lepton_tasks.core.privacy import epsilon_spent
from lepton_tasks.trainer.local import dp_schedule, evaluate_weights, planned_charge, train_local
from lepton_tasks.trainer.model import build_model
from tests.unit.trainer.test_local import FEATURES, MLP, _separable

DP = DPTraining(noise_multiplier=1.0, l2_clip=1.0, delta=1e-5)


def test_dp_schedule_is_epochs_of_plain_steps_at_rate_b_over_n():
    assert dp_schedule(600, 32, 5) == (32 / 600, 5 * 19)  # ceil(600 / 32) = 19 steps per epoch
    assert dp_schedule(640, 64, 2) == (0.1, 20)
    assert dp_schedule(10, 64, 3) == (1.0, 3)  # a batch larger than the data: every record, every step
    with pytest.raises(ValueError, match="need n >= 1"):
        dp_schedule(0, 32, 1)


def test_planned_charge_is_the_accountants_epsilon():
    c = planned_charge(DPTraining(noise_multiplier=1.1, delta=1e-5), 6400, 64, 100)
    assert (c.sampling_rate, c.steps, c.sampling) == (0.01, 10_000, "poisson")
    assert c.epsilon_this_update == pytest.approx(5.632, abs=1e-3)  # Abadi et al.'s setting (privacy tests)
    assert c.noise_multiplier == 1.1 and c.l2_clip == 1.0 and c.delta == 1e-5


@pytest.mark.slow
def test_training_with_dp_uses_dp_sgd_on_poisson_batches_and_still_learns(monkeypatch):
    from lepton_tasks.trainer import dp_sgd

    seen = {}
    real_model, real_batches = dp_sgd.DPModel, dp_sgd.poisson_batches

    def spy_model(*args, **kwargs):
        seen["model"] = kwargs
        return real_model(*args, **kwargs)

    def spy_batches(*args, **kwargs):
        seen["batches"] = kwargs
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(dp_sgd, "DPModel", spy_model)
    monkeypatch.setattr(dp_sgd, "poisson_batches", spy_batches)
    n, b, epochs = 600, 32, 5
    result = train_local(
        _separable(n),
        MLP,
        FEATURES,
        epochs=epochs,
        batch_size=b,
        learning_rate=1e-2,
        seed=0,
        dp=DP,
        dp_seed=3,
    )
    charge = result.privacy
    assert charge is not None and charge.sampling == "poisson"
    assert charge.sampling_rate == pytest.approx(b / n)
    # the same optimizer steps as plain training (epochs x ceil(N/B)), which is epochs/q = ceil(epochs·N/B)
    # up to one step per epoch; the model ran exactly that many (train_local checks optimizer.iterations)
    assert charge.steps == epochs * math.ceil(n / b) == 95
    assert abs(charge.steps - math.ceil(epochs * n / b)) <= epochs
    assert charge.epsilon_this_update == pytest.approx(epsilon_spent(1.0, b / n, 95, 1e-5))
    assert seen["model"]["noise_multiplier"] == 1.0 and seen["model"]["l2_clip"] == 1.0
    assert seen["model"]["expected_batch_size"] == pytest.approx(b)  # q·N, never the drawn batch's size
    assert seen["batches"]["sampling_rate"] == pytest.approx(b / n)
    assert len(result.history["loss"]) == epochs
    assert result.metrics["auc"] > 0.95
    assert evaluate_weights(_separable(seed=1), MLP, FEATURES, result.weights)["auc"] > 0.95


@pytest.mark.slow
def test_without_dp_nothing_changes():
    frame = _separable(200)
    a = train_local(frame, MLP, FEATURES, epochs=2, batch_size=32, learning_rate=1e-2, seed=5)
    b = train_local(frame, MLP, FEATURES, epochs=2, batch_size=32, learning_rate=1e-2, seed=5, dp=None)
    assert a.privacy is None and b.privacy is None
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))


@pytest.mark.slow
def test_dp_noise_is_secret_not_derived_from_the_job_seed():
    frame = _separable(200)
    kw = {"epochs": 1, "batch_size": 32, "learning_rate": 1e-2, "seed": 5, "dp": DP}
    a, b = train_local(frame, MLP, FEATURES, **kw), train_local(frame, MLP, FEATURES, **kw)
    assert not all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    c, d = (train_local(frame, MLP, FEATURES, dp_seed=9, **kw) for _ in range(2))  # tests only
    assert all(np.array_equal(x, y) for x, y in zip(c.weights, d.weights, strict=True))


@pytest.mark.slow
def test_fedprox_composes_with_dp():
    frame = _separable(320)
    start = build_model(MLP, 3, seed=11).get_weights()
    kw = {"global_weights": start, "epochs": 3, "batch_size": 32, "learning_rate": 1e-2, "seed": 0, "dp": DP}
    free = train_local(frame, MLP, FEATURES, fedprox_mu=0.0, dp_seed=1, **kw)
    held = train_local(frame, MLP, FEATURES, fedprox_mu=1e4, dp_seed=1, **kw)
    assert held.metrics["update_norm"] < 0.2 * free.metrics["update_norm"]
    assert held.history["loss"][0] > free.history["loss"][0]  # the proximal term is in the reported loss
    assert held.privacy == free.privacy  # the proximal term touches weights only: the charge is the same


@pytest.mark.slow
def test_zero_epochs_with_dp_charges_nothing():
    r = train_local(_separable(100), MLP, FEATURES, epochs=0, dp=DP)
    assert r.privacy is not None and r.privacy.steps == 0 and r.privacy.epsilon_this_update == 0.0


@pytest.mark.slow
def test_dp_refuses_data_dependent_class_weights_but_takes_fixed_ones():
    frame = _separable(200)
    with pytest.raises(ValueError, match=r"balanced.*not differentially private"):
        train_local(frame, MLP, FEATURES, epochs=1, class_weight="balanced", dp=DP)
    r = train_local(frame, MLP, FEATURES, epochs=1, class_weight={0: 1.0, 1: 3.0}, dp=DP)
    assert r.privacy is not None and r.metrics["class_weight"] == {0: 1.0, 1: 3.0}


@pytest.mark.slow
def test_the_trainer_passes_the_jobs_dp_settings_and_puts_the_charge_in_the_update(monkeypatch):
    """``run_job`` end to end with the network and the frames faked: train and local-only modes."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.messages import LocalModelMeta, TrainerJob, UpdateMeta, load
    from lepton_tasks.ingest.clean import coerce_types
    from lepton_tasks.trainer import __main__ as trainer
    from tests.unit.core.test_messages import _job

    contract = load_contract("banks")
    rng = np.random.default_rng(0)
    n = 300
    balance = rng.uniform(0, 2500, n)
    raw = pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "student": rng.choice(["No", "Yes"], n),
            "balance": balance,
            "income": rng.uniform(1e4, 7e4, n),
            "default": np.where(balance + rng.normal(0, 300, n) > 1800, "Yes", "No"),
        }
    )
    frame = coerce_types(raw, contract, object_key="banks/x.csv")  # a staged split, decrypted
    stats = SufficientStats.from_frame(frame, contract)
    put = {}
    monkeypatch.setattr(trainer, "_fetch", lambda url: stats.model_dump_json().encode())
    monkeypatch.setattr(trainer, "load_partner_frames", lambda job, work: (frame, frame.iloc[:60], ["h"]))
    monkeypatch.setattr(trainer, "_put", lambda url, data, ctype: put.update(data=data))
    hp = {**_job()["hparams"], "local_epochs": 1, "local_only_epochs": 2, "dp": {"noise_multiplier": 1.3}}
    job = load(TrainerJob, _job(round=1, hparams=hp), where="t")
    trainer.run_job(job)
    _, meta = wio.loads(put["data"])
    update = load(UpdateMeta, meta, where="update")
    q, steps = dp_schedule(n, 64, 1)
    assert update.privacy is not None
    got = update.privacy
    assert (got.noise_multiplier, got.sampling_rate, got.steps, got.sampling) == (1.3, q, steps, "poisson")
    assert update.privacy.epsilon_this_update == pytest.approx(epsilon_spent(1.3, q, steps, 1e-5))
    assert "notes" not in update.metrics  # numbers only in an update's metrics

    trainer.run_job(load(TrainerJob, _job(mode="local", round=0, hparams=hp), where="t"))
    local = load(LocalModelMeta, wio.loads(put["data"])[1], where="local")
    assert local.privacy is not None and local.privacy.steps == 2 * math.ceil(n / 64)

    no_dp = {k: v for k, v in hp.items() if k != "dp"}
    trainer.run_job(load(TrainerJob, _job(round=1, hparams=no_dp), where="t"))
    assert load(UpdateMeta, wio.loads(put["data"])[1], where="update").privacy is None


@pytest.mark.slow
def test_sequence_models_train_with_dp_through_the_jacobian_path():
    """The GRU's per-example gradients come from ``tape.jacobian`` (pfor cannot vectorize its loop)."""
    from tests.unit.trainer.test_local import SEQ, _event_log

    frame = _event_log(users=10, events=4, seed=0)
    r = train_local(frame, SEQ, ["price"], epochs=1, batch_size=16, learning_rate=1e-2, dp=DP, dp_seed=0)
    assert r.privacy is not None and r.privacy.steps == math.ceil(len(frame) / 16)
    assert r.privacy.sampling_rate == pytest.approx(16 / len(frame))
    assert all(np.isfinite(w).all() for w in r.weights)
