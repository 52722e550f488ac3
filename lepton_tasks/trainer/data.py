"""Model-ready frame → model inputs (numpy only; no TensorFlow here).

A *model-ready frame* (written by ``normalize.transform``) has an int8 0/1 ``label`` column, float32 feature
columns (their names, in model order, are ``feature_names``) and, for sequence models, the raw user/item id
columns (str) and the timestamp column (int64 epoch seconds).

:func:`to_model_inputs` returns ``(x, y)`` with **row i of x and y describing row i of the frame** (frame
order is kept, whatever the sort used to build histories), so predictions line up with the frame:

- ``mlp``: ``x`` is a float32 matrix ``(n, len(feature_names))``.
- ``sequence``: ``x`` is a dict (see :mod:`lepton_tasks.trainer.model`):
  ``items`` int32 ``(n, L)``, ``features`` float32 ``(n, L, len(feature_names) + 2)``, ``item`` int32
  ``(n,)``, ``user`` int32 ``(n,)``. A row's history is its user's events sorted by timestamp, then by the
  ``tie_break`` columns, then by frame position (a total, deterministic order); the window holds the last
  ``L`` events up to and including the row's own event, oldest first, zero-padded on the right. Two channels
  follow the contract features (:data:`EXTRA_CHANNELS`): ``prev_label``, the label of the event *before* each
  step (0 for a user's first event), so a row's own label is never among its inputs; and ``same_item``, 1
  where a *past* step shows the row's own item (a repeat view — a signal hashed-id embeddings learn poorly).

``y`` is float32 ``(n,)`` or ``None`` when the frame has no ``label`` column (prediction only; sequence
histories then see 0 for every past label).

Ids are hashed with :func:`hash_ids`: pandas' SipHash-2-4 with its fixed default key, identical in every
process and on every machine (pinned by a unit test), into buckets ``1..hash_buckets-1``; ``0`` is padding.
Memory: the sequence ``features`` array is ``n·L·(F+2)·4`` bytes (100k rows, L=10, F=20: 88 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lepton_tasks.core.contracts import ModelSpec

LABEL = "label"
#: per-event channels appended to the contract features of a sequence model, in this order
EXTRA_CHANNELS = ("prev_label", "same_item")
#: tie-break column used when present and no ``tie_break`` is given
DEFAULT_TIE_BREAK = ("event_id",)

ModelX = np.ndarray | dict[str, np.ndarray]


def hash_ids(values: Sequence | np.ndarray | pd.Series, buckets: int) -> np.ndarray:
    """Hash ids (compared as strings) into ``1..buckets-1`` as int32.

    Deterministic across processes and machines.
    """
    if buckets < 2:
        raise ValueError(f"hash_buckets must be >= 2 (bucket 0 is padding), got {buckets}")
    arr = pd.Series(values, copy=False)
    if arr.isna().any():
        raise ValueError("ids must not be missing")
    strings = arr.astype(str).to_numpy(dtype=object)
    h = pd.util.hash_array(strings, categorize=True)  # uint64, fixed key "0123456789123456"
    return (1 + (h % np.uint64(buckets - 1))).astype(np.int32)


def labels(frame: pd.DataFrame) -> np.ndarray | None:
    """The ``label`` column as float32 0/1, or ``None`` if absent; raises if it holds anything but 0/1."""
    if LABEL not in frame.columns:
        return None
    col = frame[LABEL]
    if col.isna().any():
        raise ValueError(f"column {LABEL!r} has {int(col.isna().sum())} missing values")
    y = col.to_numpy(dtype=np.float32)
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"column {LABEL!r} must be 0/1, found {sorted(set(y[bad].tolist()))[:5]}")
    return y


def feature_matrix(frame: pd.DataFrame, feature_names: Sequence[str]) -> np.ndarray:
    """The float32 matrix of ``feature_names`` (in that order).

    Raises on missing columns or non-finite values.
    """
    names = list(feature_names)
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing[:10]}{' …' if len(missing) > 10 else ''}")
    if len(set(names)) != len(names):
        raise ValueError("feature_names has duplicates")
    x = frame[names].to_numpy(dtype=np.float32) if names else np.zeros((len(frame), 0), np.float32)
    if not np.isfinite(x).all():
        cols = [names[j] for j in np.flatnonzero(~np.isfinite(x).all(axis=0))]
        raise ValueError(f"feature columns {cols[:10]} hold NaN/inf: the frame is not model-ready")
    return np.ascontiguousarray(x)


def n_rows(x: ModelX) -> int:
    """Number of examples in model inputs ``x``."""
    return int(len(x["item"]) if isinstance(x, dict) else len(x))


def _timestamps(col: pd.Series) -> np.ndarray:
    if col.isna().any():
        raise ValueError(f"timestamp column {col.name!r} has missing values")
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return col.astype("datetime64[ns]").to_numpy().astype(np.int64)
    if pd.api.types.is_numeric_dtype(col.dtype):
        return col.to_numpy(dtype=np.int64)
    raise ValueError(f"timestamp column {col.name!r} must be int64 epoch seconds, got {col.dtype}")


def history_order(
    frame: pd.DataFrame, user_column: str, timestamp_column: str, tie_break: Sequence[str] = ()
) -> np.ndarray:
    """Permutation of the frame's rows sorted by (user, timestamp, *tie_break, frame position)."""
    n = len(frame)
    keys = {
        "u": frame[user_column].astype(str).to_numpy(dtype=object),
        "t": _timestamps(frame[timestamp_column]),
    }
    for i, c in enumerate(tie_break):
        col = frame[c]
        keys[f"k{i}"] = (
            col.to_numpy()
            if pd.api.types.is_numeric_dtype(col.dtype)
            else col.astype(str).to_numpy(dtype=object)
        )
    keys["pos"] = np.arange(n)
    k = pd.DataFrame(keys)  # fresh RangeIndex: the sorted index *is* the permutation
    return k.sort_values(list(keys), kind="mergesort").index.to_numpy()


def window_indices(sorted_users: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows already sorted by (user, time): ``(idx, valid)`` of shape ``(n, length)``.

    ``idx[p, j]`` is the sorted position of the j-th event (oldest first) of row p's window — the last
    ``length`` events of its user up to and including p — and ``valid`` marks real events (the rest is padding
    on the right, with ``idx`` 0). Vectorized: O(n·length) integers, no Python loop over rows.
    """
    n = len(sorted_users)
    pos = np.arange(n)
    if n == 0:
        return np.zeros((0, length), np.int64), np.zeros((0, length), bool)
    new_user = np.empty(n, bool)
    new_user[0] = True
    new_user[1:] = sorted_users[1:] != sorted_users[:-1]
    start = np.maximum.accumulate(np.where(new_user, pos, 0))
    count = np.minimum(pos - start + 1, length)  # events in the window
    steps = np.arange(length)
    valid = steps[None, :] < count[:, None]
    idx = (pos - count + 1)[:, None] + steps[None, :]
    return np.where(valid, idx, 0), valid


def to_model_inputs(
    frame: pd.DataFrame,
    spec: ModelSpec,
    feature_names: Sequence[str],
    *,
    tie_break: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
) -> tuple[ModelX, np.ndarray | None]:
    """Model inputs and labels for ``frame`` (see the module docstring for shapes and ordering).

    ``targets`` (bool, one per frame row) keeps only those rows as examples, in frame order, while histories
    still read every row: pass a partner's whole event log with ``targets=holdout_mask`` to evaluate held-out
    events with their full history (a row-level split otherwise leaves each split with holes in every user's
    history). ``None`` keeps every row.
    """
    y = labels(frame)
    feats = feature_matrix(frame, feature_names)
    keep = target_mask(targets, len(frame))
    if spec.kind == "mlp":
        return (feats, y) if keep is None else (feats[keep], None if y is None else y[keep])

    user_col, item_col, ts_col = spec.user_column, spec.item_column, spec.timestamp_column
    if not (user_col and item_col and ts_col):
        raise ValueError("a sequence model spec needs user_column, item_column and timestamp_column")
    missing = [c for c in (user_col, item_col, ts_col) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks sequence columns {missing}")
    if tie_break is None:
        tie_break = [c for c in DEFAULT_TIE_BREAK if c in frame.columns]
    else:
        absent = [c for c in tie_break if c not in frame.columns]
        if absent:
            raise ValueError(f"frame lacks tie-break columns {absent}")
    length = spec.sequence_length
    n = len(frame)

    item_ids = hash_ids(frame[item_col], spec.hash_buckets)
    user_ids = hash_ids(frame[user_col], spec.hash_buckets)
    order = history_order(frame, user_col, ts_col, tie_break)
    sorted_users = frame[user_col].astype(str).to_numpy(dtype=object)[order]
    idx_sorted, valid_sorted = window_indices(sorted_users, length)

    # per-event channels in sorted order: the contract features + "previous event of this user was positive"
    prev_label = np.zeros(n, np.float32)
    if y is not None and n > 1:
        y_sorted = y[order]
        same_user = sorted_users[1:] == sorted_users[:-1]
        prev_label[1:] = np.where(same_user, y_sorted[:-1], 0.0)
    per_event = np.concatenate([feats[order], prev_label[:, None]], axis=1)

    # back to frame order (and to the target rows) before gathering, so the big arrays are built once
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    rows = inverse if keep is None else inverse[keep]
    idx, valid = idx_sorted[rows], valid_sorted[rows]
    items = np.where(valid, item_ids[order][idx], 0).astype(np.int32)
    current = item_ids if keep is None else item_ids[keep]
    width = per_event.shape[1]
    features = np.empty((len(rows), length, width + 1), np.float32)
    features[:, :, :width] = per_event[idx]
    own_step = valid.sum(axis=1) - 1  # the row's own event is the last real step
    same = valid & (items == current[:, None])
    same[np.arange(len(rows)), own_step] = False
    features[:, :, width] = same
    features[~valid] = 0.0
    x = {
        "items": items,
        "features": features,
        "item": current,
        "user": user_ids if keep is None else user_ids[keep],
    }
    return x, (y if keep is None or y is None else y[keep])


def target_mask(targets: np.ndarray | None, n: int) -> np.ndarray | None:
    """Validate a ``targets`` row mask for a frame of ``n`` rows (``None`` passes through)."""
    if targets is None:
        return None
    keep = np.asarray(targets)
    if keep.dtype != bool or keep.shape != (n,):
        raise ValueError(
            f"targets must be a boolean array with one value per frame row ({n}), "
            f"got {keep.dtype}{keep.shape}"
        )
    return keep
