"""One partner's local training step of a federated round (and evaluation/prediction with given weights).

:func:`train_local` builds the contract's model, loads the current global weights, trains with Adam on the
partner's model-ready frame and returns the new weights, the sample count (the FedAvg weight) and metrics
computed on the training data after training.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds the proximal term
``mu/2 · Σ ||w − w_global||²`` over every trainable weight to the local loss, which keeps partners with
very different data from drifting far from the global model. It is added in
:meth:`_ProximalModel.compute_loss` (Keras' documented override point), against constants holding the
global weights, so it is part of the gradient and of the reported training loss. ``mu = 0`` is FedAvg.

Record-level differential privacy (``dp=``, a :class:`~lepton_tasks.core.messages.DPTraining`): DP-SGD
(:class:`lepton_tasks.trainer.dp_sgd.DPModel`: each example's gradient clipped to ``l2_clip``, Gaussian noise
of std ``noise_multiplier x l2_clip`` on the batch sum) on Poisson-sampled batches
(:func:`~lepton_tasks.trainer.dp_sgd.poisson_batches`, sampling rate ``q = batch_size / N``), for the same
number of optimizer steps as plain training: ``epochs x ceil(N / batch_size)``. The result carries the charge
(:func:`lepton_tasks.core.privacy.planned_charge`, which the site also computes before it trains: sigma, q,
steps, ``sampling="poisson"`` and the epsilon of this training alone, RDP accountant). FedProx composes: its
proximal term depends on the weights only, so it is added after the noise, unclipped
(``DPModel(extra_loss=...)``), as are the model's L2 weight regularizers. The noise and the batch draws come
from :mod:`secrets`, never from ``seed`` (the coordinator knows the seed and could regenerate the noise): DP
training is not reproducible, by design. ``class_weight="balanced"`` is refused under DP (its weights are
computed from the private labels); a fixed ``{0: w0, 1: w1}`` is fine.

Sequence (GRU) models train under DP through ``dp_sgd``'s ``jacobian`` per-example path (TF's pfor cannot
vectorize the GRU's loop). It is exact but costly: the ecommerce contract's model (5,000 x 16 embeddings,
GRU 32, L = 10) at B = 128 on a loaded 2-core CPU took ~1.3 s per step against ~0.1 s plain (~11x), plus
35-80 s of one-time graph tracing per trainer process; a 4,000-row partner's epoch took 2 min against 18 s.
Fine at demo sizes; for millions of events per partner, give its trainer a GPU or expect hours per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd

from lepton_tasks.core import metrics as evaluate
from lepton_tasks.core.contracts import ModelSpec
from lepton_tasks.core.messages import DPTraining, PrivacyCharge
from lepton_tasks.core.privacy import dp_schedule as dp_schedule  # re-exported: the schedule of a DP training
from lepton_tasks.core.privacy import planned_charge
from lepton_tasks.trainer import data
from lepton_tasks.trainer.model import build_model, configure_devices, set_determinism

PREDICT_BATCH = 4096


@dataclass
class LocalResult:
    """What a partner's trainer returns for one round."""

    #: the model's weights after training, in ``model.get_weights()`` order
    weights: list[np.ndarray]
    #: training examples seen (the FedAvg weight of this update)
    n_samples: int
    #: metrics on the training data after training: ``loss`` (= ``log_loss``), ``auc``, ``pr_auc``,
    #: ``accuracy``, ``n``, ``positives``, ``positive_rate``, ``notes``, plus ``epochs``, ``train_seconds``,
    #: ``fedprox_mu``, ``class_weight`` and ``update_norm`` (L2 norm of weights − global weights, or None
    #: without global weights)
    metrics: dict[str, Any]
    #: per-epoch Keras history (``loss`` includes the FedProx term and class weighting)
    history: dict[str, list[float]] = field(default_factory=dict)
    #: the DP-SGD charge of this training (``dp=`` given), else None
    privacy: PrivacyCharge | None = None


def proximal_term(variables: Sequence[Any], anchors: Sequence[Any], mu: float):
    """``mu/2 · Σ_i ||variables[i] − anchors[i]||²`` as a backend tensor."""
    if len(variables) != len(anchors):
        raise ValueError(f"{len(variables)} variables but {len(anchors)} anchors")
    total = keras.ops.zeros((), dtype="float32")
    for v, a in zip(variables, anchors, strict=True):
        total = total + keras.ops.sum(keras.ops.square(keras.ops.cast(v, "float32") - a))
    return (0.5 * float(mu)) * total


class _ProximalModel(keras.Model):
    """Wraps a built model; adds the FedProx term to the training loss (not to evaluation losses)."""

    def __init__(self, inner: keras.Model, mu: float, **kwargs):
        super().__init__(name=f"{inner.name}_prox", **kwargs)
        self.inner = inner
        self.mu = float(mu)
        # snapshot of the global weights: constants, so no gradient flows into them
        self._anchors = [
            keras.ops.convert_to_tensor(v.numpy(), dtype="float32") for v in inner.trainable_variables
        ]

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        if training and self.mu > 0 and loss is not None:
            loss = loss + proximal_term(self.inner.trainable_variables, self._anchors, self.mu)
        return loss


def _class_weights(y: np.ndarray, mode: str | Mapping[int, float] | None) -> dict[int, float] | None:
    if mode is None:
        return None
    if isinstance(mode, Mapping):
        return {int(k): float(v) for k, v in mode.items()}
    if mode != "balanced":
        raise ValueError(f"class_weight must be None, 'balanced' or a {{0: w0, 1: w1}} dict, got {mode!r}")
    n = len(y)
    pos = int(y.sum())
    if pos == 0 or pos == n:
        return None  # one class: nothing to balance
    return {0: n / (2.0 * (n - pos)), 1: n / (2.0 * pos)}


def _set_weights(model: keras.Model, weights: Sequence[np.ndarray]) -> None:
    expected = [tuple(w.shape) for w in model.get_weights()]
    got = [tuple(np.shape(w)) for w in weights]
    if expected != got:
        raise ValueError(
            f"weights do not fit this model: expected {len(expected)} arrays {expected[:4]}…, "
            f"got {len(got)} arrays {got[:4]}… (different contract version or model spec?)"
        )
    model.set_weights([np.asarray(w, dtype=np.float32) for w in weights])


def _predict(model: keras.Model, x: data.ModelX, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    # direct batched calls: model.predict would trace a new tf.function for every freshly built model
    n = data.n_rows(x)
    out = []
    for start in range(0, n, batch_size):
        batch = (
            {k: v[start : start + batch_size] for k, v in x.items()}
            if isinstance(x, dict)
            else x[start : start + batch_size]
        )
        out.append(keras.ops.convert_to_numpy(model(batch, training=False)).reshape(-1))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _metrics(y: np.ndarray | None, p: np.ndarray) -> dict[str, Any]:
    if y is None:
        raise ValueError("the frame has no 'label' column: cannot compute metrics")
    m = evaluate.binary_metrics(y, p)
    m["loss"] = m["log_loss"]
    return m


def _fit_dp(
    inner: keras.Model,
    x: data.ModelX,
    y: np.ndarray,
    dp: DPTraining,
    charge: PrivacyCharge,
    *,
    n: int,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    seed: int,
    fedprox_mu: float,
    weights_by_class: dict[int, float] | None,
    dp_seed: int | None,
    verbose: int,
) -> dict[str, list[float]]:
    """DP-SGD on Poisson batches for exactly ``charge.steps`` steps; returns the per-epoch history."""
    from lepton_tasks.trainer.dp_sgd import DPModel, poisson_batches

    extra_loss = None
    if fedprox_mu > 0:
        anchors = [keras.ops.convert_to_tensor(v.numpy(), dtype="float32") for v in inner.trainable_variables]

        def extra_loss():  # weights only, never data: added after the noise, unclipped
            return proximal_term(inner.trainable_variables, anchors, fedprox_mu)

    model = DPModel(
        inner,
        l2_clip=dp.l2_clip,
        noise_multiplier=dp.noise_multiplier,
        expected_batch_size=charge.sampling_rate * n,
        noise_seed=dp_seed,
        extra_loss=extra_loss,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        jit_compile=False,
    )
    sample_weight = None
    if weights_by_class is not None:  # fixed weights only (see train_local): part of each example's loss
        sample_weight = np.where(y > 0, weights_by_class.get(1, 1.0), weights_by_class.get(0, 1.0))
        sample_weight = sample_weight.astype(np.float32)
    batches = poisson_batches(
        x,
        y.astype(np.float32),
        sample_weight,
        sampling_rate=charge.sampling_rate,
        steps_per_epoch=charge.steps // epochs,
        seed=dp_seed,
    )
    keras.utils.set_random_seed(int(seed))  # dropout masks (the noise and the draws are secret)
    h = model.fit(batches, epochs=int(epochs), shuffle=False, verbose=verbose)
    done = int(model.optimizer.iterations)
    if done != charge.steps:  # the charge must describe what ran
        raise RuntimeError(f"DP-SGD ran {done} steps, but the charge says {charge.steps}")
    return {k: [float(v) for v in vals] for k, vals in h.history.items()}


def train_local(
    frame: pd.DataFrame,
    spec: ModelSpec,
    feature_names: Sequence[str],
    *,
    global_weights: Sequence[np.ndarray] | None = None,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    fedprox_mu: float = 0.0,
    class_weight: str | Mapping[int, float] | None = None,
    tie_break: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    verbose: int = 0,
    dp: DPTraining | None = None,
    dp_seed: int | None = None,
) -> LocalResult:
    """Train the model of ``spec`` on one partner's model-ready ``frame``, starting from ``global_weights``.

    ``global_weights`` ``None`` starts from the seeded initialization (round 1 of a federation should instead
    pass the one initial global model every partner shares). ``epochs=0`` trains nothing (metrics of the
    given weights). ``class_weight="balanced"`` reweights classes to equal total weight; it does not change
    AUC much but makes probabilities uncalibrated (log-loss/accuracy worse) and makes partners optimize
    different objectives, so the default is ``None``. Same inputs and seed → same weights (on CPU), except
    under ``dp`` (DP-SGD, see the module docstring), whose noise is secret. ``dp_seed`` seeds that noise and
    the Poisson draws: tests only (whoever knows it can subtract the noise).
    """
    if epochs < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            "need epochs >= 0, batch_size >= 1, learning_rate > 0 "
            f"(got {epochs}, {batch_size}, {learning_rate})"
        )
    if not (fedprox_mu >= 0 and math.isfinite(fedprox_mu)):
        raise ValueError(f"fedprox_mu must be a finite number >= 0, got {fedprox_mu}")
    if dp is not None and class_weight == "balanced":
        raise ValueError(
            "class_weight='balanced' is not differentially private (its weights are computed from the "
            "private labels): give fixed weights {0: w0, 1: w1} or None"
        )
    started = time.perf_counter()
    x, y = data.to_model_inputs(frame, spec, feature_names, tie_break=tie_break, targets=targets)
    if y is None:
        raise ValueError("the training frame has no 'label' column")
    n = data.n_rows(x)
    if n == 0:
        raise ValueError("the training frame is empty: exclude this partner from the round instead")

    configure_devices()
    keras.backend.clear_session()
    set_determinism(seed)
    inner = build_model(spec, len(feature_names), seed)
    if global_weights is not None:
        _set_weights(inner, global_weights)
    anchor = [w.copy() for w in inner.get_weights()] if global_weights is not None else None
    weights_by_class = _class_weights(y, class_weight)
    history: dict[str, list[float]] = {}
    privacy = None
    if dp is not None:
        privacy = planned_charge(dp, n, batch_size, epochs)
        if epochs > 0:
            history = _fit_dp(
                inner,
                x,
                y,
                dp,
                privacy,
                n=n,
                batch_size=batch_size,
                epochs=epochs,
                learning_rate=learning_rate,
                seed=seed,
                fedprox_mu=fedprox_mu,
                weights_by_class=weights_by_class,
                dp_seed=dp_seed,
                verbose=verbose,
            )
    elif epochs > 0:
        model = _ProximalModel(inner, fedprox_mu)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            jit_compile=False,
        )
        keras.utils.set_random_seed(int(seed))  # the shuffling order
        h = model.fit(
            x,
            y,
            epochs=int(epochs),
            batch_size=int(batch_size),
            shuffle=True,
            class_weight=weights_by_class,
            verbose=verbose,
        )
        history = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    weights = inner.get_weights()
    metrics = _metrics(y, _predict(inner, x))
    metrics.update(
        epochs=int(epochs),
        train_seconds=round(time.perf_counter() - started, 3),
        fedprox_mu=float(fedprox_mu),
        class_weight=class_weight
        if isinstance(class_weight, (str, type(None)))
        else dict(weights_by_class or {}),
        update_norm=(
            float(math.sqrt(sum(float(np.sum((w - a) ** 2)) for w, a in zip(weights, anchor, strict=True))))
            if anchor is not None
            else None
        ),
    )
    return LocalResult(weights=weights, n_samples=n, metrics=metrics, history=history, privacy=privacy)


def predict(
    frame: pd.DataFrame,
    spec: ModelSpec,
    feature_names: Sequence[str],
    weights: Sequence[np.ndarray],
    *,
    tie_break: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    batch_size: int = PREDICT_BATCH,
) -> np.ndarray:
    """Predicted probabilities (float32, in frame order) of the model with ``weights``: one per frame row, or
    one per ``targets`` row (see :func:`lepton_tasks.trainer.data.to_model_inputs`)."""
    x, _ = data.to_model_inputs(frame, spec, feature_names, tie_break=tie_break, targets=targets)
    configure_devices()
    keras.backend.clear_session()
    model = build_model(spec, len(feature_names), seed=0)
    _set_weights(model, weights)
    return _predict(model, x, batch_size)


def evaluate_weights(
    frame: pd.DataFrame,
    spec: ModelSpec,
    feature_names: Sequence[str],
    weights: Sequence[np.ndarray],
    *,
    tie_break: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    with_summary: bool = False,
) -> dict[str, Any]:
    """:func:`lepton_tasks.core.metrics.binary_metrics` of the model with ``weights`` on ``frame``
    (+ ``loss``).

    ``with_summary=True`` adds ``score_summary`` (:func:`lepton_tasks.core.metrics.score_summary`), the
    aggregate a partner can share so the operator computes an exact overall AUC without seeing predictions.
    For sequence models pass the whole event log with ``targets=holdout_mask`` so held-out events keep their
    full history.
    """
    y = data.labels(frame)
    if y is not None and targets is not None:
        y = y[data.target_mask(targets, len(frame))]
    p = predict(frame, spec, feature_names, weights, tie_break=tie_break, targets=targets)
    m = _metrics(y, p)
    if with_summary:
        if y is None:
            raise ValueError("a score summary needs labels: this frame has no label column")
        m["score_summary"] = evaluate.score_summary(y, p)
    return m
