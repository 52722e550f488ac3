"""The Keras models the federation trains, built from a contract's :class:`ModelSpec`.

Two kinds:

``mlp``
    ``features (n_features,)`` → ``Dense(h, relu, L2)`` + ``Dropout`` for each ``h`` in ``spec.hidden`` →
    ``Dense(1, sigmoid)``.

``sequence`` (e-commerce: will this event be a purchase, given the user's ordered history?)
    Inputs (built by :func:`lepton_tasks.trainer.data.to_model_inputs`):

    - ``items``    int32 ``(L,)``: hashed item ids of the user's last ``L = spec.sequence_length`` events up
      to and including the current one, oldest first, padded with ``0`` (the padding id) *after* the current
      event when the user has fewer than ``L`` events. Padding is masked, so where it sits does not change
      the result on CPU; it sits on the right because cuDNN's GRU kernel only accepts right-padded masks
      (a left-padded mask fails a runtime assertion on GPU);
    - ``features`` float32 ``(L, n_features + 2)``: the per-event features of those events plus two channels
      (``data.EXTRA_CHANNELS``): "the user's previous event was positive" (the label of the event *before*
      each step, so the current event's own label never enters its inputs) and "this past step shows the
      current item" (repeat views);
    - ``item``, ``user`` int32 scalars: hashed ids of the current event's item and user.

    ``items`` → ``Embedding(hash_buckets, embedding_dim)`` (shared with ``item``) → ``Dropout``, concatenated
    with ``features`` → ``GRU(gru_units)`` with the mask ``items != 0`` (so it returns the state after the
    current event and padding gets no gradient) → concatenated with the current item and user embeddings → the
    same Dense stack as ``mlp`` → ``Dense(1, sigmoid)``. The mask is passed explicitly: an Embedding's
    ``mask_zero`` mask would not survive ``Concatenate`` with the unmasked ``features``.

    Ids are hashed in ``data.py`` (a fixed-key SipHash, the same on every machine), not by min-max scaling.

``spec.l2`` applies to every Dense kernel and, for sequence models, to the embedding tables and the GRU
kernels; ``spec.dropout`` follows every hidden Dense layer and, for sequence models, the embeddings. Hashed
id embeddings memorize quickly (thousands of ids, few views each): for event logs of tens of thousands of rows
use ``dropout`` ≈ 0.2, ``l2`` ≈ 1e-4 and one local epoch per round.

Models are returned uncompiled; :mod:`lepton_tasks.trainer.local` compiles them. Every weight is created at
build time, so ``get_weights()`` of two models built from the same spec line up array by array: that is what
federated averaging relies on.
"""

from __future__ import annotations

import logging
import os

import keras
import tensorflow as tf

from lepton_tasks.core.contracts import ModelSpec
from lepton_tasks.trainer.data import EXTRA_CHANNELS

log = logging.getLogger(__name__)

#: per-event channels the sequence model adds to the contract's features (see :func:`sequence_feature_width`)
EXTRA_SEQUENCE_CHANNELS = len(EXTRA_CHANNELS)
SEQUENCE_INPUTS = ("items", "features", "item", "user")

_devices_configured = False
_determinism = False


def configure_devices() -> list[str]:
    """Enable memory growth on every visible GPU (a no-op on CPU); return the GPU names.

    Must run before TensorFlow touches a GPU; later calls are no-ops. Memory growth lets a trainer share a
    GPU instead of reserving all of its memory up front.
    """
    global _devices_configured
    gpus = tf.config.list_physical_devices("GPU")
    if not _devices_configured:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except (RuntimeError, ValueError) as exc:  # already initialized: keep going with its settings
                log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
        _devices_configured = True
    return [g.name for g in gpus]


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and ask TensorFlow for deterministic kernels.

    ``tf.config.experimental.enable_op_determinism()`` is process-wide and makes ops without a deterministic
    implementation raise; set ``LEPTON_OP_DETERMINISM=0`` to skip it (seeding still happens).
    """
    global _determinism
    keras.utils.set_random_seed(int(seed))
    if not _determinism and os.environ.get("LEPTON_OP_DETERMINISM", "1") != "0":
        try:
            tf.config.experimental.enable_op_determinism()
        except Exception as exc:  # noqa: BLE001 - an old/odd TF build: seeded but not bit-deterministic
            log.warning("op determinism unavailable: %s", exc)
        _determinism = True


def sequence_feature_width(n_features: int) -> int:
    """Width of the sequence model's per-event ``features`` input for ``n_features`` contract features."""
    return int(n_features) + EXTRA_SEQUENCE_CHANNELS


@keras.saving.register_keras_serializable(package="lepton")
class PaddingMask(keras.layers.Layer):
    """``ids != 0``: the steps of a padded id sequence that hold a real event."""

    def call(self, ids):
        return keras.ops.not_equal(ids, 0)


def _validate(spec: ModelSpec, n_features: int) -> None:
    if any(h < 1 for h in spec.hidden):
        raise ValueError(f"every hidden layer needs at least one unit, got {spec.hidden}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {spec.dropout}")
    if spec.l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {spec.l2}")
    if spec.kind == "mlp":
        if n_features < 1:
            raise ValueError(f"an mlp needs at least one feature, got n_features={n_features}")
        return
    missing = [f for f in ("user_column", "item_column", "timestamp_column") if not getattr(spec, f)]
    if missing:
        raise ValueError(f"a sequence model needs {', '.join(missing)} in its model spec")
    if n_features < 0:
        raise ValueError(f"n_features must be >= 0, got {n_features}")
    if spec.sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {spec.sequence_length}")
    if spec.hash_buckets < 2:
        raise ValueError(f"hash_buckets must be >= 2 (bucket 0 is padding), got {spec.hash_buckets}")
    if spec.embedding_dim < 1 or spec.gru_units < 1:
        raise ValueError("embedding_dim and gru_units must be >= 1")


def _dense_stack(x, spec: ModelSpec, seed: int):
    reg = keras.regularizers.L2(spec.l2) if spec.l2 > 0 else None
    for i, units in enumerate(spec.hidden):
        x = keras.layers.Dense(
            units,
            activation="relu",
            kernel_regularizer=reg,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 101 + i),
            name=f"dense_{i}",
        )(x)
        if spec.dropout > 0:
            x = keras.layers.Dropout(spec.dropout, seed=seed + 201 + i, name=f"dropout_{i}")(x)
    return keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 301),
        name="probability",
    )(x)


def build_model(spec: ModelSpec, n_features: int, seed: int) -> keras.Model:
    """Build (uncompiled) the model of ``spec`` for ``n_features`` float features, initialized from ``seed``.

    The same ``(spec, n_features, seed)`` gives bit-identical initial weights in any process. For a sequence
    model ``n_features`` is the number of contract features per event; the model adds
    :data:`EXTRA_SEQUENCE_CHANNELS` itself (see :func:`sequence_feature_width`).
    """
    _validate(spec, n_features)
    seed = int(seed)  # every initializer and dropout layer gets its own seed derived from it: no global state
    if spec.kind == "mlp":
        inputs = keras.Input(shape=(n_features,), dtype="float32", name="features")
        return keras.Model(inputs, _dense_stack(inputs, spec, seed), name="lepton_mlp")

    length = spec.sequence_length
    items = keras.Input(shape=(length,), dtype="int32", name="items")
    features = keras.Input(
        shape=(length, sequence_feature_width(n_features)), dtype="float32", name="features"
    )
    item = keras.Input(shape=(), dtype="int32", name="item")
    user = keras.Input(shape=(), dtype="int32", name="user")

    reg = keras.regularizers.L2(spec.l2) if spec.l2 > 0 else None
    item_embedding = keras.layers.Embedding(
        spec.hash_buckets,
        spec.embedding_dim,
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=seed + 1),
        embeddings_regularizer=reg,
        name="item_embedding",
    )
    user_embedding = keras.layers.Embedding(
        spec.hash_buckets,
        spec.embedding_dim,
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=seed + 2),
        embeddings_regularizer=reg,
        name="user_embedding",
    )

    def dropped(x, name: str, offset: int):
        return keras.layers.Dropout(spec.dropout, seed=seed + offset, name=name)(x) if spec.dropout > 0 else x

    history_items = dropped(item_embedding(items), "items_dropout", 11)
    steps = keras.layers.Concatenate(axis=-1, name="steps")([history_items, features])
    mask = PaddingMask(name="padding_mask")(items)
    history = keras.layers.GRU(
        spec.gru_units,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 3),
        recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 4),
        kernel_regularizer=reg,
        recurrent_regularizer=reg,
        name="history_gru",
    )(steps, mask=mask)
    current = keras.layers.Concatenate(axis=-1, name="current")(
        [
            history,
            dropped(item_embedding(item), "item_dropout", 12),
            dropped(user_embedding(user), "user_dropout", 13),
        ]
    )
    return keras.Model(
        {"items": items, "features": features, "item": item, "user": user},
        _dense_stack(current, spec, seed),
        name="lepton_sequence",
    )
