"""E-commerce: synthetic product-view events per retailer, with a signal a sequence model can learn.

Each row is one product view: ``event_id, user_id, item_id, category, price, timestamp, purchased``
(``timestamp`` ISO-8601 UTC, ``purchased`` ``"1"``/``"0"``). Items come from one shared catalog (so item ids
mean the same thing at every retailer); users are per retailer.

Ground truth (what a model can discover): every user has a preferred category (drawn from the retailer's mix)
and five favourite items in it. A view is more likely to end in a purchase when the item is in the user's
preferred category (visible from the user's *history*) and more still when it is a favourite (a repeat view),
and less likely the pricier the item is relative to its category. Retailers are heterogeneous:

* ``retailer_a`` — fashion-led, mid prices, ~8% purchases;
* ``retailer_b`` — electronics-led, high prices, ~3% purchases;
* ``retailer_c`` — grocery-led, low prices, ~17% purchases.

Everything is a pure function of ``(seed, retailer, block index)``: :func:`generate` and :func:`write_csv`
give the same rows, and :func:`write_csv` streams ~1 GB (≈15 M rows) in bounded memory. About 0.1% of
prices are outliers (×40) to exercise clipping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DATASET = "ecommerce"
PARTNERS = ["retailer_a", "retailer_b", "retailer_c"]
CATEGORIES = ["books", "electronics", "fashion", "grocery", "home", "toys"]
COLUMNS = ["event_id", "user_id", "item_id", "category", "price", "timestamp", "purchased"]
N_ITEMS = 6000  # item k has category CATEGORIES[k % 6]
BLOCK_ROWS = 100_000
_BASE_PRICE = np.array([15.0, 250.0, 45.0, 6.0, 60.0, 25.0])
_START = np.datetime64("2024-01-01T00:00:00", "s")
_MEAN_GAP_S = 3

RETAILERS: dict[str, dict] = {
    "retailer_a": {"mix": [0.15, 0.05, 0.45, 0.05, 0.20, 0.10], "price_level": 1.0, "rate": 0.015},
    "retailer_b": {"mix": [0.10, 0.50, 0.05, 0.05, 0.20, 0.10], "price_level": 1.3, "rate": 0.006},
    "retailer_c": {"mix": [0.10, 0.05, 0.05, 0.55, 0.15, 0.10], "price_level": 0.8, "rate": 0.04},
}


def _catalog_prices() -> np.ndarray:
    rng = np.random.default_rng(20240101)  # the catalog is the same world for every seed
    cats = np.arange(N_ITEMS) % len(CATEGORIES)
    return _BASE_PRICE[cats] * rng.lognormal(0.0, 0.45, N_ITEMS)


_PRICES = _catalog_prices()


def _n_users(total_rows: int) -> int:
    return max(20, total_rows // 25)


def _block(retailer: str, seed: int, start: int, n: int, n_users: int) -> pd.DataFrame:
    """Rows ``start .. start+n-1`` of ``retailer``'s event log (pure function of its arguments)."""
    cfg = RETAILERS[retailer]
    r_index = PARTNERS.index(retailer)
    prefix = "abc"[r_index]
    rng = np.random.default_rng([seed, r_index, start])
    mix = np.asarray(cfg["mix"]) / np.sum(cfg["mix"])
    n_per_cat = N_ITEMS // len(CATEGORIES)

    # users: heavy-tailed activity; per-user preference is a deterministic function of (seed, user)
    weights = 1.0 / (np.arange(n_users) + 10.0)
    user = rng.choice(n_users, size=n, p=weights / weights.sum())
    golden = np.modf((user + 1) * 0.6180339887498949 + (seed % 1000) * 0.001)[0]
    pref = np.minimum(np.searchsorted(np.cumsum(mix), golden, side="right"), len(CATEGORIES) - 1)

    kind = rng.random(n)
    fav_j = rng.integers(0, 5, n)
    fav_item = pref + len(CATEGORIES) * ((user * 7919 + fav_j * 104729 + seed) % n_per_cat)
    pref_item = pref + len(CATEGORIES) * rng.integers(0, n_per_cat, n)
    other_cat = np.minimum(np.searchsorted(np.cumsum(mix), rng.random(n), side="right"), len(CATEGORIES) - 1)
    other_item = other_cat + len(CATEGORIES) * rng.integers(0, n_per_cat, n)
    is_fav = kind < 0.3
    item = np.where(is_fav, fav_item, np.where(kind < 0.6, pref_item, other_item))
    cat = item % len(CATEGORIES)

    price = _PRICES[item] * cfg["price_level"] * rng.normal(1.0, 0.03, n)
    price = np.where(rng.random(n) < 0.001, price * 40.0, price)
    price = np.round(np.maximum(price, 0.01), 2)

    rel_price = np.log(price / (_BASE_PRICE[cat] * cfg["price_level"]))
    logit = (
        np.log(cfg["rate"] / (1 - cfg["rate"]))
        + 1.3 * (cat == pref)
        + 1.2 * is_fav
        - 0.8 * rel_price
        + rng.normal(0.0, 0.3, n)
    )
    purchased = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

    index = start + np.arange(n)
    seconds = index * _MEAN_GAP_S + rng.integers(0, _MEAN_GAP_S, n)
    timestamps = np.datetime_as_string(_START + seconds.astype("timedelta64[s]"), unit="s")

    def ids(letter: str, values: np.ndarray, width: int) -> pd.Series:
        return (f"{letter}" + pd.Series(values).astype("str").str.zfill(width)).astype("str")

    return pd.DataFrame(
        {
            "event_id": ids(f"{prefix}-e", index, 9),
            "user_id": ids(f"{prefix}-u", user, 6),
            "item_id": ids("i", item, 5),
            "category": pd.Series(np.asarray(CATEGORIES)[cat], dtype="str"),
            "price": price,
            "timestamp": pd.Series(timestamps, dtype="str") + "Z",
            "purchased": pd.Series(np.where(purchased, "1", "0"), dtype="str"),
        }
    )


def _iter_blocks(retailer: str, seed: int, n_rows: int, block_rows: int = BLOCK_ROWS):
    n_users = _n_users(n_rows)
    for start in range(0, n_rows, block_rows):
        yield _block(retailer, seed, start, min(block_rows, n_rows - start), n_users)


def retailer_frame(retailer: str, seed: int = 0, rows: int = 5000) -> pd.DataFrame:
    """``rows`` events of one retailer."""
    return pd.concat(list(_iter_blocks(retailer, seed, rows)), ignore_index=True)


def generate(seed: int = 0, rows_per_partner: int = 5000) -> dict[str, pd.DataFrame]:
    """Partner → its events (raw, as dropped). Deterministic for ``(seed, rows_per_partner)``."""
    return {p: retailer_frame(p, seed, rows_per_partner) for p in PARTNERS}


def write_csv(
    path: Path, n_rows: int, seed: int = 0, *, retailer: str = "retailer_a", block_rows: int = BLOCK_ROWS
) -> int:
    """Stream ``n_rows`` events of ``retailer`` to ``path`` as a partner's CSV; returns the bytes written.

    Memory is bounded by ``block_rows`` (~100k rows ≈ 20 MB), so ~1 GB files (≈15 M rows) are fine. With the
    default ``block_rows`` the rows equal ``retailer_frame(retailer, seed, n_rows)``.
    """
    from lepton_tasks.ops.scenarios import to_csv_bytes

    path = Path(path)
    written = 0
    with path.open("wb") as fh:
        first = True
        for block in _iter_blocks(retailer, seed, n_rows, block_rows):
            data = to_csv_bytes(block, header=first)
            fh.write(data)
            written += len(data)
            first = False
        if first:  # n_rows == 0: header only
            data = (",".join(COLUMNS) + "\n").encode()
            fh.write(data)
            written += len(data)
    return written
