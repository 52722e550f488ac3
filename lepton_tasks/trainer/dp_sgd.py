"""Record-level differential privacy at the site: DP-SGD (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016, arXiv:1607.00133) for the Keras models of :mod:`lepton_tasks.trainer.model`.

One step on a batch b: ``g = (sum_i clip_C(grad loss_i) + N(0, (sigma*C)^2 I)) / B``, then
``optimizer.apply_gradients``, where ``clip_C(v) = v * min(1, C / ||v||_2)`` and the norm is taken over ALL
trainable variables together: one example moves the sum by at most C in L2, so noise of std sigma*C is the
Gaussian mechanism with noise multiplier sigma. Any optimizer works (DP-Adam post-processes the noisy
gradient).

Why not TensorFlow Privacy: its last release (0.9.0) requires numpy~=1.21, packaging~=22.0, absl-py==1.*,
dp-accounting==0.4.3, tensorflow-probability~=0.22 (built for TF 2.14), tensorflow-estimator (gone since TF
2.16) and ``tensorflow`` rather than ``tensorflow_cpu``. ``pip install --dry-run`` against our pins wants
to downgrade numpy 2.4.6 -> 1.26.4 (pandas 3 and TF 2.21 need numpy 2), packaging and absl-py, and to add a
second full TensorFlow; its Keras optimizers target Keras 2 (tf.keras before TF 2.16), we run Keras 3. So the
step is written here: per-example gradients, clipping and noise are a few vectorized ops.

Choices, and why:

- Per-example gradients. ``method="vectorized"``: ``tf.vectorized_map`` of a batch-of-one forward and
  backward, linear in the batch size (see bench/privacy for its cost against a plain Keras epoch). TF's pfor
  cannot convert the gradient of the ``while`` loop in Keras' GRU, so ``method="jacobian"`` runs one batched
  forward and ``tape.jacobian(per_example_losses, variables)`` (pfor over the backward pass only): it handles
  the sequence model but costs O(B^2) in dense layers. ``"auto"`` picks ``jacobian`` iff the model has a
  recurrent layer. Dropout under ``vectorized``: the seed is loop-invariant, so every example of a batch gets
  the same mask (still an unbiased dropout gradient, a noisier one; the mask is data-independent, privacy is
  unchanged); ``jacobian`` keeps Keras' per-example masks. BatchNormalization mixes the examples of a batch,
  which breaks the per-example bound, and activity regularizers are data-dependent losses outside the clipped
  sum: both are refused.
- Denominator: the fixed expected batch size ``B = q*N``, never the actual one. Under Poisson sampling the
  actual size depends on the data (adding a record changes it); the analysis (Abadi et al.; Mironov, Talwar &
  Zhang 2019, arXiv:1908.10530) releases the noisy sum, and dividing by a constant is post-processing. With
  shuffled fixed-size batches both agree, except that a short last batch takes a smaller step.
- Sampling. :func:`poisson_batches` includes every record independently with probability q at each step: what
  the RDP accountant of :mod:`lepton_tasks.core.privacy` (PoissonSampledDpEvent) analyses. ``model.fit(x, y,
  batch_size=B, shuffle=True)`` draws shuffled fixed-size batches instead; accounting those as Poisson with
  q = B/N is common practice, NOT a proof: Chua et al. ("How Private are DP-SGD Implementations?", ICML 2024)
  show the real eps of shuffling can be larger. The ledger records which sampling a charge used.
- Secret noise. The job's seed comes from the coordinator, which could regenerate and subtract noise seeded
  from it (or from Keras' global seed). Noise and Poisson draws take their state from :mod:`secrets` unless a
  seed is given (tests only). Philox is not a cryptographic generator, and floating-point Gaussian samples are
  not the ideal distribution (Mironov 2012; Holohan & Braghin 2021): those side channels are not addressed.
- Data-independent terms (the model's weight regularizers, the FedProx term via ``extra_loss``) depend on the
  weights only: their gradient is added after the noise, unclipped.

Float32, one output and one loss (the Lepton models). Per-example gradients of embeddings are materialized
densely (B x buckets x dim floats per step): fine for Lepton's ~1000-bucket tables.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Literal

import keras
import tensorflow as tf

Method = Literal["auto", "vectorized", "jacobian"]
PerExampleLoss = Callable[[Any, Any], Any]


def _fill(grads: Sequence[Any], variables: Sequence[Any], lead: Sequence[Any] = ()) -> list[tf.Tensor]:
    """Zeros for unconnected variables (``UnconnectedGradients.ZERO`` chokes on Keras 3's string dtypes)."""
    return [
        tf.zeros([*lead, *v.shape], tf.float32) if g is None else tf.convert_to_tensor(g)
        for g, v in zip(grads, variables, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ checks


def _all_layers(model: keras.Layer) -> list[keras.Layer]:
    out: list[keras.Layer] = []
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        out.append(layer)
        stack.extend(getattr(layer, "layers", []))
        for attr in ("forward_layer", "backward_layer", "layer"):  # Bidirectional, TimeDistributed, wrappers
            inner = getattr(layer, attr, None)
            if isinstance(inner, keras.Layer):
                stack.append(inner)
    return out


def check_model(model: keras.Model) -> None:
    """Raise ``ValueError`` for layers that break the per-example sensitivity bound of DP-SGD."""
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            raise ValueError(
                f"layer {layer.name!r} is BatchNormalization: it mixes examples of a batch, so one example's "
                "gradient is not bounded by the per-example clip (use LayerNormalization or none)"
            )
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"layer {layer.name!r} has an activity regularizer: a data-dependent loss outside the "
                "clipped per-example sum is not differentially private"
            )


def choose_method(model: keras.Model, method: Method = "auto") -> Literal["vectorized", "jacobian"]:
    """``vectorized`` unless the model has a recurrent layer (pfor cannot vectorize a GRU's gradient loop)."""
    if method == "auto":
        recurrent = any(isinstance(layer, keras.layers.RNN) for layer in _all_layers(model))
        return "jacobian" if recurrent else "vectorized"
    if method not in ("vectorized", "jacobian"):
        raise ValueError(f"method must be 'auto', 'vectorized' or 'jacobian', got {method!r}")
    return method


def per_example_loss_fn(loss: Any) -> PerExampleLoss:
    """The unreduced form of a compiled Keras loss: ``(y_true, y_pred) -> (batch,)`` losses.

    A :class:`keras.losses.Loss` gives its documented ``call`` (per-sample values, before reduction); a name
    or a plain function is resolved with :func:`keras.losses.get`. Dicts/lists (multi-output) are refused.
    """
    if loss is None or isinstance(loss, (dict, list, tuple)):
        raise ValueError(f"DP-SGD needs exactly one loss for one output, got {loss!r}")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    if callable(loss):
        return loss
    raise ValueError(f"cannot use {loss!r} as a loss")


def _losses(loss_fn: PerExampleLoss, y, y_pred, sample_weight) -> tf.Tensor:
    y = tf.convert_to_tensor(y)
    y_pred = tf.convert_to_tensor(y_pred)
    if y.shape.rank is not None and y_pred.shape.rank is not None and y.shape.rank == y_pred.shape.rank - 1:
        y = tf.expand_dims(y, -1)  # labels (B,) against probabilities (B, 1)
    values = tf.cast(loss_fn(tf.cast(y, y_pred.dtype), y_pred), tf.float32)
    values = tf.reshape(values, [tf.shape(values)[0], -1])
    values = tf.reduce_mean(values, axis=1)  # (B,)
    if sample_weight is not None:
        values = values * tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    return values


# ------------------------------------------------------------------------------------------------ gradients


def per_example_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss_fn: PerExampleLoss,
    sample_weight: Any = None,
    *,
    method: Method = "auto",
    training: bool = True,
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """Gradients of each example's (weighted) loss w.r.t. ``model.trainable_variables``.

    Returns ``(grads, losses, y_pred)``: one ``(B, *variable.shape)`` tensor per variable, the ``(B,)``
    per-example losses and the ``(B, ...)`` predictions. Only the data loss: no regularizers.
    """
    variables = model.trainable_variables
    if choose_method(model, method) == "jacobian":
        with tf.GradientTape() as tape:
            y_pred = model(x, training=training)
            losses = _losses(loss_fn, y, y_pred, sample_weight)
        grads = tape.jacobian(losses, variables, experimental_use_pfor=True)
        return _fill(grads, variables, [tf.shape(losses)[0]]), losses, y_pred

    weights = (
        tf.ones_like(tf.reshape(tf.convert_to_tensor(y), [-1]), tf.float32)
        if sample_weight is None
        else (tf.reshape(tf.cast(sample_weight, tf.float32), [-1]))
    )

    def one(args):
        xi, yi, wi = args
        xi = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), xi)
        with tf.GradientTape() as tape:
            pred = model(xi, training=training)
            loss = tf.reduce_sum(_losses(loss_fn, tf.expand_dims(yi, 0), pred, tf.expand_dims(wi, 0)))
        return _fill(tape.gradient(loss, variables), variables), loss, pred[0]

    grads, losses, y_pred = tf.vectorized_map(one, (x, y, weights))
    return list(grads), losses, y_pred


def clip_and_sum(per_example: Sequence[tf.Tensor], l2_clip: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Scale each example's gradient to L2 norm <= ``l2_clip`` (norm over all variables together) and sum.

    Returns ``(summed, norms)``: one tensor per variable and the ``(B,)`` pre-clipping norms.
    """
    per_example = [tf.cast(g, tf.float32) for g in per_example]
    squares = [tf.reshape(tf.square(g), [tf.shape(g)[0], -1]) for g in per_example]
    norms = tf.sqrt(tf.add_n([tf.reduce_sum(s, axis=1) for s in squares]))
    clip = tf.constant(float(l2_clip), tf.float32)
    factors = clip / tf.maximum(norms, clip)  # = min(1, C/||g||), and 1 for a zero gradient
    summed = [tf.tensordot(factors, g, axes=[[0], [0]]) for g in per_example]
    return summed, norms


def noise_generator(seed: int | None = None) -> tf.random.Generator:
    """A Philox generator for the DP noise; secret state from :mod:`secrets` unless ``seed`` (tests only)."""
    if seed is not None:
        return tf.random.Generator.from_seed(int(seed), alg="philox")
    state = [secrets.randbits(63) for _ in range(3)]  # 128-bit counter + 64-bit key, none derivable by anyone
    return tf.random.Generator.from_state(state, alg="philox")


def add_gaussian_noise(
    grads: Sequence[tf.Tensor], stddev: float | tf.Tensor, generator: tf.random.Generator
) -> list[tf.Tensor]:
    """``g + N(0, stddev^2)`` elementwise for every tensor of ``grads``."""
    return [g + generator.normal(tf.shape(g), stddev=stddev, dtype=g.dtype) for g in grads]


def dp_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss_fn: PerExampleLoss,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: tf.random.Generator,
    sample_weight: Any = None,
    method: Method = "auto",
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(sum_i clip_C(grad loss_i) + N(0, (sigma*C)^2)) / expected_batch_size`` for the trainable variables.

    Returns ``(grads, losses, y_pred, norms)`` (per-example losses and pre-clip norms for reporting only: they
    are not private). See the module docstring for the choice of denominator.
    """
    _validate(l2_clip, noise_multiplier, expected_batch_size)
    per_example, losses, y_pred = per_example_gradients(model, x, y, loss_fn, sample_weight, method=method)
    summed, norms = clip_and_sum(per_example, l2_clip)
    if noise_multiplier > 0:
        summed = add_gaussian_noise(summed, float(noise_multiplier) * float(l2_clip), generator)
    scale = 1.0 / float(expected_batch_size)
    return [g * scale for g in summed], losses, y_pred, norms


def _validate(l2_clip: float, noise_multiplier: float, expected_batch_size: float) -> None:
    if not (l2_clip > 0 and math.isfinite(l2_clip)):
        raise ValueError(f"l2_clip must be a finite number > 0, got {l2_clip}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be a finite number > 0, got {expected_batch_size}")


def weight_regularization(model: keras.Model) -> tf.Tensor:
    """Sum of the model's weight regularizers: it depends on the weights only, so it goes outside the clip."""
    terms = [
        v.regularizer(v) for v in model.trainable_variables if getattr(v, "regularizer", None) is not None
    ]
    return tf.add_n([tf.cast(t, tf.float32) for t in terms]) if terms else tf.zeros((), tf.float32)


# ------------------------------------------------------------------------------------------------ Keras model


class DPModel(keras.Model):
    """Wraps a built model; ``fit`` trains it with DP-SGD. Compile it as usual (one loss, any optimizer).

    ``expected_batch_size`` is the denominator of every step: ``q*N`` for :func:`poisson_batches`, the fit
    ``batch_size`` for shuffled batches. ``extra_loss`` (e.g. the FedProx term) must depend on the weights
    only, never on the data: its gradient is added unclipped and un-noised, like the weight regularizers. Each
    optimizer step is one DP-SGD step: ``optimizer.iterations`` is the ``steps`` to charge. ``get_weights()``
    are the inner model's (the noise generator's state is not a Keras weight and is never saved).
    """

    def __init__(
        self,
        inner: keras.Model,
        *,
        l2_clip: float,
        noise_multiplier: float,
        expected_batch_size: float,
        noise_seed: int | None = None,
        method: Method = "auto",
        extra_loss: Callable[[], Any] | None = None,
        **kwargs: Any,
    ):
        _validate(l2_clip, noise_multiplier, expected_batch_size)
        check_model(inner)
        super().__init__(name=kwargs.pop("name", f"{inner.name}_dp"), **kwargs)
        self.inner = inner
        self.l2_clip = float(l2_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.method = choose_method(inner, method)
        self._extra_loss = extra_loss
        self._generator = noise_generator(noise_seed)

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss_fn = per_example_loss_fn(self.loss)
        grads, losses, y_pred, _ = dp_gradients(
            self.inner,
            x,
            y,
            loss_fn,
            l2_clip=self.l2_clip,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            generator=self._generator,
            sample_weight=sample_weight,
            method=self.method,
        )
        variables = self.inner.trainable_variables
        with tf.GradientTape() as tape:
            extra = weight_regularization(self.inner)
            if self._extra_loss is not None:
                extra = extra + tf.cast(self._extra_loss(), tf.float32)
        extra_grads = _fill(tape.gradient(extra, variables), variables)
        grads = [g + tf.cast(e, g.dtype) for g, e in zip(grads, extra_grads, strict=True)]
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))

        n = tf.maximum(tf.cast(tf.shape(losses)[0], tf.float32), 1.0)
        for metric in self.metrics:
            if metric.name == "loss":  # not private: a training-data statistic, like Keras' own loss
                metric.update_state(tf.reduce_sum(losses) / n + extra)
        y_pred = tf.reshape(y_pred, [tf.shape(losses)[0], -1])
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


# ------------------------------------------------------------------------------------------------ sampling


def _n_rows(x: Any) -> int:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return len(first)


def poisson_batches(
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    sampling_rate: float,
    steps_per_epoch: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Poisson-sampled batches for ``model.fit``: at each step every record is included independently with
    probability ``sampling_rate`` (variable batch size, mean ``q*N``), as the accountant assumes.

    A dataset of ``steps_per_epoch`` batches (default ``round(1/q)``: one pass in expectation), drawn in the
    tf.data graph from a generator whose state persists, so every epoch draws afresh. Give :class:`DPModel`
    ``expected_batch_size=q*N``, and ``fit(..., shuffle=False)`` (there is nothing to shuffle). The draw is
    secret (:func:`noise_generator`) unless ``seed`` is given (tests only): an observer who knows which
    records were sampled loses the amplification by subsampling. An empty draw is an empty batch (a pure-noise
    step), never a skipped one: skipping would reveal that it was empty.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    n = _n_rows(x)
    if n == 0:
        raise ValueError("cannot sample batches from an empty dataset")
    steps = int(steps_per_epoch) if steps_per_epoch is not None else max(1, round(1 / sampling_rate))
    generator = noise_generator(seed)
    parts = (x, y) if sample_weight is None else (x, y, sample_weight)
    tensors = tf.nest.map_structure(tf.convert_to_tensor, parts)
    q = float(sampling_rate)

    def draw(_step):
        idx = tf.where(generator.uniform([n], dtype=tf.float32) < q)[:, 0]
        return tf.nest.map_structure(lambda t: tf.gather(t, idx), tensors)

    return tf.data.Dataset.range(steps).map(draw)
