"""Arithmetic in Z_(2^b) on densely packed lanes, b in {1, 2, 4, 8, 16, 32, 64}.

Masks are added lane by lane in Z_(2^b): whatever a client puts in one lane
(an honest 0/1 vote or a malicious 2^b - 1), nothing ever carries into the
next lane, so every decoded count depends on that weight's inputs alone and
can be checked against its bounds after unmasking.

Layout: element ``e`` occupies bits ``[e*b, (e+1)*b)`` of a little-endian bit
stream (for b = 16, 32, 64, a little-endian uint16, uint32, uint64 array). Packed
arrays are added and subtracted lane-wise without unpacking: b >= 8 use native
wrap-around integer arithmetic, sub-byte lanes use SWAR carry masking on 64-bit
words. Votes use b <= 16 (``lane_bits_for``); the 32- and 64-bit lanes carry
fixed-point ring elements (the summed activation statistics of the
``statistics`` strategy), whose sum the caller decodes and checks.
"""

from __future__ import annotations

import threading

import numpy as np

from .errors import ConfigError

LANE_BITS = (1, 2, 4, 8, 16, 32, 64)
VOTE_LANE_BITS = (1, 2, 4, 8, 16)  # the widths a vote count uses (lane_bits_for)
_WIDE = {16: np.dtype("<u2"), 32: np.dtype("<u4"), 64: np.dtype("<u8")}
_FOLD_WORD = {2: np.uint32, 4: np.uint16}
# High bit of every lane, repeated over a 64-bit word (for SWAR carry masking).
_HIGH = {1: 0xFFFFFFFFFFFFFFFF, 2: 0xAAAAAAAAAAAAAAAA, 4: 0x8888888888888888}


def lane_bits_for(num_clients: int) -> int:
    """Smallest lane width b with 2^b > m, so a sum of m binary votes never wraps."""
    for bits in VOTE_LANE_BITS:
        if (1 << bits) > num_clients:
            return bits
    raise ConfigError(f"{num_clients} clients exceed the widest lane (16 bits)")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` lanes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2^bits into a uint8 array."""
    _check_bits(bits)
    values = np.asarray(values)
    if bits in _WIDE:
        return values.astype(_WIDE[bits]).view(np.uint8)
    if bits == 8:
        return values.astype(np.uint8)
    if bits == 1:
        return np.packbits(values.astype(np.uint8, copy=False), bitorder="little")
    per_byte = 8 // bits
    whole = len(values) - len(values) % per_byte
    out = np.empty(packed_nbytes(len(values), bits), dtype=np.uint8)
    # One lane per byte of a little-endian word: fold the bytes' low bits together.
    lanes = np.ascontiguousarray(values[:whole], dtype=np.uint8).view(_FOLD_WORD[bits])
    word = lanes.dtype.type
    folded = lanes >> word(8 - bits)
    folded |= lanes
    if bits == 2:
        folded |= folded >> word(12)
    np.copyto(out[: len(folded)], folded, casting="unsafe")  # keeps the low byte
    if whole < len(values):
        tail = 0
        for j, v in enumerate(values[whole:]):
            tail |= int(v) << (j * bits)
        out[-1] = tail
    return out


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` lanes (uint8, or uint16/32/64 for b = 16/32/64)."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if bits in _WIDE:
        nbytes = bits // 8
        return packed[: nbytes * count].view(_WIDE[bits]).astype(_WIDE[bits].newbyteorder("="))
    if bits == 8:
        return packed[:count].copy()
    per_byte = 8 // bits
    lane_mask = np.uint8((1 << bits) - 1)
    out = np.empty((len(packed), per_byte), dtype=np.uint8)
    for j in range(per_byte):
        out[:, j] = (packed >> np.uint8(j * bits)) & lane_mask
    return out.reshape(-1)[:count]


def unpack_range(packed: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Lanes ``[start, start + count)`` of a packed array, as :func:`unpack` gives them.

    Only the bytes holding those lanes are read, so one layer of a large packed sum
    (in memory or memory-mapped) is unpacked without the rest.
    """
    _check_bits(bits)
    first_bit = start * bits
    first, skip = first_bit // 8, (first_bit % 8) // bits
    part = np.asarray(packed[first : first + packed_nbytes(skip + count, bits)], dtype=np.uint8)
    if bits == 1:
        return np.unpackbits(part, bitorder="little", count=skip + count)[skip:]
    return unpack(part, bits, skip + count)[skip:]


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 array as (its whole 64-bit words, the bytes of the tail)."""
    whole = a.nbytes - a.nbytes % 8
    return a[:whole].view(np.uint64), a[whole:]


def _high(bits: int, dtype) -> np.generic:
    value = _HIGH[bits]
    return np.uint64(value) if dtype == np.uint64 else np.uint8(value & 0xFF)


_local = threading.local()


def _temp(like: np.ndarray, slot: int = 0) -> np.ndarray:
    """Per-thread scratch array ``slot`` shaped like ``like`` (no allocation per call)."""
    name = f"buf{slot}"
    buf = getattr(_local, name, None)
    if buf is None or buf.nbytes < like.nbytes:
        buf = np.empty(max(like.nbytes, 1 << 16), dtype=np.uint8)
        setattr(_local, name, buf)
    return buf[: like.nbytes].view(like.dtype)


def add_(acc: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """acc += x (mod 2^b per lane), in place on packed uint8 arrays of equal length."""
    if bits == 8:
        np.add(acc, x, out=acc)
    elif bits in _WIDE:
        wide = acc.view(_WIDE[bits])
        np.add(wide, x.view(_WIDE[bits]), out=wide)
    else:
        for a, b in zip(_split(acc), _split(x), strict=True):
            if len(a):
                _swar_add(a, b, _high(bits, a.dtype))
    return acc


def sub_(acc: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """acc -= x (mod 2^b per lane), in place on packed uint8 arrays of equal length."""
    if bits == 8:
        np.subtract(acc, x, out=acc)
    elif bits in _WIDE:
        wide = acc.view(_WIDE[bits])
        np.subtract(wide, x.view(_WIDE[bits]), out=wide)
    else:
        for a, b in zip(_split(acc), _split(x), strict=True):
            if len(a):
                _swar_sub(a, b, _high(bits, a.dtype))
    return acc


def _swar_add(a: np.ndarray, b: np.ndarray, high) -> None:
    """Lane-wise a += b: add the low bits (no lane can overflow), then set the top bits by xor."""
    low = ~high
    t = _temp(a)
    np.bitwise_xor(a, b, out=t)  # the lanes' top bits, added without carry in
    t &= high
    a &= low
    np.add(a, np.bitwise_and(b, low, out=_temp(b, 1)), out=a)
    a ^= t


def _swar_sub(a: np.ndarray, b: np.ndarray, high) -> None:
    """Lane-wise a -= b: every lane lends itself its own borrow bit, then fix the top bits."""
    low = ~high
    t = _temp(a)
    np.bitwise_xor(a, b, out=t)
    np.invert(t, out=t)  # a ^ ~b: the lanes' top bits after borrowing
    t &= high
    a |= high
    np.subtract(a, np.bitwise_and(b, low, out=_temp(b, 1)), out=a)
    a ^= t


def _check_bits(bits: int) -> None:
    if bits not in LANE_BITS:
        raise ConfigError(f"lane width must be one of {LANE_BITS}, got {bits}")
