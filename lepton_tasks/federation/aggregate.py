"""Server-side aggregation of partner model updates: pure numpy, no Airflow, no TensorFlow.

An *update* is one partner's contribution to a federated round: the partner's name, its model
weights in the Keras ``model.get_weights()`` layout (a list of ``np.ndarray``, one per layer
variable) and ``n``, the number of training samples behind it. Any ``(partner, weights, n)``
tuple works; :class:`Update` is a named version of it.

Strategies (pure functions over updates, in the style of Flower's ``strategy.aggregate``):

* :func:`fedavg` -- sample-weighted mean (McMahan et al., 2017). Streaming: it consumes any
  iterable, one update at a time, so peak extra memory is about one model, not N models.
  :class:`StreamingFedAvg` is the same accumulator with an explicit ``add``/``result`` API.
* FedProx (Li et al., 2020) -- the proximal term ``mu/2 * ||w - w_global||^2`` is added to the
  loss by the trainer, on the partner's side. On the server FedProx aggregates exactly like
  FedAvg, so ``aggregate("fedprox", ...)`` is :func:`fedavg`. :func:`fedprox_penalty` is the
  numpy reference of the client-side term, used to test the trainer.
* :func:`coordinate_median` and :func:`trimmed_mean` -- coordinate-wise robust statistics
  (Yin et al., 2018).
* :func:`krum` -- Krum and multi-Krum (Blanchard et al., 2017).
* :func:`aggregate` -- dispatcher by strategy name; :data:`STRATEGIES` is the tuple of those names.
* :func:`best_round` -- which round's global model to publish (defined in
  :mod:`lepton_tasks.federation.selection`, re-exported here).

Layers may be empty (a zero-size array such as shape ``(0,)`` or ``(3, 0)``): every strategy
returns an empty array of that shape and of the result dtype. Weights may be anywhere in the
finite range of their dtype: the robust strategies' means never overflow (a mean of finite
values is finite; FedAvg instead reports an overflow of its weighted sum, see
:class:`StreamingFedAvg`), and Krum's distances carry an explicit exponent, so neither
``1e300`` nor ``1e-310`` changes which update is selected.

Every strategy validates its input and raises ``ValueError`` naming the violated assumption
and, for a bad update, the partner and the layer index: mismatched number of layers, layer
shape or dtype, NaN or Inf anywhere, ``n <= 0``, a partner appearing twice, or no updates.

References:
    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
    Networks from Decentralized Data." AISTATS 2017. arXiv:1602.05629.
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
    Networks." MLSys 2020. arXiv:1812.06127.
    Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates." ICML 2018. arXiv:1803.01498.
    Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent." NeurIPS 2017.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from numbers import Integral, Rational, Real
from typing import Any, NamedTuple, TypeAlias, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from lepton_tasks.core.strategies import STRATEGIES
from lepton_tasks.federation.selection import best_round

__all__ = [
    "STRATEGIES",
    "StreamingFedAvg",
    "Update",
    "aggregate",
    "best_round",
    "coordinate_median",
    "fedavg",
    "fedprox",
    "fedprox_penalty",
    "krum",
    "krum_select",
    "trimmed_mean",
]

Weights: TypeAlias = list[np.ndarray]
"""A model's weights, in the Keras ``model.get_weights()`` layout."""

UpdateLike: TypeAlias = tuple[str, Sequence[ArrayLike], int]
"""``(partner, weights, n)``; :class:`Update` is one."""

# STRATEGIES -- the aggregation strategy names, exactly the names aggregate() accepts and in the same
# order (a unit test keeps the two in step). There is one tuple: it is defined in the light module
# lepton_tasks.core.strategies (no numpy, so DAG files can import it at parse time) and re-exported
# here, so ``aggregate.STRATEGIES is core.strategies.STRATEGIES``; nothing else keeps its own copy.
#   fedavg        fedavg()
#   fedprox       fedprox() (server side identical to FedAvg)   param mu
#   median        coordinate_median()
#   trimmed_mean  trimmed_mean()                                  param beta
#   krum          krum()                                          params f, m

# Elements per block in the accumulation loops. Streaming: a float32 block is 1 MiB, so the
# scratch block and the slices of the accumulator and input it touches stay in cache between the
# multiply and the add. Blocked (all updates in memory): the accumulator block stays in L2 while
# every update's block is added into it.
_STREAM_BLOCK = 1 << 18
_BLOCKED_BLOCK = 1 << 16
# Upper bound, in bytes, on the (n_updates x block) float64 staging buffer of the blocked float64
# kernel, which computes the weighted sum of a block with one einsum.
_STAGING_BYTES = 16 << 20

_ACCUMULATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Update(NamedTuple):
    """One partner's contribution to a round."""

    partner: str
    """The partner's name (unique within a round)."""
    weights: Sequence[ArrayLike]
    """Model weights, Keras ``get_weights()`` layout."""
    n: int
    """Number of training samples behind these weights (> 0)."""


# --------------------------------------------------------------------------- validation


class _Reference:
    """Layer count, shapes and dtypes every update of a round must match (from the first one)."""

    __slots__ = ("dtypes", "partner", "shapes")

    def __init__(self, partner: str, layers: Sequence[np.ndarray]) -> None:
        self.partner = partner
        self.shapes: tuple[tuple[int, ...], ...] = tuple(a.shape for a in layers)
        self.dtypes: tuple[np.dtype[Any], ...] = tuple(a.dtype for a in layers)


def _check_partner(partner: object) -> str:
    if not isinstance(partner, str) or not partner:
        raise ValueError(f"partner must be a non-empty string naming the partner, got {partner!r}")
    return partner


def _check_n(partner: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral):
        # ValueError, not TypeError: every violated precondition of this module is a ValueError.
        raise ValueError(f"partner {partner!r}: n (sample count) must be an integer, got {n!r}")
    if n <= 0:
        raise ValueError(f"partner {partner!r}: n (sample count) must be > 0, got {n}")
    return int(n)


def _check_layers(partner: str, weights: object, ref: _Reference | None) -> list[np.ndarray]:
    """Arrays of ``weights`` after checking structure and dtype (not values) against ``ref``."""
    if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence):
        raise ValueError(
            f"partner {partner!r}: weights must be a list of arrays (Keras get_weights() layout), "
            f"got {type(weights).__name__}"
        )
    layers: list[np.ndarray] = []
    for i, layer in enumerate(weights):
        try:
            layers.append(np.asarray(layer))
        except (TypeError, ValueError) as exc:  # e.g. a ragged nested list
            raise ValueError(f"partner {partner!r}: layer {i} is not an array: {exc}") from exc
    if not layers:
        raise ValueError(f"partner {partner!r}: weights hold no layers")
    for i, layer in enumerate(layers):
        if layer.dtype.kind not in "fiu":
            raise ValueError(
                f"partner {partner!r}: layer {i} has dtype {layer.dtype}; only real floating "
                "point or integer weights can be aggregated"
            )
    if ref is None:
        return layers
    if len(layers) != len(ref.shapes):
        raise ValueError(
            f"partner {partner!r}: has {len(layers)} layers but partner {ref.partner!r} has "
            f"{len(ref.shapes)}; all updates must come from the same model architecture"
        )
    for i, layer in enumerate(layers):
        if layer.shape != ref.shapes[i]:
            raise ValueError(
                f"partner {partner!r}: layer {i} has shape {layer.shape} but partner "
                f"{ref.partner!r} has {ref.shapes[i]}; all updates must have the same layer shapes"
            )
        if layer.dtype != ref.dtypes[i]:
            raise ValueError(
                f"partner {partner!r}: layer {i} has dtype {layer.dtype} but partner "
                f"{ref.partner!r} has {ref.dtypes[i]}; all updates must have the same layer dtypes"
            )
    return layers


def _nonfinite_error(partner: str, layer: int) -> ValueError:
    return ValueError(f"partner {partner!r}: layer {layer} contains NaN or Inf; updates must be finite")


def _block_is_finite(block: np.ndarray) -> bool:
    """True if every element of the 1-D ``block`` is finite.

    Fast path: a dot product is finite only if every element is (a NaN or Inf element makes it
    NaN or Inf), and BLAS reads the block once without a temporary. A non-finite dot product may
    also be an overflow of huge but finite values, so that case is decided exactly.
    """
    if block.dtype.kind in "iu" or block.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.dot(block, block)):
            return True
    return bool(np.isfinite(block).all())


def _check_finite(partner: str, layers: Sequence[np.ndarray]) -> None:
    for i, layer in enumerate(layers):
        flat = layer.reshape(-1)
        for start in range(0, flat.size, _STREAM_BLOCK):
            if not _block_is_finite(flat[start : start + _STREAM_BLOCK]):
                raise _nonfinite_error(partner, i)


def _result_dtype(layer_dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Aggregates keep a floating layer's dtype; integer layers average to float64."""
    return layer_dtype if layer_dtype.kind == "f" else np.dtype(np.float64)


def _check_accumulate_dtype(accumulate_dtype: DTypeLike) -> np.dtype[Any]:
    try:
        dtype = np.dtype(accumulate_dtype)
    except TypeError as exc:
        raise ValueError(f"accumulate_dtype must be float32 or float64, got {accumulate_dtype!r}") from exc
    if dtype not in _ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype must be float32 or float64, got {dtype}")
    return dtype


def _materialize(updates: Iterable[UpdateLike]) -> list[tuple[str, list[np.ndarray], int]]:
    """Validate every update (structure, n, unique partner, finiteness) into a list."""
    items: list[tuple[str, list[np.ndarray], int]] = []
    seen: set[str] = set()
    ref: _Reference | None = None
    for update in updates:
        partner, weights, n = _unpack(update)
        if partner in seen:
            raise ValueError(f"partner {partner!r}: appears more than once; one update per partner")
        n = _check_n(partner, n)
        layers = _check_layers(partner, weights, ref)
        _check_finite(partner, layers)
        if ref is None:
            ref = _Reference(partner, layers)
        seen.add(partner)
        items.append((partner, layers, n))
    if not items:
        raise ValueError("no updates to aggregate; at least one partner update is required")
    return items


def _unpack(update: object) -> tuple[str, object, object]:
    try:
        # The cast only informs the type checker; unpacking still fails on a wrong shape.
        partner, weights, n = cast("tuple[object, object, object]", update)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"each update must be a (partner, weights, n) tuple, got {type(update).__name__}"
        ) from exc
    return _check_partner(partner), weights, n


# --------------------------------------------------------------------------- FedAvg / FedProx


def _divide_checked(acc: np.ndarray, total: int, avg: np.ndarray) -> bool:
    """``avg = acc / total`` block by block (``avg`` may be ``acc``); False if a block overflowed.

    The inputs were checked finite, so a non-finite average means the sum (or its narrowing to
    ``avg.dtype``) overflowed. Each block is checked while it is still in cache.
    """
    divisor = acc.dtype.type(total)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, acc.size, _STREAM_BLOCK):
            stop = min(start + _STREAM_BLOCK, acc.size)
            out = avg[start:stop]
            np.divide(acc[start:stop], divisor, out=out, dtype=acc.dtype)
            if not _block_is_finite(out):
                return False
    return True


def _overflow_error(layer: int, acc_dtype: np.dtype[Any], out_dtype: np.dtype[Any]) -> ValueError:
    return ValueError(
        f"layer {layer}: the weighted sum (or the average) overflowed {acc_dtype} / {out_dtype}; "
        "use accumulate_dtype=float64"
    )


class StreamingFedAvg:
    """FedAvg (McMahan et al., 2017) accumulated one update at a time.

    ``add`` folds ``n * weights`` into a running sum in place; ``result`` divides by the total
    sample count. Memory: one accumulator per layer (one model in ``accumulate_dtype``) plus a
    1 MiB scratch block; updates can be dropped as soon as ``add`` returns.

    ``accumulate_dtype``:
        ``float32`` (default) sums in float32, the same arithmetic as Flower's ``aggregate``
        (``layer * n`` then ``np.add`` in the layer's float32; bit-identical results in the
        benchmark): the error grows with the number of partners, a few float32 ulps for tens of
        them. ``result`` divides in place, so the aggregation holds exactly one extra model.
        Sample counts above 2**24 are rounded to float32 (a relative change below 6e-8). A
        float64 layer is always summed in float64 (the accumulator is never narrower than the
        layer).
        ``float64`` forms each ``n * w`` exactly and sums in float64 (relative error ~1e-16),
        so the float32 average is within one ulp of the exact mean -- at the cost of a
        two-model accumulator plus the result and about twice the time (``bench/README.md``).

    Validation: the first update fixes the number of layers, their shapes and dtypes. ``add``
    raises ``ValueError`` naming the partner (and layer) on a mismatch, on ``n <= 0`` or on a
    repeated partner before touching the sum. NaN/Inf is detected while summing (to read each
    update once); after that error the partial sum is unusable and every later ``add`` or
    ``result`` raises, naming the partner that poisoned it.
    """

    def __init__(self, accumulate_dtype: DTypeLike = np.float32) -> None:
        self._accumulate_dtype = _check_accumulate_dtype(accumulate_dtype)
        self._ref: _Reference | None = None
        self._acc: list[np.ndarray] = []
        self._scratch: dict[np.dtype[Any], np.ndarray] = {}
        self._partners: list[str] = []
        self._seen: set[str] = set()
        self._total = 0
        self._broken: str | None = None
        self._result: list[np.ndarray] | None = None

    @property
    def partners(self) -> tuple[str, ...]:
        """Partners added so far, in order."""
        return tuple(self._partners)

    @property
    def total_samples(self) -> int:
        """Sum of ``n`` over the partners added so far."""
        return self._total

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ValueError(f"this FedAvg accumulator is unusable: {self._broken}; start a new aggregation")
        if self._result is not None:
            raise ValueError("this FedAvg accumulator is finalized: result() was already called")

    def add(self, partner: str, weights: Sequence[ArrayLike], n: int) -> None:
        """Fold one partner's update into the running weighted sum."""
        self._check_usable()
        partner = _check_partner(partner)
        if partner in self._seen:
            raise ValueError(f"partner {partner!r}: appears more than once; one update per partner")
        n = _check_n(partner, n)
        layers = _check_layers(partner, weights, self._ref)
        first = self._ref is None
        if first:
            self._start(partner, layers)
        for i, (acc, layer) in enumerate(zip(self._acc, layers, strict=True)):
            flat = layer.reshape(-1)
            factor = acc.dtype.type(n)
            scratch = self._scratch[acc.dtype]
            for start in range(0, flat.size, _STREAM_BLOCK):
                block = flat[start : start + _STREAM_BLOCK]
                if not _block_is_finite(block):
                    self._broken = (
                        f"partner {partner!r} sent NaN/Inf weights after part of them had been summed"
                    )
                    raise _nonfinite_error(partner, i)
                target = acc[start : start + block.size]
                with np.errstate(over="ignore", invalid="ignore"):  # overflow: checked in result()
                    if first:  # the accumulator starts uninitialised: write, don't add
                        np.multiply(block, factor, out=target, dtype=acc.dtype)
                    else:
                        tmp = scratch[: block.size]
                        np.multiply(block, factor, out=tmp, dtype=acc.dtype)
                        np.add(target, tmp, out=target)
        self._seen.add(partner)
        self._partners.append(partner)
        self._total += n

    def _start(self, partner: str, layers: list[np.ndarray]) -> None:
        self._ref = _Reference(partner, layers)
        self._acc = [
            np.empty(layer.size, dtype=np.result_type(self._accumulate_dtype, layer.dtype))
            for layer in layers
        ]
        block = min(_STREAM_BLOCK, max(layer.size for layer in layers))
        self._scratch = {acc.dtype: np.empty(block, dtype=acc.dtype) for acc in self._acc}

    def result(self) -> Weights:
        """The weighted average, one array per layer, in the layers' dtypes.

        Finalizes the accumulator: a later ``add`` raises; a later ``result`` returns the same
        arrays.
        """
        if self._result is not None:
            return self._result
        self._check_usable()
        if self._ref is None:
            raise ValueError("no updates to aggregate; at least one partner update is required")
        out: Weights = []
        for i, acc in enumerate(self._acc):
            out_dtype = _result_dtype(self._ref.dtypes[i])
            # In place when the dtypes agree (float32 accumulator): no second model.
            avg = acc if out_dtype == acc.dtype else np.empty(acc.size, dtype=out_dtype)
            if not _divide_checked(acc, self._total, avg):
                self._broken = f"layer {i}: the weighted sum overflowed {acc.dtype}"
                raise _overflow_error(i, acc.dtype, out_dtype)
            self._acc[i] = avg  # let a wider accumulator go as soon as possible
            out.append(avg.reshape(self._ref.shapes[i]))
        self._acc = []
        self._scratch = {}
        self._result = out
        return out


def fedavg(updates: Iterable[UpdateLike], *, accumulate_dtype: DTypeLike = np.float32) -> Weights:
    """FedAvg: the sample-weighted mean ``sum_k n_k w_k / sum_k n_k`` (McMahan et al., 2017).

    ``updates`` is any iterable of ``(partner, weights, n)``. A one-shot iterator (for example a
    generator that loads and decrypts one partner's weights at a time) is consumed in a single
    pass by :class:`StreamingFedAvg`, so peak extra memory is about one model whatever the
    number of partners. A sequence (list, tuple) is already in memory, so it is summed block by
    block across all updates at once (the accumulator block stays in cache; for float64 the
    block's weighted sum is one einsum): same result, faster, and the only model-sized
    allocation is the returned average. See :class:`StreamingFedAvg` for ``accumulate_dtype``.

    Raises:
        ValueError: no updates; an update that is not ``(partner, weights, n)``; ``n`` not a
            positive integer; a partner repeated; layer count, shape or dtype different from the
            first update; NaN or Inf in any layer. Messages name the partner and layer.
    """
    acc_dtype = _check_accumulate_dtype(accumulate_dtype)
    if isinstance(updates, Sequence) and not isinstance(updates, (str, bytes)):
        return _fedavg_blocked(updates, acc_dtype)
    streaming = StreamingFedAvg(accumulate_dtype=acc_dtype)
    for update in updates:
        partner, weights, n = _unpack(update)
        streaming.add(partner, weights, n)  # type: ignore[arg-type]
        # Drop this update before the iterator produces the next one: one model in flight.
        del update, weights
    return streaming.result()


def _fedavg_blocked(updates: Sequence[UpdateLike], acc_dtype: np.dtype[Any]) -> Weights:
    """FedAvg over updates that are all in memory: loop over blocks outside, updates inside."""
    items: list[tuple[str, list[np.ndarray], int]] = []
    seen: set[str] = set()
    ref: _Reference | None = None
    for update in updates:  # structure first: values are checked while summing
        partner, weights, n = _unpack(update)
        if partner in seen:
            raise ValueError(f"partner {partner!r}: appears more than once; one update per partner")
        n = _check_n(partner, n)
        layers = _check_layers(partner, weights, ref)
        if ref is None:
            ref = _Reference(partner, layers)
        seen.add(partner)
        items.append((partner, [layer.reshape(-1) for layer in layers], n))
    if ref is None:
        raise ValueError("no updates to aggregate; at least one partner update is required")

    total = sum(n for _, _, n in items)
    out: Weights = []
    for i, shape in enumerate(ref.shapes):
        layer_acc = np.result_type(acc_dtype, ref.dtypes[i])
        size = math.prod(shape)
        avg = np.empty(size, dtype=_result_dtype(ref.dtypes[i]))
        if layer_acc == np.float64:
            _blocked_float64(items, i, size, avg, total)
        else:
            _blocked_sequential(items, i, size, avg, total, layer_acc)
        out.append(avg.reshape(shape))
    return out


def _blocked_sequential(
    items: list[tuple[str, list[np.ndarray], int]],
    layer: int,
    size: int,
    avg: np.ndarray,
    total: int,
    acc_dtype: np.dtype[Any],
) -> None:
    """Sum ``n * block`` in ``acc_dtype``, in update order: bit-identical to StreamingFedAvg."""
    if size == 0:  # an empty layer averages to an empty array (and range() refuses a zero step)
        return
    block = min(_BLOCKED_BLOCK, size)
    acc = np.empty(block, dtype=acc_dtype)
    tmp = np.empty(block, dtype=acc_dtype)
    factors = [acc_dtype.type(n) for _, _, n in items]
    total_f = acc_dtype.type(total)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: checked below
        for start in range(0, size, block):
            stop = min(start + block, size)
            a, t = acc[: stop - start], tmp[: stop - start]
            for k, (partner, flats, _) in enumerate(items):
                chunk = flats[layer][start:stop]
                if not _block_is_finite(chunk):
                    raise _nonfinite_error(partner, layer)
                if k == 0:
                    np.multiply(chunk, factors[k], out=a, dtype=acc_dtype)
                else:
                    np.multiply(chunk, factors[k], out=t, dtype=acc_dtype)
                    np.add(a, t, out=a)
            out = avg[start:stop]
            np.divide(a, total_f, out=out, dtype=acc_dtype)
            if not _block_is_finite(out):  # finite inputs, so the sum overflowed
                raise _overflow_error(layer, acc_dtype, avg.dtype)


def _blocked_float64(
    items: list[tuple[str, list[np.ndarray], int]], layer: int, size: int, avg: np.ndarray, total: int
) -> None:
    """Float64 sum of ``n * block``: stage the blocks as float64 rows, one einsum per block.

    ``einsum`` rather than ``np.dot``: numpy's own single-threaded loop. OpenBLAS's threaded gemv
    was measured up to 15x slower when the cores are shared with other processes.
    """
    rows = len(items)
    block = max(1024, min(_BLOCKED_BLOCK, _STAGING_BYTES // (8 * rows), size))
    staging = np.empty((rows, block), dtype=np.float64)
    factors = np.array([n for _, _, n in items], dtype=np.float64)
    acc = np.empty(block, dtype=np.float64)
    f64 = np.dtype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: checked below
        for start in range(0, size, block):
            stop = min(start + block, size)
            width = stop - start
            for k, (partner, flats, _) in enumerate(items):
                chunk = flats[layer][start:stop]
                if not _block_is_finite(chunk):
                    raise _nonfinite_error(partner, layer)
                staging[k, :width] = chunk  # exact: float32 and integers up to 2**53 fit
            a = acc[:width]
            np.einsum("i,ij->j", factors, staging[:, :width], out=a)
            out = avg[start:stop]
            np.divide(a, total, out=out, dtype=f64)
            if not _block_is_finite(out):  # finite inputs, so the sum overflowed
                raise _overflow_error(layer, f64, avg.dtype)


def fedprox(
    updates: Iterable[UpdateLike], *, mu: float = 0.0, accumulate_dtype: DTypeLike = np.float32
) -> Weights:
    """FedProx, server side (Li et al., 2020): identical to :func:`fedavg`.

    FedProx changes the partners' local objective to ``F_k(w) + mu/2 * ||w - w_global||^2``
    (see :func:`fedprox_penalty`); the server still averages the returned weights by sample
    count. ``mu`` is accepted so a round's configuration can be passed through unchanged; it is
    validated (finite, >= 0) and otherwise unused here.
    """
    _check_mu(mu)
    return fedavg(updates, accumulate_dtype=accumulate_dtype)


def _check_mu(mu: object) -> float:
    if isinstance(mu, bool) or not isinstance(mu, Real) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"FedProx mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def fedprox_penalty(weights: Sequence[ArrayLike], global_weights: Sequence[ArrayLike], mu: float) -> float:
    """The FedProx proximal term ``mu/2 * sum_layers ||w - w_global||^2`` (Li et al., 2020).

    Reference implementation (float64) for the client-side loss term the trainer adds; the
    trainer's TensorFlow version is tested against it.

    Raises:
        ValueError: ``mu`` negative or not finite; different layer counts or shapes (naming the
            layer); NaN or Inf in either set of weights.
    """
    mu = _check_mu(mu)
    local = [np.asarray(a) for a in weights]
    glob = [np.asarray(a) for a in global_weights]
    if len(local) != len(glob):
        raise ValueError(
            f"weights have {len(local)} layers but global_weights have {len(glob)}; "
            "both must come from the same model"
        )
    total = 0.0
    for i, (w, g) in enumerate(zip(local, glob, strict=True)):
        if w.shape != g.shape:
            raise ValueError(f"layer {i}: weights have shape {w.shape} but global_weights have {g.shape}")
        diff = np.subtract(w, g, dtype=np.float64).reshape(-1)
        sq = float(np.dot(diff, diff))
        if not math.isfinite(sq):
            raise ValueError(f"layer {i}: weights or global_weights contain NaN or Inf")
        total += sq
    return 0.5 * mu * total


# --------------------------------------------------------------------------- robust strategies


def _stack(items: list[tuple[str, list[np.ndarray], int]], layer: int) -> np.ndarray:
    """The ``layer`` of every update stacked on a new first axis (N x layer shape)."""
    return np.stack([layers[layer] for _, layers, _ in items])


def _mean_axis0(stacked: np.ndarray) -> np.ndarray:
    """Mean over axis 0, in float64, that cannot overflow.

    The mean of finite values is finite, but their float64 sum may not be (two float64 values
    near 1.8e308). In that case the values are divided by the count before summing, and the
    result is clipped to the values' range, which the exact mean never leaves (rounding in the
    divided sum could otherwise step just past the largest float64).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean = stacked.mean(axis=0, dtype=np.float64)
        if not np.isfinite(mean).all():  # finite inputs: the sum overflowed
            mean = np.divide(stacked, stacked.shape[0], dtype=np.float64).sum(axis=0)
            np.clip(mean, stacked.min(axis=0), stacked.max(axis=0), out=mean)
    return np.asarray(mean)


def coordinate_median(updates: Iterable[UpdateLike]) -> Weights:
    """Coordinate-wise median (Yin et al., 2018), ignoring sample counts.

    Each coordinate is the median of that coordinate over the partners (the mean of the two
    middle values for an even number of partners, computed in float64 so that it neither
    overflows nor rounds twice). Robust to fewer than half the partners being arbitrary. Needs
    every update in memory, plus the N x layer stack of one layer at a time.
    """
    items = _materialize(updates)
    n = len(items)
    lo, hi = (n - 1) // 2, n // 2  # the middle rank(s): equal for odd n
    out: Weights = []
    for i, layer in enumerate(items[0][1]):
        # After partitioning, positions lo and hi hold exactly the values ranked lo and hi.
        middle = np.partition(_stack(items, i), sorted({lo, hi}), axis=0)[lo : hi + 1]
        out.append(np.asarray(_mean_axis0(middle), dtype=_result_dtype(layer.dtype)))
    return out


def _simplest_between(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator strictly between ``0 <= lo < hi``.

    Continued fractions (the Stern-Brocot tree): an integer inside the interval is the answer;
    otherwise both ends share the integer part ``n`` and the answer is ``n + 1/y`` for the
    simplest ``y`` between the reciprocals of the fractional parts.
    """
    n = math.floor(lo)
    if n + 1 < hi:
        return Fraction(n + 1)
    if lo == n:  # y ranges over (1 / (hi - n), infinity)
        return n + 1 / Fraction(math.floor(1 / (hi - n)) + 1)
    return n + 1 / _simplest_between(1 / (hi - n), 1 / (lo - n))


def _beta_fraction(beta: float | np.floating[Any]) -> Fraction:
    """The simplest fraction that rounds to the finite float ``beta >= 0`` (in its own precision).

    A configured ``0.29`` is 29/100, ``0.2`` is 1/5 and ``1/3`` is 1/3, although the binary floats
    are slightly off (``Fraction(0.29) * 100 < 29``) and the float products round either way
    (``0.29 * 100 == 28.999999999999996``). It is the rule behind Python's shortest ``repr``,
    extended from decimals to all fractions. A float just below 1/2 gives a fraction below 1/2,
    because 1/2 is itself a float: no tolerance is involved.
    """
    if beta == 0:
        return Fraction(0)
    x = np.asarray(beta)
    if x.dtype.itemsize > 8:  # long double: its neighbours do not convert exactly to float
        x = np.asarray(float(beta))
    exact = Fraction(float(x))
    below = Fraction(float(np.nextafter(x, -np.inf)))
    above = Fraction(float(np.nextafter(x, np.inf)))
    # Every number strictly between the midpoints to the neighbours rounds to beta.
    return _simplest_between((below + exact) / 2, (exact + above) / 2)


def _trim_count(beta: object, n: int) -> int:
    """``k = floor(beta * n)``, exactly, for ``0 <= beta < 1/2`` (Yin et al., 2018)."""
    bad = ValueError(
        "trimmed_mean beta must be a real number with 0 <= beta < 1/2 (Yin et al. 2018 trim "
        f"floor(beta*N) values from each end of every coordinate), got beta={beta!r}"
    )
    if isinstance(beta, bool) or not isinstance(beta, Real):
        raise bad
    if isinstance(beta, Rational):  # int, numpy integer, Fraction: exact as given
        frac = Fraction(int(beta.numerator), int(beta.denominator))
        if not 0 <= frac < Fraction(1, 2):
            raise bad
    else:
        x = beta if isinstance(beta, np.floating) else float(beta)
        if not (math.isfinite(x) and 0 <= x < 0.5):
            raise bad
        frac = _beta_fraction(x)
    # beta < 1/2 gives k <= beta*n < n/2, so n - 2k >= 1: at least one value is left to average.
    return math.floor(frac * n)


def trimmed_mean(updates: Iterable[UpdateLike], beta: float) -> Weights:
    """Coordinate-wise trimmed mean (Yin et al., 2018), ignoring sample counts.

    For every coordinate, drop the ``k = floor(beta * N)`` largest and ``k`` smallest of the N
    partners' values and average the remaining ``N - 2k`` (in float64). ``beta = 0`` is the
    plain mean. ``0 <= beta < 1/2`` as in the paper, which guarantees ``N - 2k >= 1`` for
    every N; ``beta`` need not be a multiple of ``1/N`` (``beta = 0.1`` with 5 partners trims
    nothing).

    ``k`` is computed exactly, without a tolerance: a float ``beta`` stands for the simplest
    fraction that rounds to it (``0.2`` is 1/5, ``0.29`` is 29/100, ``1/3`` is 1/3), so
    ``beta = 0.2`` with ``N = 5`` trims 1 and ``0.29`` with ``N = 100`` trims 29 whichever way
    the float product ``beta * N`` rounds, while ``beta = 0.4999999999`` with ``N = 4`` trims 1,
    not 2. :class:`fractions.Fraction` and integers are taken exactly as given.

    Raises:
        ValueError: ``beta`` not a real number, not finite, negative or ``>= 1/2`` (naming
            ``beta``), besides the input checks of :func:`fedavg`.
    """
    items = _materialize(updates)
    n = len(items)
    k = _trim_count(beta, n)
    out: Weights = []
    for i, layer in enumerate(items[0][1]):
        stacked = _stack(items, i)
        if k:
            # After partitioning, positions k..n-k-1 hold exactly the values ranked k..n-k-1.
            stacked = np.partition(stacked, (k, n - k - 1), axis=0)[k : n - k]
        out.append(np.asarray(_mean_axis0(stacked), dtype=_result_dtype(layer.dtype)))
    return out


# A squared distance is kept as (m, e), meaning m * 2**e with 0.5 <= m < 1, or (0.0, _ZERO_EXP)
# for zero, so that its exponent never overflows or underflows; Python ints hold the exponent.
_ScaledFloat: TypeAlias = tuple[float, int]
_ZERO_EXP = -(1 << 40)  # below the exponent of every nonzero value, so zero sorts first
_ZERO: _ScaledFloat = (0.0, _ZERO_EXP)
# The plain float64 dot product is used when it lands in [_SAFE_MIN_SQ, inf): element squares
# that underflowed then add at most size * 2**-1075 in absolute terms, a relative error of at most
# size * 2**-475, far below rounding. Anything smaller, and overflow, take the rescaled path.
_SAFE_MIN_SQ = 2.0**-600


def _scaled(x: float, shift: int = 0) -> _ScaledFloat:
    """``x * 2**shift`` (``x >= 0`` finite) as ``(m, e)``."""
    if x == 0:
        return _ZERO
    m, e = math.frexp(x)
    return m, e + shift


def _scaled_add(a: _ScaledFloat, b: _ScaledFloat) -> _ScaledFloat:
    """``a + b`` for nonnegative (m, e) values, rounded like a float64 addition."""
    if a[0] == 0:
        return b
    if b[0] == 0:
        return a
    top = max(a[1], b[1])
    # The smaller term may underflow to 0 here only when it is below 2**-1000 of the larger one.
    return _scaled(math.ldexp(a[0], a[1] - top) + math.ldexp(b[0], b[1] - top), top)


def _scaled_sq_distance(a: np.ndarray, b: np.ndarray, buf: np.ndarray) -> _ScaledFloat:
    """``||a - b||^2`` of two flat arrays as (m, e), for any finite values.

    Fast path: the float64 dot product of the difference. When it overflows (differences above
    ~1e154) or is tiny (differences near the subnormal range), the difference is rescaled by a
    power of two (exact) so that its largest element is in [0.5, 1) before squaring.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(a, b, out=buf, dtype=np.float64)
        sq = float(np.dot(buf, buf))
        if _SAFE_MIN_SQ <= sq < math.inf:
            return _scaled(sq)
        shift = 0
        if not np.isfinite(buf).all():
            # The difference itself overflowed: halve both operands. Exact, except for the last
            # bit of subnormal elements, which cannot matter next to a difference above 1.8e308.
            np.subtract(np.multiply(a, 0.5, dtype=np.float64), np.multiply(b, 0.5, dtype=np.float64), out=buf)
            shift = 1
    largest = float(np.max(np.abs(buf)))
    if largest == 0:
        return _ZERO
    k = math.frexp(largest)[1]
    np.ldexp(buf, -k, out=buf)  # now max |buf| is in [0.5, 1): no overflow, no harmful underflow
    return _scaled(float(np.dot(buf, buf)), 2 * (k + shift))


def _pairwise_sq_distances(items: list[tuple[str, list[np.ndarray], int]]) -> list[list[_ScaledFloat]]:
    """Squared Euclidean distances between the flattened updates (N x N), as (m, e) values."""
    n = len(items)
    dist = [[_ZERO] * n for _ in range(n)]
    for layer in range(len(items[0][1])):
        flats = [layers[layer].reshape(-1) for _, layers, _ in items]
        if flats[0].size == 0:
            continue
        buf = np.empty(flats[0].size, dtype=np.float64)
        for a in range(n):
            for b in range(a + 1, n):
                d = _scaled_add(dist[a][b], _scaled_sq_distance(flats[a], flats[b], buf))
                dist[a][b] = dist[b][a] = d
    return dist


def _krum_order(items: list[tuple[str, list[np.ndarray], int]], f: object, m: object) -> list[int]:
    n = len(items)
    if isinstance(f, bool) or not isinstance(f, Integral) or f < 0:
        raise ValueError(
            f"krum f (number of Byzantine partners tolerated) must be an integer >= 0, got {f!r}"
        )
    f = int(f)
    if n <= 2 * f + 2:
        raise ValueError(
            f"krum requires n > 2f + 2 (Blanchard et al. 2017); got n={n} partners, f={f}, "
            f"so at least {2 * f + 3} partners are needed"
        )
    if isinstance(m, bool) or not isinstance(m, Integral) or not 1 <= int(m) <= n - f:
        raise ValueError(
            f"krum m (updates selected) must be an integer with 1 <= m <= n - f = {n - f}, got {m!r}"
        )
    dist = _pairwise_sq_distances(items)
    closest = n - f - 2
    scores: list[_ScaledFloat] = []
    for i in range(n):
        # (m, e) values order as (e, m): m is normalized to [0.5, 1) and zero has the lowest e.
        nearest = sorted((d for j, d in enumerate(dist[i]) if j != i), key=lambda d: (d[1], d[0]))
        score = _ZERO
        for d in nearest[:closest]:  # smallest first
            score = _scaled_add(score, d)
        scores.append(score)
    order = sorted(range(n), key=lambda i: (scores[i][1], scores[i][0], i))  # ties: earlier update
    return order[: int(m)]


def krum_select(updates: Iterable[UpdateLike], f: int, m: int = 1) -> list[str]:
    """The partners Krum selects, best first (Blanchard et al., 2017); see :func:`krum`."""
    items = _materialize(updates)
    return [items[i][0] for i in _krum_order(items, f, m)]


def krum(updates: Iterable[UpdateLike], f: int, m: int = 1) -> Weights:
    """Krum / multi-Krum (Blanchard et al., 2017), ignoring sample counts.

    Each update's score is the sum of its squared Euclidean distances (over all layers) to its
    ``N - f - 2`` nearest other updates; the update with the lowest score is the one closest to
    a tight cluster of honest updates. ``m = 1`` returns (a copy of) that update; ``m > 1``
    (multi-Krum) returns the unweighted coordinate-wise mean of the ``m`` best-scored updates,
    as in the paper (Flower's ``aggregate_krum`` weights that mean by sample count instead).
    Ties go to the earlier update. Use :func:`krum_select` for the names.

    Distances and scores carry their binary exponent separately from a float64 mantissa, so
    they neither overflow (weights near ``1e300``, whose squares exceed float64) nor underflow
    (subnormal weights near ``1e-310``, whose squares are 0 in float64): up to float64
    rounding, the selection is the one made with an unbounded exponent, at any scale, and a
    Byzantine update of ``1e308`` is as far away as it should be. Multi-Krum's mean cannot
    overflow either.

    Raises:
        ValueError: ``N <= 2f + 2`` (Krum's assumption), ``f < 0``, ``m`` outside ``1..N-f``,
            besides the input checks of :func:`fedavg`.
    """
    items = _materialize(updates)
    chosen = _krum_order(items, f, m)
    out: Weights = []
    for i, layer in enumerate(items[0][1]):
        if len(chosen) == 1:
            out.append(np.array(items[chosen[0]][1][i], dtype=_result_dtype(layer.dtype)))
        else:
            stacked = np.stack([items[k][1][i] for k in chosen])
            out.append(np.asarray(_mean_axis0(stacked), dtype=_result_dtype(layer.dtype)))
    return out


# --------------------------------------------------------------------------- dispatcher

_STRATEGY_FUNCS: dict[str, Callable[..., Weights]] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
}


def aggregate(strategy: str, updates: Iterable[UpdateLike], **params: Any) -> Weights:
    """Aggregate ``updates`` with the named strategy.

    ======================  =========================================  =========================
    strategy                function                                   params
    ======================  =========================================  =========================
    ``fedavg``              :func:`fedavg`                             ``accumulate_dtype``
    ``fedprox``             :func:`fedprox` (= fedavg on the server)   ``mu``, ``accumulate_dtype``
    ``median``              :func:`coordinate_median`                  --
    ``trimmed_mean``        :func:`trimmed_mean`                       ``beta`` (required)
    ``krum``                :func:`krum`                               ``f`` (required), ``m``
    ======================  =========================================  =========================

    Raises:
        ValueError: unknown strategy (listing :data:`STRATEGIES`), unknown or missing params
            (listing the accepted ones), or anything the strategy itself refuses.
    """
    func = _STRATEGY_FUNCS.get(strategy) if isinstance(strategy, str) else None
    if func is None:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    sig = inspect.signature(func)
    accepted = [name for name in sig.parameters if name != "updates"]
    try:
        sig.bind(updates, **params)
    except TypeError as exc:
        raise ValueError(
            f"strategy {strategy!r}: {exc}; accepted params: {', '.join(accepted) or 'none'}"
        ) from exc
    return func(updates, **params)
