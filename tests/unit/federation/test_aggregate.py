"""Aggregation math (lepton_tasks.federation.aggregate): hand-checkable examples, every refusal, streaming."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import strategies
from lepton_tasks.federation import aggregate as agg
from lepton_tasks.federation.aggregate import (
    STRATEGIES,
    StreamingFedAvg,
    Update,
    aggregate,
    coordinate_median,
    fedavg,
    fedprox,
    fedprox_penalty,
    krum,
    krum_select,
    trimmed_mean,
)

F32 = np.float32
ACC_DTYPES = ["float32", "float64"]


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=F32)


def points(*coords: tuple[float, float]) -> list[tuple[str, list[np.ndarray], int]]:
    """One single-layer 2-D update per point, partners named a, b, c, ..."""
    return [(chr(ord("a") + i), [vec(*xy)], 1) for i, xy in enumerate(coords)]


def random_updates(
    n_partners: int = 5, seed: int = 0, shapes: tuple[tuple[int, ...], ...] = ((7, 5), (5,), (3, 4, 2))
) -> list[tuple[str, list[np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [
        (f"p{k}", [rng.standard_normal(s).astype(F32) for s in shapes], int(rng.integers(1, 1000)))
        for k in range(n_partners)
    ]


def exact_fedavg(updates: list[tuple[str, list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(n for _, _, n in updates)
    return [
        sum(w[i].astype(np.float64) * n for _, w, n in updates) / total for i in range(len(updates[0][1]))
    ]


@pytest.fixture()
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few elements, so the tiny test layers span several blocks and ragged ends."""
    monkeypatch.setattr(agg, "_STREAM_BLOCK", 7)
    monkeypatch.setattr(agg, "_BLOCKED_BLOCK", 6)
    monkeypatch.setattr(agg, "_STAGING_BYTES", 8 * 6 * 2)


# --------------------------------------------------------------------------- FedAvg


@pytest.mark.parametrize("acc", ACC_DTYPES)
@pytest.mark.parametrize("as_iter", [False, True], ids=["list", "generator"])
def test_fedavg_hand_example(acc: str, as_iter: bool) -> None:
    updates = [("alice", [vec(1, 2)], 1), ("bob", [vec(3, 4)], 3)]
    src = (u for u in updates) if as_iter else updates
    (out,) = fedavg(src, accumulate_dtype=acc)
    # (1*[1,2] + 3*[3,4]) / 4 = [10, 14] / 4
    np.testing.assert_array_equal(out, vec(2.5, 3.5))
    assert out.dtype == F32


def test_fedavg_keeps_layout_and_dtype() -> None:
    updates = [
        ("a", [np.ones((2, 3), F32), np.zeros(3, np.float64)], 2),
        ("b", [np.full((2, 3), 4, F32), np.full(3, 3.0)], 1),
    ]
    kernel, bias = fedavg(updates)
    assert kernel.shape == (2, 3) and kernel.dtype == F32
    assert bias.shape == (3,) and bias.dtype == np.float64
    np.testing.assert_array_equal(kernel, np.full((2, 3), 2, F32))  # (2*1 + 1*4) / 3
    np.testing.assert_array_equal(bias, np.full(3, 1.0))  # (0*2 + 3*1) / 3


def test_fedavg_integer_layers_average_to_float64() -> None:
    updates = [("a", [np.array([1, 2])], 1), ("b", [np.array([2, 2])], 1)]
    (out,) = fedavg(updates)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.5, 2.0])


@pytest.mark.parametrize("acc", ACC_DTYPES)
def test_fedavg_generator_equals_list(acc: str, small_blocks: None) -> None:
    updates = random_updates()
    from_list = fedavg(updates, accumulate_dtype=acc)
    from_gen = fedavg((u for u in updates), accumulate_dtype=acc)
    streaming = StreamingFedAvg(accumulate_dtype=acc)
    for partner, weights, n in updates:
        streaming.add(partner, weights, n)
    from_class = streaming.result()
    for a, b, c, exact in zip(from_list, from_gen, from_class, exact_fedavg(updates), strict=True):
        assert a.shape == b.shape == c.shape == exact.shape
        np.testing.assert_array_equal(b, c)  # the same accumulator
        if acc == "float32":
            np.testing.assert_array_equal(a, b)  # same sums in the same order
            np.testing.assert_allclose(a, exact, rtol=1e-5, atol=1e-6)
        else:
            # list: one einsum per block; stream: sequential float64. Both round the exact mean to float32.
            np.testing.assert_array_max_ulp(a, b, maxulp=1)
            np.testing.assert_array_max_ulp(a, exact.astype(F32), maxulp=1)


def test_fedavg_float64_is_at_least_as_close_as_float32() -> None:
    updates = random_updates(n_partners=40, seed=3, shapes=((1000,),))
    (exact,) = exact_fedavg(updates)
    (f32,) = fedavg(iter(updates), accumulate_dtype="float32")
    (f64,) = fedavg(iter(updates), accumulate_dtype="float64")
    assert np.abs(f64 - exact).max() <= np.abs(f32 - exact).max()
    np.testing.assert_allclose(f32, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("acc", ACC_DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_fedavg_of_identical_updates_returns_them(acc: str, seed: int, small_blocks: None) -> None:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((4, 5)).astype(F32), rng.standard_normal(9).astype(F32)]
    k = int(rng.integers(1, 12))
    updates = [(f"p{i}", [w.copy() for w in weights], int(rng.integers(1, 10_000))) for i in range(k)]
    for src in (updates, iter(updates)):
        out = fedavg(src, accumulate_dtype=acc)
        for got, want in zip(out, weights, strict=True):
            if acc == "float64":  # n*w is exact in float64 and so are the partial sums
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_fedavg_accepts_update_namedtuples_and_numpy_counts() -> None:
    updates = [Update("a", [vec(0)], np.int64(1)), Update("b", [vec(4)], np.int32(3))]
    np.testing.assert_array_equal(fedavg(updates)[0], vec(3))


def test_fedavg_non_contiguous_layers() -> None:
    base = np.arange(12, dtype=F32).reshape(3, 4)
    updates = [("a", [base.T], 1), ("b", [base.T * 3], 1)]
    for src in (updates, iter(updates)):
        (out,) = fedavg(src)
        np.testing.assert_array_equal(out, base.T * 2)


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=["0", "3x0"])
@pytest.mark.parametrize("acc", ACC_DTYPES)
@pytest.mark.parametrize("as_iter", [False, True], ids=["list", "generator"])
def test_fedavg_empty_layers_average_to_empty_arrays(shape: tuple[int, ...], acc: str, as_iter: bool) -> None:
    # A layer with no weights (e.g. a zero-width dense kernel) next to ordinary ones.
    updates = [
        ("alice", [np.zeros(shape, F32), vec(1, 2), np.zeros(shape, np.int64)], 1),
        ("bob", [np.ones(shape, F32), vec(3, 4), np.ones(shape, np.int64)], 3),
    ]
    empty, dense, empty_int = fedavg(iter(updates) if as_iter else updates, accumulate_dtype=acc)
    assert empty.shape == shape and empty.dtype == F32
    assert empty_int.shape == shape and empty_int.dtype == np.float64  # integer layers -> float64
    np.testing.assert_array_equal(dense, vec(2.5, 3.5))  # (1*[1,2] + 3*[3,4]) / 4


@pytest.mark.parametrize("acc", ACC_DTYPES)
def test_fedavg_model_with_only_empty_layers(acc: str, small_blocks: None) -> None:
    updates = [
        ("alice", [np.zeros((2, 0), F32), np.zeros(0)], 1),
        ("bob", [np.zeros((2, 0), F32), np.zeros(0)], 2),
    ]
    streaming = StreamingFedAvg(accumulate_dtype=acc)
    for partner, weights, n in updates:
        streaming.add(partner, weights, n)
    for out in (
        fedavg(updates, accumulate_dtype=acc),
        fedavg(iter(updates), accumulate_dtype=acc),
        streaming.result(),
    ):
        assert [(a.shape, a.dtype) for a in out] == [((2, 0), F32), ((0,), np.float64)]


@pytest.mark.parametrize(
    ("strategy", "params"),
    [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}), ("krum", {"f": 1, "m": 3})],
)
def test_robust_strategies_keep_empty_layers(strategy: str, params: dict[str, Any]) -> None:
    updates = [(p, [np.zeros((3, 0), F32), *w], 1) for p, w, _ in KRUM_POINTS]
    empty, dense = aggregate(strategy, updates, **params)
    assert empty.shape == (3, 0) and empty.dtype == F32
    assert dense.shape == (2,)


def test_streaming_fedavg_state() -> None:
    s = StreamingFedAvg()
    s.add("alice", [vec(1, 2)], 1)
    s.add("bob", [vec(3, 4)], 3)
    assert s.partners == ("alice", "bob")
    assert s.total_samples == 4
    first = s.result()
    np.testing.assert_array_equal(first[0], vec(2.5, 3.5))
    assert s.result() is first
    with pytest.raises(ValueError, match="finalized"):
        s.add("carol", [vec(0, 0)], 1)


def test_streaming_fedavg_structural_error_leaves_sum_untouched() -> None:
    s = StreamingFedAvg()
    s.add("alice", [vec(1, 2)], 1)
    with pytest.raises(ValueError, match="partner 'mallory': layer 0 has shape"):
        s.add("mallory", [vec(1, 2, 3)], 5)
    with pytest.raises(ValueError, match=r"partner 'mallory'.*> 0"):
        s.add("mallory", [vec(9, 9)], 0)
    s.add("bob", [vec(3, 4)], 3)
    np.testing.assert_array_equal(s.result()[0], vec(2.5, 3.5))
    assert s.partners == ("alice", "bob")


def test_streaming_fedavg_nan_poisons_the_accumulator() -> None:
    s = StreamingFedAvg()
    s.add("alice", [vec(1, 2), vec(1)], 1)
    with pytest.raises(ValueError, match="partner 'mallory': layer 1 contains NaN or Inf"):
        s.add("mallory", [vec(1, 2), vec(np.nan)], 1)
    with pytest.raises(ValueError, match="unusable: partner 'mallory'"):
        s.add("bob", [vec(3, 4), vec(1)], 1)
    with pytest.raises(ValueError, match="unusable: partner 'mallory'"):
        s.result()


def test_streaming_fedavg_nan_in_the_first_update() -> None:
    s = StreamingFedAvg()
    with pytest.raises(ValueError, match="partner 'mallory': layer 0 contains NaN or Inf"):
        s.add("mallory", [vec(1, np.inf)], 1)
    with pytest.raises(ValueError, match="unusable: partner 'mallory'"):
        s.add("alice", [vec(1, 2)], 1)


@pytest.mark.parametrize("as_iter", [False, True], ids=["list", "generator"])
def test_fedavg_float32_overflow_is_reported(as_iter: bool) -> None:
    updates = [("a", [vec(3e38)], 1), ("b", [vec(3e38)], 1)]
    with pytest.raises(ValueError, match=r"overflowed float32.*float64"):
        fedavg(iter(updates) if as_iter else updates)
    (out,) = fedavg(iter(updates) if as_iter else updates, accumulate_dtype="float64")
    np.testing.assert_array_equal(out, vec(3e38))


def test_streaming_fedavg_empty_and_bad_dtype() -> None:
    with pytest.raises(ValueError, match="no updates"):
        StreamingFedAvg().result()
    with pytest.raises(ValueError, match="accumulate_dtype must be float32 or float64"):
        StreamingFedAvg(accumulate_dtype="float16")
    with pytest.raises(ValueError, match="accumulate_dtype must be float32 or float64"):
        fedavg([("a", [vec(1)], 1)], accumulate_dtype="int8")


def test_fedprox_server_side_is_fedavg() -> None:
    updates = random_updates(seed=1)
    for got, want in zip(aggregate("fedprox", updates, mu=0.01), aggregate("fedavg", updates), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        fedprox(updates, mu=-1.0)


def test_fedprox_penalty_hand_example() -> None:
    w = [np.array([[1.0, 2.0]], F32), vec(3)]
    g = [np.zeros((1, 2), F32), vec(1)]
    # 0.5/2 * (1 + 4 + 4)
    assert fedprox_penalty(w, g, mu=0.5) == pytest.approx(2.25)
    assert fedprox_penalty(w, w, mu=10.0) == 0.0
    with pytest.raises(ValueError, match="layer 1: weights have shape"):
        fedprox_penalty(w, [g[0], vec(1, 2)], mu=0.5)
    with pytest.raises(ValueError, match="2 layers but global_weights have 1"):
        fedprox_penalty(w, g[:1], mu=0.5)
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        fedprox_penalty(w, g, mu=float("nan"))
    with pytest.raises(ValueError, match=r"layer 0: .*NaN or Inf"):
        fedprox_penalty([vec(np.inf, 0).reshape(1, 2), vec(3)], g, mu=0.5)


# --------------------------------------------------------------------------- robust strategies


def test_coordinate_median_odd_and_even() -> None:
    odd = [("a", [vec(1, -5)], 1), ("b", [vec(10, 0)], 100), ("c", [vec(3, 7)], 1)]
    np.testing.assert_array_equal(coordinate_median(odd)[0], vec(3, 0))  # ignores n
    even = [*odd, ("d", [vec(4, 1)], 1)]  # sorted x: 1 3 4 10 -> 3.5; y: -5 0 1 7 -> 0.5
    (out,) = aggregate("median", iter(even))
    np.testing.assert_array_equal(out, vec(3.5, 0.5))
    assert out.dtype == F32


def test_trimmed_mean_drops_both_ends() -> None:
    values = [1, 2, 3, 4, 100]
    updates = [(f"p{v}", [vec(v, -v)], 1) for v in values]
    # beta=0.2, n=5 -> k=1: mean(2, 3, 4) = 3 ; mean(-4, -3, -2) = -3
    np.testing.assert_array_equal(trimmed_mean(updates, beta=0.2)[0], vec(3, -3))
    np.testing.assert_array_equal(trimmed_mean(updates, beta=0.0)[0], vec(22, -22))
    # beta=0.4, n=5 -> k=2: the median
    np.testing.assert_array_equal(aggregate("trimmed_mean", updates, beta=0.4)[0], vec(3, -3))


def test_trimmed_mean_trim_count_is_exact_floor() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the intended trim is 29.
    updates = [(f"p{i}", [vec(i)], 1) for i in range(100)]
    (out,) = trimmed_mean(updates, beta=0.29)
    np.testing.assert_allclose(out, vec(np.mean(np.arange(29, 71))))


POWERS = [(f"p{v}", [vec(v)], 1) for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
# Values 2**0 .. 2**9, so every trim count gives a different mean:
# k=0 -> 1023/10, k=1 -> 510/8 = 63.75, k=2 -> 252/6 = 42, k=3 -> 120/4 = 30, k=4 -> 48/2 = 24.


@pytest.mark.parametrize(
    ("beta", "mean"),
    [
        (0.0, 102.3),
        (0.05, 102.3),  # 0.5 -> k=0: beta need not be a multiple of 1/N
        (0.1, 63.75),
        (0.3, 30.0),  # 0.3 * 10 = 3 exactly in the reals, whatever the float product does
        (0.35, 30.0),
        (0.4, 24.0),
        (0.4999999999, 24.0),  # 4.999999999 -> k=4, not 5 (which would trim everything)
        (0.49999999999999994, 24.0),  # the largest float below 1/2
        (Fraction(1, 5), 42.0),
        (np.float32(0.2), 42.0),  # read in float32 precision: 1/5, not 0.2000000029...
        (np.float64(0.3), 30.0),
    ],
)
def test_trimmed_mean_trims_floor_beta_n_from_each_end(beta: Any, mean: float) -> None:
    np.testing.assert_allclose(trimmed_mean(POWERS, beta=beta)[0], vec(mean), rtol=1e-7)


@pytest.mark.parametrize(
    ("beta", "n", "k"),
    [
        (0.2, 5, 1),  # 0.2 * 5: the float 0.2 is a little above 1/5; 1/5 * 5 = 1
        (0.29, 100, 29),  # float product 28.999999999999996; the float 0.29 itself is below 29/100
        (0.07, 100, 7),  # float product 7.000000000000001
        (0.1 + 0.2, 10, 3),  # 0.30000000000000004 is not the float nearest 3/10, but still trims 3
        (1 / 3, 3, 1),  # the float nearest 1/3 means 1/3 (Fraction(1/3) * 3 is just below 1)
        (Fraction(1, 3) - Fraction(1, 10**30), 3, 0),  # an exact fraction is taken as it is
        (0.4999999999, 2, 0),
        (0.4999999999, 4, 1),
        (0.49999999999999994, 2, 0),
        (1e-300, 10**300, 1),
        (0, 7, 0),
    ],
)
def test_trim_count_is_the_exact_floor(beta: Any, n: int, k: int) -> None:
    assert agg._trim_count(beta, n) == k


@pytest.mark.parametrize("n", [1, 2, 3])
def test_trimmed_mean_accepts_beta_just_below_half(n: int) -> None:
    # 0.4999999999 * n rounded to 9 decimals is n/2: trimming that much from each end leaves nothing.
    updates = [(f"p{i}", [vec(2**i)], 1) for i in range(n)]
    expected = {1: 1.0, 2: 1.5, 3: 2.0}[n]  # k = 0, 0, 1
    np.testing.assert_array_equal(trimmed_mean(updates, beta=0.4999999999)[0], vec(expected))


@pytest.mark.parametrize(
    ("beta", "n"),
    [(0.9, 1), (0.5, 1), (0.5, 4), (0.67, 3), (1, 10), (Fraction(1, 2), 3), (np.float32(0.5), 3)],
)
def test_trimmed_mean_refuses_beta_of_one_half_or_more(beta: Any, n: int) -> None:
    # Yin et al. define the trimmed mean for beta < 1/2, whatever N (even when floor(beta*N) is 0).
    updates = [(f"p{i}", [vec(i)], 1) for i in range(n)]
    with pytest.raises(ValueError, match=re.escape("0 <= beta < 1/2") + ".*" + re.escape(f"beta={beta!r}")):
        trimmed_mean(updates, beta=beta)


@pytest.mark.parametrize("beta", [-0.1, -1, float("nan"), float("inf"), "0.2", None, True])
def test_trimmed_mean_refuses_beta_that_is_not_a_fraction_below_half(beta: Any) -> None:
    with pytest.raises(ValueError, match=r"beta must be a real number with 0 <= beta < 1/2.*got beta="):
        trimmed_mean([("a", [vec(1)], 1)], beta=beta)


KRUM_POINTS = points((0, 0), (1, 0), (0, 1), (0.5, 0.5), (100, 100))
# Squared distances among the honest a..d: a-b 1, a-c 1, a-d .5, b-c 2, b-d .5, c-d .5; e is far.
# n=5, f=1 -> each score sums the n-f-2 = 2 smallest: a 1.5, b 1.5, c 1.5, d 1.0, e huge.


def test_krum_picks_the_center_of_the_honest_cluster() -> None:
    (out,) = krum(KRUM_POINTS, f=1)
    np.testing.assert_array_equal(out, vec(0.5, 0.5))
    assert out is not KRUM_POINTS[3][1][0]  # a copy, not the partner's array
    assert krum_select(KRUM_POINTS, f=1) == ["d"]


def test_multi_krum_averages_the_best_m_and_never_the_outlier() -> None:
    # m=2: d, then a (ties a=b=c go to the earliest) -> mean((.5,.5), (0,0))
    np.testing.assert_array_equal(krum(KRUM_POINTS, f=1, m=2)[0], vec(0.25, 0.25))
    # m=4 = n - f: all honest ones -> mean of a..d
    np.testing.assert_array_equal(aggregate("krum", iter(KRUM_POINTS), f=1, m=4)[0], vec(0.375, 0.375))
    assert krum_select(KRUM_POINTS, f=1, m=4) == ["d", "a", "b", "c"]


def test_krum_scores_all_layers() -> None:
    # Layer 0 alone would pick 'a'; layer 1 puts 'a' far away from everyone.
    updates = [
        ("a", [vec(0.5), vec(50)], 1),
        ("b", [vec(0), vec(0)], 1),
        ("c", [vec(1), vec(0.1)], 1),
        ("d", [vec(0.2), vec(0.2)], 1),
        ("e", [vec(0.9), vec(0.3)], 1),
    ]
    assert krum_select(updates, f=1)[0] != "a"


@pytest.mark.parametrize(("n", "f"), [(4, 1), (3, 1), (2, 0), (6, 2)])
def test_krum_requires_n_greater_than_2f_plus_2(n: int, f: int) -> None:
    updates = [(f"p{i}", [vec(i)], 1) for i in range(n)]
    with pytest.raises(ValueError, match=r"krum requires n > 2f \+ 2"):
        krum(updates, f=f)


@pytest.mark.parametrize(
    ("f", "m", "match"), [(-1, 1, "f .* >= 0"), (1, 0, "1 <= m <= n - f = 4"), (1, 5, "m")]
)
def test_krum_refuses_bad_f_and_m(f: int, m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        krum(KRUM_POINTS, f=f, m=m)


def scaled_points(scale: float, offset: float = 0.0) -> list[tuple[str, list[np.ndarray], int]]:
    """KRUM_POINTS moved by -offset and multiplied by scale, in float64."""
    return [(p, [(w[0].astype(np.float64) - offset) * scale], 1) for p, w, _ in KRUM_POINTS]


@pytest.mark.parametrize(
    ("scale", "offset"),
    [
        (1e300, 0),  # squared distances ~1e600 overflow float64
        (3e306, 50),  # coordinates up to +-1.5e308: even a - b overflows
        (1e-310, 0),  # subnormal weights: squared distances ~1e-620 underflow to 0
        (2.0**-1068, 0),  # deep in the subnormals (only 6 bits of precision left)
        (1e-160, 0),  # squares in the subnormal range, with partial precision
        (1.0, 0),
    ],
)
def test_krum_selection_does_not_depend_on_scale(scale: float, offset: float) -> None:
    # The same geometry as KRUM_POINTS: d is the center of the honest cluster, e the outlier.
    # Before scaling, every distance was inf (or 0) and Krum returned the first partner, a.
    updates = scaled_points(scale, offset)
    assert krum_select(updates, f=1) == ["d"]
    (out,) = krum(updates, f=1)
    np.testing.assert_array_equal(out, updates[3][1][0])
    assert sorted(krum_select(updates, f=1, m=4)) == ["a", "b", "c", "d"]  # never the outlier e


def test_krum_exact_ties_survive_extreme_scales() -> None:
    # At 1e300 every coordinate is an exact power-of-two multiple of 1e300, so scores tie exactly
    # as they do unscaled: d, then a=b=c in partner order.
    assert krum_select(scaled_points(1e300), f=1, m=4) == ["d", "a", "b", "c"]
    assert krum_select(scaled_points(2.0**-1068), f=1, m=4) == ["d", "a", "b", "c"]


@pytest.mark.parametrize(
    "updates",
    [
        # An honest cluster of ordinary weights and two attackers at the ends of float64.
        [
            *[
                (p, [w[0].astype(np.float64)], 1)
                for p, w, _ in points((0, 0), (1, 0), (0, 1), (0.5, 0.5), (2, 2))
            ],
            *[(name, [np.array([v, -v])], 1) for name, v in (("x", 1.7e308), ("y", -1.7e308))],
        ],
        # A layer that is huge but identical everywhere must not hide the layer that differs.
        [(p, [np.full(3, 1e300), w[0].astype(np.float64)], 1) for p, w, _ in KRUM_POINTS],
    ],
    ids=["attackers-at-max-float", "identical-huge-layer"],
)
def test_krum_mixed_magnitudes(updates: list[tuple[str, list[np.ndarray], int]]) -> None:
    # Global rescaling by the largest weight would flush the honest distances to 0 and pick 'a'.
    f = 2 if len(updates) == 7 else 1
    assert krum_select(updates, f=f) == ["d"]


def test_krum_extreme_squared_distances_are_exact() -> None:
    # (m, e) = m * 2**e; compare with exact rational arithmetic.
    cases = [
        (np.array([1.5e308, -1.5e308, 1.0]), np.array([-1.5e308, 1.5e308, 0.0])),  # a - b overflows
        (np.array([1e300, 3e299]), np.array([0.0, -1e300])),
        (np.array([5e-324, 1e-310]), np.array([0.0, -2e-310])),
        (np.array([1.0, 2.0]), np.array([1.0, 2.0])),
    ]
    for a, b in cases:
        m, e = agg._scaled_sq_distance(a, b, np.empty(a.size))
        exact = sum((Fraction(x) - Fraction(y)) ** 2 for x, y in zip(a.tolist(), b.tolist(), strict=True))
        if exact == 0:
            assert m == 0
        else:
            assert 0.5 <= m < 1
            assert abs(Fraction(m) * Fraction(2) ** e / exact - 1) < Fraction(1, 10**15)


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.25}),
        ("trimmed_mean", {"beta": 0}),
        ("krum", {"f": 0, "m": 4}),
    ],
)
def test_means_of_huge_values_do_not_overflow(strategy: str, params: dict[str, Any]) -> None:
    # The middle two are 1.5e308 and 1.6e308, and so is every mean here: (1.5 + 1.6 + 1.4 + 1.7) / 4 = 1.55.
    # Their float64 sum overflows; the mean of finite values must not be inf.
    updates = [
        (p, [np.array([v, -v])], 1) for p, v in zip("abcd", (1.7e308, 1.5e308, 1.6e308, 1.4e308), strict=True)
    ]
    (out,) = aggregate(strategy, updates, **params)
    np.testing.assert_allclose(out, [1.55e308, -1.55e308], rtol=1e-15)


def test_float32_median_of_huge_values_does_not_overflow() -> None:
    # The two middle values are averaged in float64: 3e38 + 3e38 overflows float32.
    updates = [(p, [vec(3e38, -3e38)], 1) for p in "abcd"]
    (out,) = coordinate_median(updates)
    assert out.dtype == F32
    np.testing.assert_array_equal(out, vec(3e38, -3e38))


# --------------------------------------------------------------------------- dispatcher


def test_strategies_is_the_one_canonical_tuple_of_names() -> None:
    assert STRATEGIES == ("fedavg", "fedprox", "median", "trimmed_mean", "krum")
    assert STRATEGIES is strategies.STRATEGIES  # re-exported, not a copy that could drift
    assert tuple(agg._STRATEGY_FUNCS) == STRATEGIES  # exactly what aggregate() dispatches, same order
    assert "STRATEGIES" in agg.__all__


def test_aggregate_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown aggregation strategy 'fedsgd'") as err:
        aggregate("fedsgd", [("a", [vec(1)], 1)])
    for name in STRATEGIES:
        assert name in str(err.value)


def test_aggregate_param_errors_are_value_errors() -> None:
    updates = [("a", [vec(1)], 1)]
    with pytest.raises(ValueError, match=r"strategy 'trimmed_mean'.*beta"):
        aggregate("trimmed_mean", updates)
    with pytest.raises(ValueError, match=r"strategy 'median'.*unexpected.*'beta'"):
        aggregate("median", updates, beta=0.1)
    with pytest.raises(ValueError, match=r"strategy 'krum'.*accepted params: f, m"):
        aggregate("krum", updates)


# --------------------------------------------------------------------------- refusals, every strategy

STRATEGY_CALLS: dict[str, Callable[[Any], list[np.ndarray]]] = {
    "fedavg-list": lambda u: fedavg(list(u)),
    "fedavg-generator": lambda u: fedavg(x for x in u),
    "fedavg-float64-list": lambda u: fedavg(list(u), accumulate_dtype="float64"),
    "fedavg-float64-generator": lambda u: fedavg(iter(u), accumulate_dtype="float64"),
    "fedprox": lambda u: aggregate("fedprox", u, mu=0.1),
    "median": lambda u: aggregate("median", iter(u)),
    "trimmed_mean": lambda u: aggregate("trimmed_mean", u, beta=0.1),
    "krum": lambda u: aggregate("krum", u, f=0),
}


def three_good() -> list[tuple[str, list[Any], Any]]:
    return [
        ("alice", [vec(1, 2), vec(0)], 1),
        ("bob", [vec(3, 4), vec(1)], 2),
        ("carol", [vec(5, 6), vec(2)], 3),
    ]


def with_carol(weights: list[Any], n: Any = 3) -> list[tuple[str, list[Any], Any]]:
    return [*three_good()[:2], ("carol", weights, n)]


BAD_INPUTS: dict[str, tuple[list[tuple[str, list[Any], Any]], str]] = {
    "nan": (with_carol([vec(5, 6), vec(np.nan)]), "partner 'carol': layer 1 contains NaN or Inf"),
    "inf": (with_carol([vec(5, -np.inf), vec(2)]), "partner 'carol': layer 0 contains NaN or Inf"),
    "layer-count": (with_carol([vec(5, 6)]), "partner 'carol': has 1 layers but partner 'alice' has 2"),
    "shape": (
        with_carol([vec(5, 6), vec(2, 2)]),
        r"partner 'carol': layer 1 has shape \(2,\) but partner 'alice' has \(1,\)",
    ),
    "dtype": (
        with_carol([vec(5, 6), np.array([2.0])]),
        "partner 'carol': layer 1 has dtype float64 but partner 'alice' has float32",
    ),
    "complex": (
        with_carol([vec(5, 6), np.array([1j])]),
        "partner 'carol': layer 1 has dtype complex128",
    ),
    "n-zero": (with_carol([vec(5, 6), vec(2)], n=0), r"partner 'carol': n \(sample count\) must be > 0"),
    "n-negative": (with_carol([vec(5, 6), vec(2)], n=-4), r"partner 'carol': n \(sample count\) must be > 0"),
    "n-float": (with_carol([vec(5, 6), vec(2)], n=2.5), "partner 'carol': n .* must be an integer"),
    "n-bool": (with_carol([vec(5, 6), vec(2)], n=True), "partner 'carol': n .* must be an integer"),
    "array-not-list": (
        [*three_good()[:2], ("carol", np.zeros((2, 2), F32), 3)],
        "partner 'carol': weights must be a list of arrays",
    ),
    "no-layers": (with_carol([]), "partner 'carol': weights hold no layers"),
    "ragged": (with_carol([vec(5, 6), [[1.0], [1.0, 2.0]]]), "partner 'carol': layer 1 is not an array"),
    "duplicate": ([*three_good(), three_good()[1]], "partner 'bob': appears more than once"),
    "empty-partner": ([*three_good(), ("", [vec(1, 2), vec(0)], 1)], "partner must be a non-empty string"),
    "not-a-triple": ([*three_good(), ("dave", [vec(1, 2), vec(0)])], r"\(partner, weights, n\) tuple"),
}


@pytest.mark.parametrize("strategy", list(STRATEGY_CALLS))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_strategy_refuses_bad_updates(strategy: str, case: str) -> None:
    updates, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        STRATEGY_CALLS[strategy](updates)


@pytest.mark.parametrize("strategy", list(STRATEGY_CALLS))
def test_every_strategy_refuses_no_updates(strategy: str) -> None:
    with pytest.raises(ValueError, match="no updates to aggregate"):
        STRATEGY_CALLS[strategy]([])


def test_nan_deep_inside_a_large_layer_is_found(small_blocks: None) -> None:
    big = np.zeros(1000, F32)
    bad = big.copy()
    bad[997] = np.nan

    def gen() -> Iterator[tuple[str, list[np.ndarray], int]]:
        yield "alice", [big], 1
        yield "zed", [bad], 1

    for call in (lambda: fedavg(gen()), lambda: fedavg(list(gen())), lambda: coordinate_median(gen())):
        with pytest.raises(ValueError, match="partner 'zed': layer 0 contains NaN or Inf"):
            call()


def test_huge_but_finite_values_are_not_mistaken_for_inf() -> None:
    # The dot-product fast path overflows on these; the exact check must accept them.
    updates = [("a", [vec(1e30, -1e30)], 1), ("b", [vec(1e30, -1e30)], 1)]
    np.testing.assert_array_equal(fedavg(updates, accumulate_dtype="float64")[0], vec(1e30, -1e30))
    np.testing.assert_array_equal(coordinate_median(updates)[0], vec(1e30, -1e30))
