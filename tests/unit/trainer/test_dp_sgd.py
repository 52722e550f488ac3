"""DP-SGD step: plain SGD without clipping or noise, each example clipped like a hand computation, noise of
the right scale from a secret generator, and training that still learns at moderate noise."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from sklearn.metrics import roc_auc_score

from lepton_tasks.trainer import dp_sgd

MSE = keras.losses.MeanSquaredError()


def _linear(n_features: int, seed: int = 0) -> keras.Model:
    inputs = keras.Input((n_features,), name="features")
    out = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="linear"
    )(inputs)
    return keras.Model(inputs, out)


def _mlp(n_features: int, seed: int = 0) -> keras.Model:
    inputs = keras.Input((n_features,), name="features")
    h = keras.layers.Dense(
        8, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=seed)
    )(inputs)
    out = keras.layers.Dense(
        1, activation="sigmoid", kernel_initializer=keras.initializers.GlorotUniform(seed=1)
    )(h)
    return keras.Model(inputs, out)


def _data(n: int, f: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype("float32")
    y = (x @ rng.normal(size=f) + 0.5 * rng.normal(size=n) > 0).astype("float32")
    return x, y


@pytest.mark.parametrize("method", ["vectorized", "jacobian"])
def test_without_noise_and_with_a_huge_clip_the_step_is_plain_sgd(method):
    x, y = _data(32, 5)
    plain, inner = _mlp(5), _mlp(5)
    inner.set_weights(plain.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.BinaryCrossentropy())
    dp = dp_sgd.DPModel(inner, l2_clip=1e6, noise_multiplier=0.0, expected_batch_size=32, method=method)
    dp.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.BinaryCrossentropy())
    plain.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    dp.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), inner.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(dp.optimizer.iterations) == 1
    assert len(dp.get_weights()) == len(inner.get_weights())  # the noise generator is not a weight


def test_each_example_is_clipped_like_the_hand_computation():
    x, y = _data(6, 3, seed=1)
    weights = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0], dtype="float32")
    model = _linear(3)
    w, b = (v.astype(np.float64) for v in model.get_weights())
    # by hand: MSE of one example is r^2, r = x*w + b - y, so grad w = 2r*x, grad b = 2r, times its weight
    r = (x @ w + b).ravel() - y
    per_example = np.concatenate([2 * r[:, None] * x, 2 * r[:, None]], axis=1) * weights[:, None]
    norms = np.linalg.norm(per_example, axis=1)
    clip = 0.05
    assert (norms > clip).all()  # every example is clipped
    clipped = per_example * np.minimum(1.0, clip / norms)[:, None]
    expected = clipped.sum(axis=0) / 4.0

    grads, losses, _, got_norms = dp_sgd.dp_gradients(
        model,
        x,
        y,
        MSE.call,
        l2_clip=clip,
        noise_multiplier=0.0,
        expected_batch_size=4.0,  # the fixed denominator, not the 6 examples of this batch
        generator=dp_sgd.noise_generator(0),
        sample_weight=weights,
        method="vectorized",
    )
    np.testing.assert_allclose(got_norms.numpy(), norms, rtol=1e-5)
    np.testing.assert_allclose(losses.numpy(), r**2 * weights, rtol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([g.numpy().ravel() for g in grads]), expected, rtol=1e-5, atol=1e-7
    )

    # a clip between the norms clips only the examples above it; one above every norm changes nothing
    for clip in (0.5, 1e9):
        parts = [tf.constant(per_example[:, :3], tf.float32), tf.constant(per_example[:, 3:], tf.float32)]
        summed, _ = dp_sgd.clip_and_sum(parts, clip)
        expected = (per_example * np.minimum(1.0, clip / norms)[:, None]).sum(axis=0)
        np.testing.assert_allclose(np.concatenate([s.numpy() for s in summed]), expected, rtol=1e-5)


def test_vectorized_and_jacobian_per_example_gradients_agree():
    x, y = _data(8, 4, seed=2)
    model = _mlp(4)
    a, la, _ = dp_sgd.per_example_gradients(
        model, x, y, keras.losses.BinaryCrossentropy().call, method="vectorized"
    )
    b, lb, _ = dp_sgd.per_example_gradients(
        model, x, y, keras.losses.BinaryCrossentropy().call, method="jacobian"
    )
    np.testing.assert_allclose(la.numpy(), lb.numpy(), rtol=1e-5)
    for ga, gb in zip(a, b, strict=True):
        np.testing.assert_allclose(ga.numpy(), gb.numpy(), rtol=1e-4, atol=1e-6)


def test_noise_has_std_sigma_times_clip_over_the_batch_size():
    x, y = _data(8, 4000, seed=3)
    model = _linear(4000)
    sigma, clip, batch = 2.0, 0.5, 8.0
    common = {"l2_clip": clip, "expected_batch_size": batch, "method": "vectorized"}
    quiet, *_ = dp_sgd.dp_gradients(
        model, x, y, MSE.call, noise_multiplier=0.0, generator=dp_sgd.noise_generator(0), **common
    )
    noisy, *_ = dp_sgd.dp_gradients(
        model, x, y, MSE.call, noise_multiplier=sigma, generator=dp_sgd.noise_generator(1234), **common
    )
    noise = np.concatenate([(n - q).numpy().ravel() for n, q in zip(noisy, quiet, strict=True)]).astype(
        np.float64
    )
    expected_std = sigma * clip / batch
    assert noise.size == 4001
    assert noise.std() == pytest.approx(expected_std, rel=0.05)  # ~1.1% standard error on 4001 draws
    assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)
    assert stats.kstest(noise / expected_std, "norm").pvalue > 0.01


def test_noise_is_not_derived_from_the_global_seed():
    # the job's seed comes from the coordinator: noise it could regenerate would protect nothing
    draws = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        draws.append(dp_sgd.noise_generator().normal([16]).numpy())
    assert not np.allclose(draws[0], draws[1])
    np.testing.assert_array_equal(
        dp_sgd.noise_generator(5).normal([4]).numpy(), dp_sgd.noise_generator(5).normal([4]).numpy()
    )


@pytest.mark.slow
def test_training_with_dp_on_poisson_batches_still_learns():
    keras.utils.set_random_seed(0)
    x, y = _data(2000, 10, seed=4)
    batches = dp_sgd.poisson_batches(x, y, sampling_rate=64 / 2000, seed=0)
    dp = dp_sgd.DPModel(_mlp(10), l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=64, noise_seed=0)
    dp.compile(optimizer=keras.optimizers.Adam(0.02), loss=keras.losses.BinaryCrossentropy())
    dp.fit(batches, epochs=2, shuffle=False, verbose=0)
    assert int(dp.optimizer.iterations) == 2 * len(batches) == 2 * 31
    p = dp.predict(x, batch_size=512, verbose=0).ravel()
    assert roc_auc_score(y, p) > 0.7


def test_poisson_batches_draw_each_record_independently_and_afresh_every_epoch():
    x = {"a": np.arange(1000), "b": np.arange(1000) * 2}
    w = np.arange(1000, dtype="float32")
    batches = dp_sgd.poisson_batches(x, np.zeros(1000), w, sampling_rate=0.05, seed=1)
    assert len(batches) == 20
    epochs = [[(xb, wb.numpy()) for xb, _, wb in batches] for _ in range(10)]
    sizes = [len(wb) for epoch in epochs for _, wb in epoch]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # variable size: not fixed-size batches
    assert not np.array_equal(epochs[0][0][1], epochs[1][0][1])  # a new draw, not the first epoch replayed
    xb, wb = epochs[0][0]
    np.testing.assert_array_equal(xb["b"].numpy(), xb["a"].numpy() * 2)  # the same records from every input
    np.testing.assert_array_equal(wb, xb["a"].numpy())


def test_refuses_models_and_settings_that_break_the_guarantee():
    inputs = keras.Input((3,))
    bn = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.BatchNormalization()(inputs)))
    with pytest.raises(ValueError, match="BatchNormalization"):
        dp_sgd.DPModel(bn, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=8)
    act = keras.Model(inputs, keras.layers.Dense(1, activity_regularizer="l2")(inputs))
    with pytest.raises(ValueError, match="activity regularizer"):
        dp_sgd.check_model(act)
    with pytest.raises(ValueError, match="l2_clip"):
        dp_sgd.DPModel(_linear(3), l2_clip=0.0, noise_multiplier=1.0, expected_batch_size=8)
    with pytest.raises(ValueError, match="one loss"):
        dp_sgd.per_example_loss_fn({"a": "mse"})


def test_auto_method_uses_the_jacobian_for_recurrent_models():
    items = keras.Input((4, 2))
    gru = keras.Model(items, keras.layers.Dense(1)(keras.layers.GRU(3)(items)))
    assert dp_sgd.choose_method(gru) == "jacobian"
    assert dp_sgd.choose_method(_mlp(3)) == "vectorized"


@pytest.mark.slow
def test_the_contract_sequence_model_trains_with_exact_per_example_gradients():
    from lepton_tasks.core.contracts import ModelSpec
    from lepton_tasks.trainer.model import build_model

    spec = ModelSpec(
        kind="sequence",
        hidden=[4],
        user_column="u",
        item_column="i",
        timestamp_column="t",
        sequence_length=3,
        hash_buckets=20,
        embedding_dim=2,
        gru_units=3,
    )
    model = build_model(spec, 2, seed=0)
    rng = np.random.default_rng(5)
    n = 6
    items = rng.integers(1, 20, (n, 3)).astype("int32")
    items[0, 2] = items[1, 1:] = 0  # right padding, as data.to_model_inputs builds it
    x = {
        "items": items,
        "features": rng.random((n, 3, 4)).astype("float32"),
        "item": rng.integers(1, 20, n).astype("int32"),
        "user": rng.integers(1, 20, n).astype("int32"),
    }
    y = (rng.random(n) > 0.5).astype("float32")
    bce = keras.losses.BinaryCrossentropy()
    assert dp_sgd.choose_method(model) == "jacobian"
    grads, _, _ = dp_sgd.per_example_gradients(model, x, y, bce.call)
    for i in range(n):  # one example at a time, by the plain tape
        with tf.GradientTape() as tape:
            xi = {k: v[i : i + 1] for k, v in x.items()}
            loss = tf.reduce_sum(bce.call(y[i : i + 1, None], model(xi, training=True)))
        for g, v, ref in zip(
            grads, model.trainable_variables, tape.gradient(loss, model.trainable_variables), strict=True
        ):
            np.testing.assert_allclose(
                g[i].numpy(), tf.convert_to_tensor(ref).numpy(), atol=1e-6, err_msg=v.path
            )

    before = [w.copy() for w in model.get_weights()]
    dp = dp_sgd.DPModel(model, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=3, noise_seed=0)
    # eagerly: tracing the jacobian of the GRU's while loop in graph mode costs ~15 s of CPU, once per process
    dp.compile(optimizer=keras.optimizers.Adam(0.01), loss=bce, run_eagerly=True)
    dp.fit(x, y, batch_size=3, epochs=1, verbose=0)
    after = model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
