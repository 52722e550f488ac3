"""Secure aggregation: the coordinator learns the sum of the sites' updates, never one site's update.

Pure numpy + ``cryptography`` (X25519, HKDF-SHA256, AES-256-GCM, AES-256-CTR) + pycryptodome's
``Crypto.Protocol.SecretSharing.Shamir``; no Airflow, no TensorFlow. The site-side steps and the
coordinator-side :func:`unmask` are separate functions, so each side's Airflow task calls only its own.

Protocol -- Bonawitz et al. 2017, Figure 4, the semi-honest ("honest-but-curious") variant:

* **Round 0, AdvertiseKeys** (:func:`generate_site_keys`): each site ``u`` draws two X25519 key
  pairs for the round, ``(c_u^PK, c_u^SK)`` for the channel that carries its secret shares and
  ``(s_u^PK, s_u^SK)`` for the pairwise masks, plus a 16-byte self-mask seed ``b_u``, and
  publishes :class:`AdvertisedKeys` ``(c_u^PK, s_u^PK)``. The sites that did so are ``U1``.
* **Round 1, ShareKeys** (:func:`share_keys`, :func:`receive_shares`): ``u`` splits ``b_u`` and
  ``s_u^SK`` into t-of-n Shamir shares (GF(2^128), pycryptodome; the 32-byte ``s_u^SK`` is shared
  as two independent 16-byte halves with the same share index) and sends one share of each to every
  shareholder ``v`` (its neighbours and, as in the paper, itself), encrypted with AES-256-GCM under
  ``HKDF(X25519(c_u^SK, c_v^PK))``; its own share is relayed encrypted to itself, so a site keeps no
  state between rounds but its key material. In Lepton
  the ciphertexts travel through the coordinator, which cannot read them; the associated data
  binds (round id, sender, recipient), so a share moved to another recipient or round, or
  tampered with, does not decrypt. The sites whose shares went out are ``U2``.
* **Round 2, MaskedInputCollection** (:func:`mask_input`): with ``s_uv = X25519(s_u^SK, s_v^PK)``
  (``s_uv == s_vu``) and ``PRG`` the AES-256-CTR keystream under an HKDF-SHA256 key::

      y_u = x_u + PRG(b_u) + sum_{v in U2, v < u} PRG(s_uv) - sum_{v in U2, v > u} PRG(s_uv)  mod 2^k

  The pairwise terms cancel in the sum over all sites; ``PRG(b_u)`` hides ``x_u`` even if the
  coordinator later learns ``s_u^SK``. The sites whose masked input arrived are ``U3``.
* **Round 3, ConsistencyCheck**: only needed against an active (malicious) coordinator; not
  implemented here (see "Not implemented" below).
* **Round 4, Unmasking** (:func:`reveal_shares`, :func:`unmask`): each surviving site reveals,
  for every neighbour ``u``, its share of ``b_u`` if ``u`` is in ``U3`` and its share of
  ``s_u^SK`` otherwise -- never both for the same ``u``. The coordinator reconstructs each secret
  from ``threshold`` shares (:func:`combine_secrets`: the Lagrange coefficients are computed once
  per set of share indices, so each secret costs ``threshold`` field multiplications), subtracts
  ``PRG(b_u)`` for survivors, re-derives the dropouts' pairwise masks with the survivors
  (checking each reconstructed ``s_u^SK`` against the advertised ``s_u^PK``) and removes them:
  the result is exactly ``sum_{u in U3} x_u mod 2^k``.
  Fewer than ``threshold`` shares of any needed secret: :class:`ValueError` naming the site, how
  many shares were available and how many were needed -- the round fails, it never returns a
  wrong sum.

SecAgg+ (Bell et al. 2020): with ``RoundConfig(degree=k)`` each site masks with, and shares its
secrets among, only its ``k`` neighbours in a Harary graph ``H(k, n)`` whose node labels are
permuted by a seed derived from the round id (public and deterministic, so every party computes
the same graph). ``degree=None`` is the full graph of the original protocol. The threshold counts
a site's shareholders (its ``h = degree + 1`` neighbours and itself); :class:`RoundConfig` requires
``h / 2 < threshold <= h`` (more than half, so that no coordinator can collect a threshold of both
``b_u`` and ``s_u^SK`` shares of the same site by telling different sites different survivor sets)
and ``threshold >= 2``, so secure aggregation needs at least 3 sites.

Fixed-point encoding (:class:`FixedPoint`): masking needs ring elements. A float ``x`` is clipped
to ``[-clip, clip]`` and rounded to the nearest multiple of ``step`` (deterministic round-half-even,
``np.rint``), stored as the two's complement integer ``q = round(x / step)`` in ``Z_{2^k}``.
``k = 32`` by default: an update of P parameters then uploads 4 P bytes, the same as its float32
form, and ``2^31 - 1`` levels are shared among the sites. ``step = clip / L`` with
``L = floor((2^(k-1) - 1) / (max_sites * max_samples))`` (at most ``2^40``), so the sum of up to
``max_sites`` encoded values (each up to ``max_samples`` times, see below) never leaves
``[-(2^(k-1) - 1), 2^(k-1) - 1]`` and decodes without wrap-around; settings where ``L < 1`` raise.
Error bound, per coordinate: ``|dequantize(sum of n quantized) - sum of n clipped values| <= n *
step / 2`` in exact arithmetic (each rounding is off by at most ``step / 2``);
:meth:`FixedPoint.error_bound` adds a ``2^-10`` relative slack for float64 rounding.

Weighted FedAvg under masking (:meth:`FixedPoint.encode_weighted`,
:meth:`FixedPoint.decode_weighted_mean`): a site with ``n`` samples sends the ring vector
``[n * q(w), n]``; the coordinator unmasks ``[sum n_i q(w_i), sum n_i]`` and divides. So the sample
counts stay hidden too, and the mean is within ``step / 2`` of the exact weighted mean of the
clipped updates. This needs ``max_sites * max_samples`` of the ring's ``2^(k-1) - 1`` levels budget:
with ``k = 32`` and large sample counts the step gets coarse; ``bits=64`` (8 bytes per parameter)
restores ``L = 2^40``.

Not implemented (deliberately, for this semi-honest, pure layer): the ConsistencyCheck round and
signatures on AdvertiseKeys of the active-adversary protocol (in Lepton every message between a site
and the coordinator is already signed with keys pinned at enrollment, which authenticates the
advertised keys); differential-privacy noise; message serialisation (the dataclasses here are the
typed payloads; the message layer frames and signs them).

References:
    Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth. "Practical Secure
    Aggregation for Privacy-Preserving Machine Learning." ACM CCS 2017. eprint 2017/281.
    Bell, Bonawitz, Gascón, Lepoint, Raykova. "Secure Single-Server Aggregation with
    (Poly)Logarithmic Overhead." ACM CCS 2020. eprint 2020/704.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from numpy.typing import ArrayLike

try:  # GF(2^128) element of pycryptodome's Shamir (private; requirements pin the exact version)
    from Crypto.Protocol.SecretSharing import _Element as _GF128
except ImportError:  # pragma: no cover - combine_secrets falls back to one Shamir.combine per secret
    _GF128 = None  # type: ignore[misc,assignment]

__all__ = [
    "RING_BITS",
    "AdvertisedKeys",
    "EncryptedShare",
    "FixedPoint",
    "ReceivedShare",
    "RevealedShares",
    "RoundConfig",
    "Share",
    "SimulatedRound",
    "SiteSecrets",
    "combine_secret",
    "combine_secrets",
    "generate_site_keys",
    "harary_graph",
    "mask_input",
    "receive_shares",
    "reveal_shares",
    "ring_dtype",
    "share_keys",
    "simulate_round",
    "split_secret",
    "unmask",
]

RING_BITS: Final = (32, 64)
"""Supported ring widths k of Z_{2^k}: the numpy unsigned dtype wraps modulo 2^k for free."""

KEY_BYTES: Final = 32
"""X25519 keys and every derived AES key are 32 bytes."""

SEED_BYTES: Final = 16
"""The self-mask seed b_u: 128 bits (the paper's security parameter), one Shamir block."""

_CHUNK: Final = 16  # pycryptodome's Shamir shares 16-byte secrets; longer ones go chunk by chunk
_NONCE_BYTES: Final = 12
_LABEL: Final = b"lepton/secagg/v1"
_MAX_LEVELS: Final = 1 << 40  # keeps x / step exact to ~2^-12 of a step in float64
_FLOAT_SLACK: Final = 2.0**-10
# Words per block when expanding the keystreams: 64 Ki words (256 KiB for uint32) keeps the
# keystream scratch and the output block in L2 while every stream is added into it.
_BLOCK: Final = 1 << 16


def ring_dtype(bits: int) -> np.dtype:
    """The numpy dtype holding Z_{2^bits}; ``bits`` must be one of :data:`RING_BITS`."""
    if bits not in RING_BITS:
        raise ValueError(f"ring width must be one of {RING_BITS} bits, got {bits}")
    return np.dtype(np.uint32 if bits == 32 else np.uint64)


# --------------------------------------------------------------------------- fixed point


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point codec between float vectors and the ring Z_{2^bits}.

    ``clip``: values are clipped to ``[-clip, clip]`` first. ``max_sites``: the most encoded
    vectors that will be summed. ``max_samples``: the largest sample count ``n`` a site may weight
    its update with in :meth:`encode_weighted` (1 for plain sums). The sum of up to ``max_sites``
    vectors, each weighted by up to ``max_samples``, must fit the ring: ``ValueError`` otherwise.
    """

    clip: float
    max_sites: int
    bits: int = 32
    max_samples: int = 1

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite positive number, got {self.clip}")
        if self.max_sites < 1 or self.max_samples < 1:
            raise ValueError(
                f"max_sites and max_samples must be >= 1, got {self.max_sites} and {self.max_samples}"
            )
        ring_dtype(self.bits)
        if self.max_sites * self.max_samples > (1 << (self.bits - 1)) - 1:
            raise ValueError(
                f"a sum of {self.max_sites} sites x {self.max_samples} samples overflows Z_2^{self.bits}: "
                f"max_sites * max_samples must be < 2^{self.bits - 1}; use bits=64 or fewer samples"
            )

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    @property
    def levels(self) -> int:
        """``L``: ``clip`` is encoded as ``L``; ``max_sites * max_samples * L < 2^(bits-1)``."""
        return min(((1 << (self.bits - 1)) - 1) // (self.max_sites * self.max_samples), _MAX_LEVELS)

    @property
    def step(self) -> float:
        """The quantization step ``clip / levels``."""
        return self.clip / self.levels

    def error_bound(self, n_sites: int) -> float:
        """Per-coordinate bound on ``|dequantize(sum of n_sites) - sum of the clipped inputs|``."""
        return n_sites * self.step / 2 * (1 + _FLOAT_SLACK)

    def quantize(self, x: ArrayLike) -> np.ndarray:
        """Clip, round to the nearest step and encode as a flat ring vector (two's complement)."""
        flat = np.asarray(x).reshape(-1)
        if flat.size == 0:
            raise ValueError("cannot quantize an empty vector")
        if not np.issubdtype(flat.dtype, np.floating) and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"quantize needs a real-valued array, got dtype {flat.dtype}")
        out = np.empty(flat.size, self.dtype)
        scale = self.levels / self.clip
        block = min(_BLOCK, flat.size)
        fbuf = np.empty(block, np.float64)
        ibuf = np.empty(block, np.int64)
        for start in range(0, flat.size, block):
            m = min(block, flat.size - start)
            f = fbuf[:m]
            f[...] = flat[start : start + m]
            if not np.isfinite(f).all():
                bad = start + int(np.flatnonzero(~np.isfinite(f))[0])
                raise ValueError(f"cannot quantize a non-finite value (index {bad}: {flat[bad]})")
            np.clip(f, -self.clip, self.clip, out=f)
            np.multiply(f, scale, out=f)
            np.rint(f, out=f)
            np.copyto(ibuf[:m], f, casting="unsafe")
            np.copyto(out[start : start + m], ibuf[:m], casting="unsafe")  # wraps mod 2^k
        return out

    def dequantize(self, total: np.ndarray, n_sites: int) -> np.ndarray:
        """Decode the ring sum of ``n_sites`` quantized vectors to float64."""
        self._check_sum(total, n_sites)
        signed = total.view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.float64) * self.step

    def encode_weighted(self, x: ArrayLike, n_samples: int) -> np.ndarray:
        """The ring vector ``[n * q(x), n]`` a site masks for a sample-weighted FedAvg."""
        if not 1 <= n_samples <= self.max_samples:
            raise ValueError(f"n_samples must be in [1, max_samples={self.max_samples}], got {n_samples}")
        q = self.quantize(x)
        out = np.empty(q.size + 1, self.dtype)
        np.multiply(q, self.dtype.type(n_samples), out=out[:-1])
        out[-1] = n_samples
        return out

    def decode_weighted_mean(self, total: np.ndarray, n_sites: int) -> tuple[np.ndarray, int]:
        """``(sum n_i q(x_i) / sum n_i, sum n_i)`` from the unmasked sum of :meth:`encode_weighted`.

        The mean is within ``error_bound(1)`` (``step / 2``) of the exact weighted mean of the
        clipped inputs, for any number of sites up to ``max_sites``.
        """
        self._check_sum(total, n_sites)
        n_total = int(total[-1])
        if not 1 <= n_total <= n_sites * self.max_samples:
            raise ValueError(
                f"decoded sample total {n_total} is outside [1, {n_sites} x {self.max_samples}]: "
                "not a sum of encode_weighted vectors from these sites"
            )
        signed = total[:-1].view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.float64) * (self.step / n_total), n_total

    def _check_sum(self, total: np.ndarray, n_sites: int) -> None:
        if total.dtype != self.dtype or total.ndim != 1:
            raise ValueError(f"expected a 1-D {self.dtype} ring vector, got {total.ndim}-D {total.dtype}")
        if not 1 <= n_sites <= self.max_sites:
            raise ValueError(
                f"a sum of {n_sites} sites may have overflowed Z_2^{self.bits}: "
                f"this codec's levels fit at most max_sites={self.max_sites}"
            )


# --------------------------------------------------------------------------- round, graph


def harary_graph(sites: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """The Harary graph H(degree, n) over ``sites``, node labels permuted by ``seed`` (Bell et al.).

    Sites at ring positions ``i`` and ``i +- j`` (``1 <= j <= degree // 2``) are neighbours; for an
    odd degree, also ``i`` and ``i + ceil(n / 2)`` (every node has degree ``degree``, except that one
    node has ``degree + 1`` when both ``n`` and ``degree`` are odd). Deterministic in ``seed``; in
    :class:`RoundConfig` the seed is the round id, which the coordinator chooses (semi-honest model).
    """
    n = len(sites)
    if not 1 <= degree < n:
        raise ValueError(f"graph degree must be in [1, n_sites - 1 = {n - 1}], got {degree}")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
    ring = [sites[i] for i in rng.permutation(n)]
    adj: dict[str, set[str]] = {s: set() for s in sites}

    def link(i: int, j: int) -> None:
        a, b = ring[i % n], ring[j % n]
        if a != b:
            adj[a].add(b)
            adj[b].add(a)

    for i in range(n):
        for j in range(1, degree // 2 + 1):
            link(i, i + j)
    if degree % 2:
        for i in range(n // 2 + (n % 2)):
            link(i, i + (n + 1) // 2 if n % 2 else i + n // 2)
    return {s: frozenset(v) for s, v in adj.items()}


@dataclass(frozen=True)
class RoundConfig:
    """The public parameters of one secure-aggregation round, known to every party.

    ``sites``: the planned participants (sorted on construction; their order defines ``v < u`` in
    the masks). ``threshold``: shares needed to reconstruct a secret. ``degree``: SecAgg+
    neighbours per site, ``None`` for the full graph (every other site). ``bits``: the ring width.
    """

    round_id: str
    sites: tuple[str, ...]
    threshold: int
    bits: int = 32
    degree: int | None = None

    def __post_init__(self) -> None:
        if not self.round_id:
            raise ValueError("round_id must be a non-empty string")
        if any(not isinstance(s, str) or not s for s in self.sites):
            raise ValueError("site ids must be non-empty strings")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"site ids must be unique, got {list(self.sites)}")
        if len(self.sites) < 3:
            raise ValueError(f"secure aggregation needs at least 3 sites, got {len(self.sites)}")
        object.__setattr__(self, "sites", tuple(sorted(self.sites)))
        ring_dtype(self.bits)
        holders = [len(v) + 1 for v in self.graph.values()]
        if self.threshold < 2:
            raise ValueError(
                f"threshold must be >= 2 (one share must not reveal a secret), got {self.threshold}"
            )
        if self.threshold > min(holders):
            raise ValueError(
                f"threshold {self.threshold} exceeds the {min(holders)} shareholders of a site "
                "(itself and its neighbours)"
            )
        if 2 * self.threshold <= max(holders):
            raise ValueError(
                f"threshold {self.threshold} must be more than half of a site's {max(holders)} shareholders, "
                "so that no party can collect a threshold of both secrets of one site"
            )

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        """Each site's neighbours: whom it masks with and shares its secrets among."""
        if self.degree is None or self.degree == len(self.sites) - 1:
            everyone = frozenset(self.sites)
            return {s: everyone - {s} for s in self.sites}
        return harary_graph(self.sites, self.degree, _label("graph", self.round_id))

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    def index(self, site: str) -> int:
        """The site's 1-based rank in ``sites`` (the order of ``v < u`` in the masks)."""
        try:
            return self.sites.index(site) + 1
        except ValueError:
            raise ValueError(f"site {site!r} is not a participant of round {self.round_id!r}") from None

    def neighbours(self, site: str) -> frozenset[str]:
        """The sites ``site`` masks with."""
        self.index(site)
        return self.graph[site]

    def shareholders(self, site: str) -> frozenset[str]:
        """The sites holding a share of ``site``'s secrets: its neighbours and itself (as in the paper)."""
        return self.neighbours(site) | {site}

    def share_index(self, owner: str, holder: str) -> int:
        """The 1-based Shamir index of ``holder``'s share of ``owner``'s secrets.

        It is ``holder``'s rank among ``owner``'s shareholders, so a site evaluates ``degree + 1``
        shares, not ``n``.
        """
        holders = sorted(self.shareholders(owner))
        if holder not in holders:
            raise ValueError(
                f"site {holder!r} holds no share of {owner!r}'s secrets in round {self.round_id!r}"
            )
        return holders.index(holder) + 1


# --------------------------------------------------------------------------- keys, shares


@dataclass(frozen=True, repr=False)
class SiteSecrets:
    """A site's private key material for one round; never leaves the site (``repr`` hides it)."""

    site: str
    c_sk: X25519PrivateKey  # channel key: encrypts the shares this site sends / receives
    s_sk: X25519PrivateKey  # mask key: pairwise mask agreement; shared so dropouts can be unmasked
    b: bytes  # self-mask seed b_u

    def __repr__(self) -> str:
        return f"SiteSecrets(site={self.site!r}, <secret>)"

    def public(self) -> AdvertisedKeys:
        return AdvertisedKeys(self.site, _raw_public(self.c_sk), _raw_public(self.s_sk))


@dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0, site -> coordinator -> sites: the site's two X25519 public keys (raw, 32 bytes)."""

    site: str
    c_pk: bytes
    s_pk: bytes

    def __post_init__(self) -> None:
        if len(self.c_pk) != KEY_BYTES or len(self.s_pk) != KEY_BYTES:
            raise ValueError(f"site {self.site!r}: X25519 public keys are {KEY_BYTES} bytes")

    @property
    def nbytes(self) -> int:
        """Payload bytes (ids as UTF-8, no framing or signature)."""
        return len(self.site.encode()) + 2 * KEY_BYTES


@dataclass(frozen=True, repr=False)
class Share:
    """One Shamir share: the holder's index and one 16-byte share per 16-byte chunk of the secret."""

    index: int
    value: bytes

    def __repr__(self) -> str:
        return f"Share(index={self.index}, <{len(self.value)} secret bytes>)"

    def __post_init__(self) -> None:
        if not 1 <= self.index < 1 << 16 or not self.value or len(self.value) % _CHUNK:
            raise ValueError(f"a share is an index in [1, 65535] and a non-empty multiple of {_CHUNK} bytes")


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1, sender -> coordinator -> recipient: AES-256-GCM of the sender's two shares."""

    round_id: str
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        """Payload bytes (ids as UTF-8, no framing or signature)."""
        ids = len(self.round_id.encode()) + len(self.sender.encode()) + len(self.recipient.encode())
        return ids + len(self.nonce) + len(self.ciphertext)


@dataclass(frozen=True, repr=False)
class ReceivedShare:
    """What a site holds for a neighbour after round 1: its shares of ``b_u`` and ``s_u^SK``."""

    sender: str
    b: Share
    s_sk: Share

    def __repr__(self) -> str:
        return f"ReceivedShare(sender={self.sender!r}, <secret>)"


@dataclass(frozen=True)
class RevealedShares:
    """Round 4, site -> coordinator: shares of ``b_u`` for survivors, of ``s_u^SK`` for dropouts."""

    round_id: str
    site: str
    b_shares: Mapping[str, Share] = field(default_factory=dict)
    s_sk_shares: Mapping[str, Share] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.b_shares) & set(self.s_sk_shares)
        if both:
            raise ValueError(f"site {self.site!r} must never reveal both secrets of {sorted(both)}")

    @property
    def nbytes(self) -> int:
        """Payload bytes (ids as UTF-8, no framing or signature)."""
        shares = [*self.b_shares.items(), *self.s_sk_shares.items()]
        return len(self.site.encode()) + sum(len(u.encode()) + 2 + len(s.value) for u, s in shares)


def generate_site_keys(site: str, random_bytes: Callable[[int], bytes] = os.urandom) -> SiteSecrets:
    """Round 0: fresh key pairs ``c``, ``s`` and seed ``b`` for one round. ``random_bytes``: tests only."""
    if not site:
        raise ValueError("site id must be a non-empty string")
    c_sk = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
    s_sk = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
    return SiteSecrets(site, c_sk, s_sk, random_bytes(SEED_BYTES))


def split_secret(secret: bytes, threshold: int, n_shares: int) -> list[Share]:
    """t-of-n Shamir shares (indices 1..n) of a secret of 16 or 32 bytes (two independent 16-byte halves)."""
    if len(secret) not in (_CHUNK, 2 * _CHUNK):
        raise ValueError(f"secret must be {_CHUNK} or {2 * _CHUNK} bytes, got {len(secret)}")
    if not 1 <= threshold <= n_shares:
        raise ValueError(f"threshold must be in [1, n_shares={n_shares}], got {threshold}")
    chunks = [
        Shamir.split(threshold, n_shares, secret[i : i + _CHUNK]) for i in range(0, len(secret), _CHUNK)
    ]
    return [Share(i + 1, b"".join(c[i][1] for c in chunks)) for i in range(n_shares)]


def combine_secret(shares: Sequence[Share], threshold: int, what: str = "secret") -> bytes:
    """Reconstruct a secret from at least ``threshold`` distinct shares (uses exactly ``threshold``)."""
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    distinct = {s.index: s for s in shares}
    if len(distinct) < threshold:
        raise ValueError(
            f"cannot reconstruct {what}: {len(distinct)} shares available, {threshold} needed (threshold)"
        )
    use = [distinct[i] for i in sorted(distinct)[:threshold]]
    if len({len(s.value) for s in use}) != 1:
        raise ValueError(f"cannot reconstruct {what}: shares of different lengths")
    return b"".join(
        Shamir.combine([(s.index, s.value[i : i + _CHUNK]) for s in use])
        for i in range(0, len(use[0].value), _CHUNK)
    )


def combine_secrets(
    share_sets: Mapping[str, Sequence[Share]], threshold: int, what: str = "secret of"
) -> dict[str, bytes]:
    """:func:`combine_secret` for many secrets at once (site -> its shares), same results.

    Shamir reconstruction at 0 is ``sum_j y_j * l_j`` with Lagrange coefficients ``l_j`` that
    depend only on the share indices; the coordinator reconstructs one secret per site from
    (usually) the same survivors' indices, so the coefficients are computed once per index set
    and each secret costs ``threshold`` field multiplications instead of pycryptodome's
    ``O(threshold^2)`` plus ``threshold`` inversions.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    chosen: dict[str, list[Share]] = {}
    for site, shares in share_sets.items():
        distinct = {s.index: s for s in shares}
        if len(distinct) < threshold:
            raise ValueError(
                f"cannot reconstruct the {what} {site!r}: {len(distinct)} shares available, "
                f"{threshold} needed (threshold)"
            )
        chosen[site] = [distinct[i] for i in sorted(distinct)[:threshold]]
    if _GF128 is None:  # pragma: no cover
        return {site: combine_secret(use, threshold, what) for site, use in chosen.items()}
    coefficients: dict[tuple[int, ...], list[Any]] = {}
    out = {}
    for site, use in chosen.items():
        key = tuple(s.index for s in use)
        if key not in coefficients:
            xs = [_GF128(i) for i in key]
            lagrange = []
            for j, x_j in enumerate(xs):
                num, den = _GF128(1), _GF128(1)
                for m, x_m in enumerate(xs):
                    if m != j:
                        num, den = num * x_m, den * (x_j + x_m)
                lagrange.append(num * den.inverse())
            coefficients[key] = lagrange
        if len({len(s.value) for s in use}) != 1:
            raise ValueError(f"cannot reconstruct the {what} {site!r}: shares of different lengths")
        chunks = []
        for lo in range(0, len(use[0].value), _CHUNK):
            acc = _GF128(0)
            for share, l_j in zip(use, coefficients[key], strict=True):
                acc = acc + _GF128(share.value[lo : lo + _CHUNK]) * l_j
            chunks.append(acc.encode())
        out[site] = b"".join(chunks)
    return out


def share_keys(
    config: RoundConfig, secrets: SiteSecrets, advertised: Mapping[str, AdvertisedKeys]
) -> list[EncryptedShare]:
    """Round 1, at a site: encrypt one share of ``b_u`` and of ``s_u^SK`` to each advertised shareholder.

    The site's own share is encrypted to itself and relayed like the others, so the only state a
    site keeps between the rounds is its :class:`SiteSecrets`.
    """
    me = secrets.site
    _check_advertised(config, advertised)
    if advertised.get(me) != secrets.public():
        raise ValueError(f"the advertised keys for {me!r} are not this site's keys")
    peers = sorted(config.shareholders(me) & advertised.keys())
    if len(peers) < config.threshold:
        raise ValueError(
            f"round fails: {len(peers)} of site {me!r}'s shareholders advertised keys, "
            f"threshold needs {config.threshold}"
        )
    n = len(config.shareholders(me))
    b_shares = split_secret(secrets.b, config.threshold, n)
    s_shares = split_secret(_raw_private(secrets.s_sk), config.threshold, n)
    out = []
    for v in peers:
        i = config.share_index(me, v)
        plaintext = i.to_bytes(2, "big") + b_shares[i - 1].value + s_shares[i - 1].value
        key = _channel_key(config.round_id, secrets.c_sk, me, advertised[v])
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, _label("share", config.round_id, me, v))
        out.append(EncryptedShare(config.round_id, me, v, nonce, ciphertext))
    return out


def receive_shares(
    config: RoundConfig,
    secrets: SiteSecrets,
    advertised: Mapping[str, AdvertisedKeys],
    ciphertexts: Iterable[EncryptedShare],
) -> dict[str, ReceivedShare]:
    """Round 1, at a site: decrypt and check the shares addressed to it; the senders are ``U2``."""
    me = secrets.site
    _check_advertised(config, advertised)
    config.index(me)
    received: dict[str, ReceivedShare] = {}
    for ct in ciphertexts:
        u = ct.sender
        if ct.round_id != config.round_id or ct.recipient != me:
            raise ValueError(
                f"share from {u!r} is addressed to {ct.recipient!r} in round {ct.round_id!r}, "
                f"not to {me!r} in round {config.round_id!r}"
            )
        if u not in config.shareholders(me) or u not in advertised:
            raise ValueError(f"share from {u!r}: not an advertised neighbour of {me!r}")
        if u in received:
            raise ValueError(f"two shares from {u!r} for {me!r}")
        key = _channel_key(config.round_id, secrets.c_sk, me, advertised[u])
        try:
            plaintext = AESGCM(key).decrypt(ct.nonce, ct.ciphertext, _label("share", ct.round_id, u, me))
        except InvalidTag:
            raise ValueError(
                f"share from {u!r} to {me!r} in round {ct.round_id!r} does not authenticate "
                "(tampered, or encrypted for another recipient or round)"
            ) from None
        index, mine = int.from_bytes(plaintext[:2], "big"), config.share_index(u, me)
        if index != mine or len(plaintext) != 2 + SEED_BYTES + KEY_BYTES:
            raise ValueError(f"share from {u!r} carries index {index}, {me!r} holds index {mine}")
        cut = 2 + SEED_BYTES
        received[u] = ReceivedShare(u, Share(index, plaintext[2:cut]), Share(index, plaintext[cut:]))
    if len(received) < config.threshold:
        raise ValueError(
            f"round fails: site {me!r} received shares from {len(received)} sites, "
            f"threshold needs {config.threshold}"
        )
    return received


def mask_input(
    config: RoundConfig,
    secrets: SiteSecrets,
    advertised: Mapping[str, AdvertisedKeys],
    received: Mapping[str, ReceivedShare],
    x: np.ndarray,
) -> np.ndarray:
    """Round 2, at a site: ``y_u = x_u + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv)``.

    ``x``: a 1-D ring vector (``FixedPoint.quantize`` / ``encode_weighted``). The pairwise masks go
    to the neighbours that sent this site shares (``U2``), as in the paper.
    """
    me = secrets.site
    if x.ndim != 1 or x.dtype != config.dtype or x.size == 0:
        raise ValueError(
            f"mask_input needs a non-empty 1-D {config.dtype} ring vector (quantize first), "
            f"got {x.ndim}-D {x.dtype}"
        )
    rank = config.index(me)
    streams = [(_self_mask_key(config.round_id, me, secrets.b), 1)]
    for v in sorted(set(received) - {me}):
        if v not in config.neighbours(me) or v not in advertised:
            raise ValueError(f"cannot mask with {v!r}: not an advertised neighbour of {me!r}")
        key = _pair_mask_key(config.round_id, secrets.s_sk, me, advertised[v])
        streams.append((key, 1 if config.index(v) < rank else -1))
    return _sum_with_streams([x], streams, config.dtype)


def reveal_shares(
    config: RoundConfig, site: str, received: Mapping[str, ReceivedShare], survivors: Collection[str]
) -> RevealedShares:
    """Round 4, at a site: given ``U3`` (whose masked input arrived), reveal one secret per neighbour."""
    alive = set(survivors)
    if site not in alive:
        raise ValueError(f"site {site!r} is not among the survivors it was sent; it must not reveal shares")
    if not alive <= set(config.sites):
        raise ValueError(f"survivors {sorted(alive - set(config.sites))} are not participants")
    if len(alive) < config.threshold:
        raise ValueError(
            f"round fails: {len(alive)} sites survived masking, threshold needs {config.threshold}"
        )
    b_shares = {u: r.b for u, r in received.items() if u in alive}
    s_shares = {u: r.s_sk for u, r in received.items() if u not in alive}
    return RevealedShares(config.round_id, site, b_shares, s_shares)


# --------------------------------------------------------------------------- coordinator


def unmask(
    config: RoundConfig,
    advertised: Mapping[str, AdvertisedKeys],
    shared: Collection[str],
    masked: Mapping[str, np.ndarray],
    revealed: Iterable[RevealedShares],
) -> np.ndarray:
    """Round 4, at the coordinator: the exact ring sum ``sum_{u in U3} x_u mod 2^k``.

    ``shared``: ``U2``, the sites whose encrypted shares the coordinator relayed. ``masked``:
    ``U3``, the masked inputs that arrived. ``revealed``: the survivors' :class:`RevealedShares`.
    Raises ``ValueError`` (the round fails) when fewer than ``config.threshold`` shares of any
    needed secret were revealed, naming the site and the counts.
    """
    u2, u3 = set(shared), set(masked)
    if not u3 <= u2 or not u2 <= set(advertised):
        raise ValueError(
            "masked inputs must come from sites that shared keys, and those must have advertised keys"
        )
    if len(u3) < config.threshold:
        raise ValueError(f"round fails: {len(u3)} masked inputs arrived, threshold needs {config.threshold}")
    vectors = [masked[u] for u in sorted(u3)]
    shape, dtype = vectors[0].shape, config.dtype
    for u in sorted(u3):
        if masked[u].shape != shape or masked[u].dtype != dtype or masked[u].ndim != 1:
            raise ValueError(
                f"masked input of {u!r} is {masked[u].shape} {masked[u].dtype}, expected 1-D {shape} {dtype}"
            )
    _check_advertised(config, advertised)
    b_shares, s_shares = _collect_reveals(config, u2, u3, revealed)
    seeds = combine_secrets(b_shares, config.threshold, "self-mask seed of surviving site")
    mask_keys = combine_secrets(s_shares, config.threshold, "mask key of dropped site")
    streams = [(_self_mask_key(config.round_id, u, seeds[u]), -1) for u in sorted(u3)]
    for u in sorted(u2 - u3):
        s_sk = X25519PrivateKey.from_private_bytes(mask_keys[u])
        if _raw_public(s_sk) != advertised[u].s_pk:
            raise ValueError(f"the reconstructed mask key of {u!r} does not match its advertised key")
        rank = config.index(u)
        for v in sorted(config.neighbours(u) & u3):
            # v added +PRG(s_uv) if u < v, -PRG(s_uv) if u > v: remove it.
            sign = -1 if rank < config.index(v) else 1
            streams.append((_pair_mask_key(config.round_id, s_sk, u, advertised[v]), sign))
    return _sum_with_streams(vectors, streams, dtype)


def _collect_reveals(
    config: RoundConfig, u2: set[str], u3: set[str], revealed: Iterable[RevealedShares]
) -> tuple[dict[str, list[Share]], dict[str, list[Share]]]:
    b_shares: dict[str, list[Share]] = {u: [] for u in u3}
    s_shares: dict[str, list[Share]] = {u: [] for u in u2 - u3}
    seen: set[str] = set()
    for r in revealed:
        if r.round_id != config.round_id or r.site not in u3 or r.site in seen:
            raise ValueError(
                f"reveal from {r.site!r} for round {r.round_id!r}: not a survivor, or a duplicate"
            )
        seen.add(r.site)
        for kind, shares, want in (("b", r.b_shares, b_shares), ("s_sk", r.s_sk_shares, s_shares)):
            for u, share in shares.items():
                if (
                    u not in want
                    or r.site not in config.shareholders(u)
                    or share.index != config.share_index(u, r.site)
                ):
                    raise ValueError(
                        f"{r.site!r} revealed a {kind} share of {u!r} it must not hold or reveal"
                    )
                want[u].append(share)
    return b_shares, s_shares


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimulatedRound:
    """The outcome of :func:`simulate_round`: the unmasked sum over ``survivors`` and the traffic."""

    total: np.ndarray
    survivors: tuple[str, ...]
    masked: dict[str, np.ndarray]
    upload_bytes: dict[str, int]  # per site: advertised keys + encrypted shares + masked vector + reveals


def simulate_round(
    inputs: Mapping[str, np.ndarray],
    threshold: int,
    *,
    dropouts_before_sharing: Collection[str] = (),
    dropouts_after_masking: Collection[str] = (),
    dropouts_before_unmasking: Collection[str] = (),
    degree: int | None = None,
    round_id: str = "simulated-round",
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> SimulatedRound:
    """Run every step of one round in-process over ring vectors ``inputs`` (site -> vector).

    ``dropouts_before_sharing``: advertise keys, then vanish (not in ``U2``). ``dropouts_after_masking``:
    share keys -- so the others mask with them -- but their masked input never arrives (``U2 \\ U3``;
    their pairwise masks are recovered from their shared ``s^SK``). ``dropouts_before_unmasking``: their
    masked input arrives but they reveal nothing (their ``b`` is reconstructed from the others' shares).
    """
    if not inputs:
        raise ValueError("no inputs")
    bits = next(iter(inputs.values())).dtype.itemsize * 8
    config = RoundConfig(round_id, tuple(inputs), threshold, bits=bits, degree=degree)
    for name, group in (
        ("dropouts_before_sharing", dropouts_before_sharing),
        ("dropouts_after_masking", dropouts_after_masking),
        ("dropouts_before_unmasking", dropouts_before_unmasking),
    ):
        if not set(group) <= set(config.sites):
            raise ValueError(f"{name} names sites without an input: {sorted(set(group) - set(config.sites))}")
    secrets = {s: generate_site_keys(s, random_bytes) for s in config.sites}
    advertised = {s: k.public() for s, k in secrets.items()}
    u2 = [s for s in config.sites if s not in set(dropouts_before_sharing)]
    outbox = {s: share_keys(config, secrets[s], advertised) for s in u2}
    inbox: dict[str, list[EncryptedShare]] = {s: [] for s in u2}
    for cts in outbox.values():
        for ct in cts:
            if ct.recipient in inbox:
                inbox[ct.recipient].append(ct)
    received = {s: receive_shares(config, secrets[s], advertised, inbox[s]) for s in u2}
    u3 = [s for s in u2 if s not in set(dropouts_after_masking)]
    masked = {s: mask_input(config, secrets[s], advertised, received[s], inputs[s]) for s in u3}
    u4 = [s for s in u3 if s not in set(dropouts_before_unmasking)]
    reveals = {s: reveal_shares(config, s, received[s], u3) for s in u4}
    total = unmask(config, advertised, u2, masked, reveals.values())
    upload = {s: advertised[s].nbytes for s in config.sites}
    for s in u2:
        upload[s] += sum(ct.nbytes for ct in outbox[s])
    for s in u3:
        upload[s] += masked[s].nbytes
    for s in u4:
        upload[s] += reveals[s].nbytes
    return SimulatedRound(total, tuple(u3), masked, upload)


# --------------------------------------------------------------------------- primitives


def _label(purpose: str, *parts: str) -> bytes:
    """Unambiguous domain-separation string: the protocol label, then length-prefixed UTF-8 parts."""
    out = bytearray(_LABEL)
    for p in (purpose, *parts):
        raw = p.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _check_advertised(config: RoundConfig, advertised: Mapping[str, AdvertisedKeys]) -> None:
    for site, keys in advertised.items():
        if keys.site != site:
            raise ValueError(f"advertised keys filed under {site!r} belong to {keys.site!r}")
        config.index(site)


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(material)


def _raw_public(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _channel_key(round_id: str, c_sk: X25519PrivateKey, me: str, peer: AdvertisedKeys) -> bytes:
    shared = c_sk.exchange(X25519PublicKey.from_public_bytes(peer.c_pk))
    a, b = sorted((me, peer.site))
    return _hkdf(shared, _label("channel", round_id, a, b))


def _pair_mask_key(round_id: str, s_sk: X25519PrivateKey, me: str, peer: AdvertisedKeys) -> bytes:
    shared = s_sk.exchange(X25519PublicKey.from_public_bytes(peer.s_pk))
    a, b = sorted((me, peer.site))
    return _hkdf(shared, _label("pair-mask", round_id, a, b))


def _self_mask_key(round_id: str, site: str, b: bytes) -> bytes:
    return _hkdf(b, _label("self-mask", round_id, site))


def _sum_with_streams(
    addends: Sequence[np.ndarray], streams: Sequence[tuple[bytes, int]], dtype: np.dtype
) -> np.ndarray:
    """``sum(addends) + sum(sign * PRG(key))`` mod 2^k, block by block so each block stays in cache.

    ``PRG(key)``: the AES-256-CTR keystream under ``key`` (a fresh HKDF key per stream, counter from
    zero), read as little-endian unsigned words: uniform in Z_{2^k}.
    """
    n = addends[0].size
    out = np.empty(n, dtype)
    itemsize = dtype.itemsize
    block = min(_BLOCK, n)
    zeros = memoryview(bytes(block * itemsize))
    scratch = bytearray(block * itemsize)  # the keystream lands here, read through `words`
    words = np.frombuffer(scratch, dtype.newbyteorder("<"))
    ciphers = [(Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor(), sign) for key, sign in streams]
    for start in range(0, n, block):
        stop = min(start + block, n)
        m = stop - start
        acc = out[start:stop]
        acc[...] = addends[0][start:stop]
        for a in addends[1:]:
            np.add(acc, a[start:stop], out=acc)
        ks, ks_out = words[:m], memoryview(scratch)[: m * itemsize]
        for cipher, sign in ciphers:
            cipher.update_into(zeros[: m * itemsize], ks_out)
            (np.add if sign > 0 else np.subtract)(acc, ks, out=acc)
    return out
