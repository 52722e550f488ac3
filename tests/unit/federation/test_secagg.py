"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ graph of Bell et al. 2020): exact ring sums, dropouts,
failure below the threshold, uniform-looking masked updates, fixed-point error bound, share encryption."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from scipy.stats import chisquare

from lepton_tasks.federation.secagg import (
    AdvertisedKeys,
    EncryptedShare,
    FixedPoint,
    ReceivedShare,
    RevealedShares,
    RoundConfig,
    Share,
    SiteSecrets,
    combine_secret,
    combine_secrets,
    generate_site_keys,
    harary_graph,
    mask_input,
    receive_shares,
    reveal_shares,
    share_keys,
    simulate_round,
    split_secret,
    unmask,
)


def _sites(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def _ring_inputs(sites: list[str], size: int, bits: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if bits == 32 else np.uint64
    return {s: rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True) for s in sites}


def _ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total: np.ndarray = np.sum(vectors, axis=0, dtype=vectors[0].dtype)  # wraps modulo 2^k
    return total


def _threshold(n: int, degree: int | None) -> int:
    """The smallest valid threshold: more than half of the largest set of shareholders."""
    most = n if degree is None else degree + 1 + (degree % 2) * (n % 2)
    return most // 2 + 1


@dataclass
class _Round:
    """Rounds 0-2 run by hand, so a test can tamper with what crosses between the parties."""

    config: RoundConfig
    secrets: dict[str, SiteSecrets]
    advertised: dict[str, AdvertisedKeys]
    outbox: dict[str, list[EncryptedShare]]
    received: dict[str, dict[str, ReceivedShare]]
    inputs: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]

    def inbox(self, site: str) -> list[EncryptedShare]:
        return [ct for cts in self.outbox.values() for ct in cts if ct.recipient == site]


def _run_to_masking(n: int, threshold: int, size: int = 64, round_id: str = "r1", seed: int = 0) -> _Round:
    config = RoundConfig(round_id, tuple(_sites(n)), threshold)
    secrets = {s: generate_site_keys(s) for s in config.sites}
    advertised = {s: k.public() for s, k in secrets.items()}
    outbox = {s: share_keys(config, secrets[s], advertised) for s in config.sites}
    r = _Round(config, secrets, advertised, outbox, {}, _ring_inputs(list(config.sites), size, 32, seed), {})
    for s in config.sites:
        r.received[s] = receive_shares(config, secrets[s], advertised, r.inbox(s))
        r.masked[s] = mask_input(config, secrets[s], advertised, r.received[s], r.inputs[s])
    return r


# ----------------------------------------------------------------------------- masks cancel


@pytest.mark.parametrize(
    ("n", "size", "bits", "degree", "seed"),
    [
        (3, 1, 32, None, 0),
        (3, 1000, 64, None, 1),
        (4, 65_537, 32, None, 2),  # more than one keystream block, and a partial one
        (7, 333, 32, None, 3),
        (7, 100, 64, 4, 4),
        (10, 5000, 32, None, 5),
        (12, 257, 32, 4, 6),
        (13, 999, 32, 5, 7),  # odd n, odd degree: one site has degree + 1 neighbours
    ],
)
def test_masks_cancel_exactly(n: int, size: int, bits: int, degree: int | None, seed: int) -> None:
    inputs = _ring_inputs(_sites(n), size, bits, seed)
    result = simulate_round(inputs, _threshold(n, degree), degree=degree)
    np.testing.assert_array_equal(result.total, _ring_sum(list(inputs.values())))
    assert result.survivors == tuple(sorted(inputs))
    for s, y in result.masked.items():  # and every upload was actually masked
        assert y.dtype == inputs[s].dtype
        assert np.count_nonzero(y == inputs[s]) <= size // 1000 + 2


def test_masking_is_fresh_per_round_and_differs_per_site() -> None:
    inputs = {s: np.zeros(4096, np.uint32) for s in _sites(3)}
    a = simulate_round(inputs, 2, round_id="round-1")
    b = simulate_round(inputs, 2, round_id="round-1")
    np.testing.assert_array_equal(a.total, 0)
    assert not np.array_equal(a.masked["site-00"], b.masked["site-00"])  # fresh keys every round
    assert not np.array_equal(a.masked["site-00"], a.masked["site-01"])


# ----------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize(
    ("n", "threshold", "degree", "before_sharing", "after_masking", "before_unmasking"),
    [
        (3, 2, None, [], ["site-01"], []),
        (5, 3, None, [], ["site-00", "site-04"], []),
        (8, 5, None, ["site-07"], ["site-02"], ["site-05"]),
        (10, 6, None, [], ["site-01", "site-03", "site-09"], ["site-04"]),
        # SecAgg+: 7 shareholders per site, at most 3 of them lost, so every secret keeps 4 = threshold
        (12, 4, 6, ["site-11"], ["site-00"], ["site-03"]),
    ],
)
def test_dropouts_are_recovered(
    n: int,
    threshold: int,
    degree: int | None,
    before_sharing: list[str],
    after_masking: list[str],
    before_unmasking: list[str],
) -> None:
    inputs = _ring_inputs(_sites(n), 777, 32, seed=n)
    result = simulate_round(
        inputs,
        threshold,
        degree=degree,
        dropouts_before_sharing=before_sharing,
        dropouts_after_masking=after_masking,
        dropouts_before_unmasking=before_unmasking,
    )
    survivors = sorted(set(inputs) - set(before_sharing) - set(after_masking))
    assert list(result.survivors) == survivors
    np.testing.assert_array_equal(result.total, _ring_sum([inputs[s] for s in survivors]))
    # the masked inputs that did arrive do not sum to the answer without the unmasking
    assert not np.array_equal(_ring_sum(list(result.masked.values())), result.total)


# ----------------------------------------------------------------------------- below threshold


def test_too_few_revealed_shares_fail_the_round_clearly() -> None:
    inputs = _ring_inputs(_sites(5), 10, 32, seed=0)
    with pytest.raises(
        ValueError, match=r"self-mask seed of surviving site 'site-0\d'.*2 shares available, 3 needed"
    ):
        simulate_round(inputs, 3, dropouts_before_unmasking=["site-00", "site-01", "site-02"])


def test_too_few_survivors_fail_the_round_clearly() -> None:
    inputs = _ring_inputs(_sites(5), 10, 32, seed=0)
    with pytest.raises(ValueError, match=r"round fails: 2 sites survived masking, threshold needs 3"):
        simulate_round(inputs, 3, dropouts_after_masking=["site-00", "site-01", "site-02"])
    r = _run_to_masking(5, 3)
    survivors = ["site-00", "site-01"]
    with pytest.raises(ValueError, match=r"round fails: 2 masked inputs arrived, threshold needs 3"):
        unmask(r.config, r.advertised, r.config.sites, {s: r.masked[s] for s in survivors}, [])


def test_too_few_shares_of_a_dropped_site_fail_the_round_clearly() -> None:
    b_shares = {"site-01": [Share(i, bytes(16)) for i in (1, 2, 3)]}
    s_shares = {"site-02": [Share(i, bytes(32)) for i in (1, 4)]}
    assert set(combine_secrets(b_shares, 3)) == {"site-01"}
    with pytest.raises(ValueError, match=r"mask key of dropped site 'site-02'.*2 shares available, 3 needed"):
        combine_secrets(s_shares, 3, "mask key of dropped site")
    duplicate = [Share(1, bytes(32)), Share(1, bytes(32)), Share(2, bytes(32))]
    with pytest.raises(ValueError, match=r"2 shares available, 3 needed"):
        combine_secret(duplicate, 3)


def test_too_few_key_holders_fail_before_masking() -> None:
    config = RoundConfig("r1", tuple(_sites(5)), 3)
    secrets = {s: generate_site_keys(s) for s in config.sites}
    advertised = {s: secrets[s].public() for s in ("site-00", "site-01")}
    with pytest.raises(ValueError, match=r"round fails: 2 of site 'site-00'.*threshold needs 3"):
        share_keys(config, secrets["site-00"], advertised)


# ----------------------------------------------------------------------------- privacy of one upload


def _seeded(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_masked_update_looks_uniform_in_the_ring(bits: int) -> None:
    """Chi-square (256 bins, 2^17 samples, fixed keys so the test is deterministic) on the top and
    bottom byte of one site's masked update, for an all-zero input and for a real quantized update,
    against the uniform distribution on Z_2^k; and the same test rejects the unmasked update."""
    size = 1 << 17
    fp = FixedPoint(1.0, max_sites=3, bits=bits)
    update = fp.quantize(np.random.default_rng(0).normal(0, 0.05, size))
    shift = bits - 8
    for x in (np.zeros(size, fp.dtype), update):
        inputs = {"a": x, "b": x.copy(), "c": x.copy()}
        y = simulate_round(inputs, 2, random_bytes=_seeded(bits)).masked["b"]
        for byte in (y >> np.asarray(shift, y.dtype), y & np.asarray(0xFF, y.dtype)):
            assert chisquare(np.bincount(byte.astype(np.int64), minlength=256)).pvalue > 1e-3
    unmasked_top = (update >> np.asarray(shift, update.dtype)).astype(np.int64)
    assert chisquare(np.bincount(unmasked_top, minlength=256)).pvalue < 1e-12


# ----------------------------------------------------------------------------- fixed point


@pytest.mark.parametrize(("n_sites", "bits", "seed"), [(1, 32, 0), (3, 32, 1), (20, 32, 2), (7, 64, 3)])
def test_quantization_error_bound_holds(n_sites: int, bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fp = FixedPoint(clip=2.0, max_sites=20, bits=bits)
    xs = [rng.uniform(-3, 3, 20_000) for _ in range(n_sites)]  # a third of the values get clipped
    total = _ring_sum([fp.quantize(x) for x in xs])
    exact = np.sum([np.clip(x, -2.0, 2.0) for x in xs], axis=0)
    err = np.abs(fp.dequantize(total, n_sites) - exact)
    assert err.max() <= fp.error_bound(n_sites)
    assert err.max() > 0.25 * n_sites**0.5 * fp.step / 2  # the bound is not vacuous: rounding happened
    # a single value: round to nearest, not truncation (which would be off by up to a whole step)
    one = rng.uniform(-2, 2, 20_000)
    assert np.abs(fp.dequantize(fp.quantize(one), 1) - one).max() <= fp.error_bound(1)


def test_quantization_extremes_use_the_whole_ring_without_wrapping() -> None:
    fp = FixedPoint(clip=1.0, max_sites=20)
    assert fp.levels == (2**31 - 1) // 20
    for value in (1.0, -1.0, 5.0, -5.0):
        total = _ring_sum([fp.quantize(np.full(3, value)) for _ in range(20)])
        np.testing.assert_allclose(fp.dequantize(total, 20), np.full(3, 20 * np.sign(value)), rtol=1e-12)


def test_quantization_through_secure_aggregation() -> None:
    rng = np.random.default_rng(11)
    fp = FixedPoint(clip=0.5, max_sites=6)
    xs = {s: rng.normal(0, 0.2, 3000) for s in _sites(6)}
    result = simulate_round({s: fp.quantize(x) for s, x in xs.items()}, 4, dropouts_after_masking=["site-05"])
    exact = np.sum([np.clip(xs[s], -0.5, 0.5) for s in result.survivors], axis=0)
    assert np.abs(fp.dequantize(result.total, 5) - exact).max() <= fp.error_bound(5)


def test_weighted_fedavg_under_masking() -> None:
    rng = np.random.default_rng(5)
    fp = FixedPoint(clip=1.0, max_sites=5, max_samples=10_000)
    ws = {s: rng.normal(0, 0.3, 2000) for s in _sites(5)}
    ns = dict(zip(_sites(5), (10_000, 1, 517, 3000, 42), strict=True))
    result = simulate_round({s: fp.encode_weighted(ws[s], ns[s]) for s in ws}, 3)
    mean, n_total = fp.decode_weighted_mean(result.total, 5)
    assert n_total == sum(ns.values())
    exact = sum(ns[s] * np.clip(ws[s], -1, 1) for s in ws) / n_total
    assert np.abs(mean - exact).max() <= fp.error_bound(1)  # within step / 2 of the exact weighted mean
    with pytest.raises(ValueError, match=r"n_samples must be in \[1, max_samples=10000\]"):
        fp.encode_weighted(ws["site-00"], 10_001)


def test_fixed_point_refuses_what_could_overflow_or_is_not_a_number() -> None:
    with pytest.raises(ValueError, match=r"overflows Z_2\^32.*use bits=64"):
        FixedPoint(1.0, max_sites=100, max_samples=2**25)
    FixedPoint(1.0, max_sites=100, max_samples=2**25, bits=64)
    fp = FixedPoint(1.0, max_sites=3)
    with pytest.raises(ValueError, match=r"sum of 4 sites may have overflowed.*max_sites=3"):
        fp.dequantize(np.zeros(2, np.uint32), 4)
    with pytest.raises(ValueError, match=r"non-finite value \(index 2"):
        fp.quantize([0.0, 1.0, np.nan])
    with pytest.raises(ValueError, match=r"ring width must be one of"):
        FixedPoint(1.0, 3, bits=16)


# ----------------------------------------------------------------------------- share encryption


def test_tampered_share_ciphertext_is_rejected() -> None:
    r = _run_to_masking(4, 3)
    inbox = r.inbox("site-02")
    tampered: list[Callable[[EncryptedShare], EncryptedShare]] = [
        lambda ct: replace(ct, ciphertext=_flip(ct.ciphertext, 5)),
        lambda ct: replace(ct, ciphertext=_flip(ct.ciphertext, len(ct.ciphertext) - 1)),  # the GCM tag
        lambda ct: replace(ct, nonce=_flip(ct.nonce, 0)),
    ]
    for tamper in tampered:
        bad = [tamper(ct) if ct.sender == "site-01" else ct for ct in inbox]
        with pytest.raises(ValueError, match=r"share from 'site-01' to 'site-02'.*does not authenticate"):
            receive_shares(r.config, r.secrets["site-02"], r.advertised, bad)


def test_a_share_addressed_to_another_site_or_round_does_not_decrypt() -> None:
    r = _run_to_masking(4, 3)
    to_01 = next(ct for ct in r.outbox["site-00"] if ct.recipient == "site-01")
    others = [ct for ct in r.inbox("site-03") if ct.sender != "site-00"]
    # delivered as-is to the wrong site: refused by its address
    with pytest.raises(ValueError, match=r"addressed to 'site-01' in round 'r1', not to 'site-03'"):
        receive_shares(r.config, r.secrets["site-03"], r.advertised, [*others, to_01])
    # readdressed to site-03: the AEAD key and associated data are site-01's, so it does not decrypt
    moved = replace(to_01, recipient="site-03")
    with pytest.raises(ValueError, match=r"share from 'site-00' to 'site-03'.*does not authenticate"):
        receive_shares(r.config, r.secrets["site-03"], r.advertised, [*others, moved])
    # replayed into another round (same keys, to make the point about the associated data)
    config2 = replace(r.config, round_id="r2")
    replayed = [replace(ct, round_id="r2") for ct in r.inbox("site-01")]
    with pytest.raises(ValueError, match=r"in round 'r2' does not authenticate"):
        receive_shares(config2, r.secrets["site-01"], r.advertised, replayed)
    # the untouched inbox decrypts, and holds site-01's share index of each sender
    got = receive_shares(r.config, r.secrets["site-01"], r.advertised, r.inbox("site-01"))
    assert sorted(got) == list(r.config.sites)
    assert {g.b.index for g in got.values()} == {2}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


# ----------------------------------------------------------------------------- unmasking integrity


def test_a_corrupt_mask_key_share_is_detected() -> None:
    r = _run_to_masking(5, 3)
    survivors = ["site-00", "site-01", "site-02", "site-03"]  # site-04 dropped after masking
    reveals = [reveal_shares(r.config, s, r.received[s], survivors) for s in survivors]
    bad = reveals[0].s_sk_shares["site-04"]
    reveals[0] = replace(reveals[0], s_sk_shares={"site-04": Share(bad.index, _flip(bad.value, 3))})
    masked = {s: r.masked[s] for s in survivors}
    with pytest.raises(ValueError, match=r"reconstructed mask key of 'site-04' does not match"):
        unmask(r.config, r.advertised, r.config.sites, masked, reveals)
    good = [reveal_shares(r.config, s, r.received[s], survivors) for s in survivors]
    total = unmask(r.config, r.advertised, r.config.sites, masked, good)
    np.testing.assert_array_equal(total, _ring_sum([r.inputs[s] for s in survivors]))


def test_a_site_never_reveals_both_secrets_of_one_site() -> None:
    share = Share(1, bytes(16))
    with pytest.raises(ValueError, match=r"never reveal both secrets of \['site-01'\]"):
        RevealedShares("r1", "site-00", {"site-01": share}, {"site-01": Share(1, bytes(32))})
    r = _run_to_masking(4, 3)
    reveal = reveal_shares(r.config, "site-00", r.received["site-00"], ["site-00", "site-01", "site-02"])
    assert set(reveal.b_shares) == {"site-00", "site-01", "site-02"}
    assert set(reveal.s_sk_shares) == {"site-03"}
    with pytest.raises(ValueError, match=r"'site-03' is not among the survivors"):
        reveal_shares(r.config, "site-03", r.received["site-03"], ["site-00", "site-01", "site-02"])


# ----------------------------------------------------------------------------- config, graph, shares


def test_round_config_checks_the_threshold() -> None:
    sites = tuple(_sites(10))
    with pytest.raises(ValueError, match=r"more than half of a site's 10 shareholders"):
        RoundConfig("r", sites, 5)
    with pytest.raises(ValueError, match=r"threshold 11 exceeds the 10 shareholders"):
        RoundConfig("r", sites, 11)
    with pytest.raises(ValueError, match=r"at least 3 sites"):
        RoundConfig("r", ("a", "b"), 2)
    with pytest.raises(ValueError, match=r"more than half of a site's 5 shareholders"):
        RoundConfig("r", sites, 2, degree=4)
    assert RoundConfig("r", tuple(reversed(sites)), 6).sites == sites


@pytest.mark.parametrize(("n", "degree"), [(10, 4), (11, 4), (10, 5), (11, 5), (20, 6), (7, 6)])
def test_harary_graph_is_symmetric_regular_and_seeded(n: int, degree: int) -> None:
    sites = _sites(n)
    g = harary_graph(sites, degree, b"round-1")
    assert g == harary_graph(sites, degree, b"round-1")
    for s, nbrs in g.items():
        assert s not in nbrs
        assert all(s in g[v] for v in nbrs)
    degrees = sorted(len(v) for v in g.values())
    extra = 1 if degree % 2 and n % 2 else 0
    assert degrees == [degree] * (n - extra) + [degree + 1] * extra
    if degree < n - 1:
        assert any(harary_graph(sites, degree, f"round-{i}".encode()) != g for i in range(2, 6))


@pytest.mark.parametrize(
    ("length", "threshold", "n", "pick"), [(16, 2, 3, (1, 3)), (32, 4, 7, (2, 3, 5, 7, 1))]
)
def test_batched_reconstruction_matches_pycryptodome(
    length: int, threshold: int, n: int, pick: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(length)
    secrets = {f"s{i}": rng.bytes(length) for i in range(4)}
    shares = {k: split_secret(v, threshold, n) for k, v in secrets.items()}
    chosen = {k: [v[i - 1] for i in pick] for k, v in shares.items()}
    assert combine_secrets(chosen, threshold) == secrets
    for k, v in chosen.items():
        assert combine_secret(v, threshold) == secrets[k]
        half = [(s.index, s.value[:16]) for s in v[:threshold]]
        assert Shamir.combine(half) == secrets[k][:16]


def test_site_secrets_do_not_leak_through_repr() -> None:
    keys = generate_site_keys("site-00")
    assert "secret" in repr(keys) and keys.b.hex() not in repr(keys)
