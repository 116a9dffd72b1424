"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import ShareError

PRIME = (1 << 521) - 1  # a Mersenne prime, far above any 256-bit secret
SHARE_BYTES = 66
SECRET_BYTES = 32


@dataclass(frozen=True)
class Share:
    """The point (x, f(x)) of the sharing polynomial; x is the holder's index + 1."""

    x: int
    y: bytes  # SHARE_BYTES, big-endian

    def __post_init__(self) -> None:
        if not 0 < self.x < PRIME or len(self.y) != SHARE_BYTES:
            raise ShareError("malformed share")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, Share]:
    """Shares of ``secret`` for the holders at ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold {threshold} must be between 1 and the {len(xs)} holders")
    if len(set(xs)) != len(xs) or any(x <= 0 for x in xs):
        raise ShareError("share points must be distinct and positive")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = Share(x, y.to_bytes(SHARE_BYTES, "big"))
    return shares


@lru_cache(maxsize=4096)
def _lagrange_weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Weights w_i with f(at) = sum_i w_i f(x_i); they depend on the points only, so a
    server reconstructing many secrets from the same holders computes them once."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def _interpolate_at(points: Sequence[tuple[int, int]], at: int) -> int:
    weights = _lagrange_weights(tuple(x for x, _ in points), at)
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


def combine(shares: Sequence[Share] | Mapping[int, Share], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares.

    Extra shares are checked against the polynomial through the first ``threshold``:
    shares that do not agree raise :class:`ShareError` instead of a wrong secret.
    """
    items = list(shares.values()) if isinstance(shares, Mapping) else list(shares)
    if len({s.x for s in items}) != len(items):
        raise ShareError("duplicate share points")
    if len(items) < threshold:
        raise ShareError(f"need {threshold} shares to reconstruct, got {len(items)}")
    points = [(s.x, int.from_bytes(s.y, "big")) for s in items]
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate_at(base, x) != y:
            raise ShareError("inconsistent shares: they do not lie on one polynomial")
    secret = _interpolate_at(base, 0)
    if secret >> (8 * SECRET_BYTES):
        raise ShareError("inconsistent shares: the reconstructed value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def recover_verified(
    shares: Sequence[Share], threshold: int, is_secret: Callable[[bytes], bool], max_subsets: int = 5000
) -> tuple[bytes, list[int]]:
    """Recover a secret that ``is_secret`` accepts, despite corrupted shares; name the bad ones.

    ``is_secret`` checks a candidate against a public commitment (a mask key against its
    advertised public key, a self-mask seed against its signed hash). The first
    ``threshold`` shares are tried first; if they fail, subsets of ``threshold`` are
    searched (at most ``max_subsets``). Returns the secret and the x of every share
    that does not lie on the polynomial it came from. Raises :class:`ShareError`
    when no subset yields a secret that passes the check.
    """
    items = list(shares)
    if len(items) < threshold:
        raise ShareError(f"need {threshold} shares to reconstruct, got {len(items)}")
    points = [(s.x, int.from_bytes(s.y, "big")) for s in items]
    for tried, subset in enumerate(itertools.combinations(points, threshold)):
        if tried >= max_subsets:
            break
        value = _interpolate_at(list(subset), 0)
        if value >> (8 * SECRET_BYTES):
            continue
        secret = value.to_bytes(SECRET_BYTES, "big")
        if is_secret(secret):
            base = list(subset)
            bad = [x for x, y in points if _interpolate_at(base, x) != y]
            return secret, bad
    raise ShareError("no subset of the shares reconstructs a secret that matches its commitment")
