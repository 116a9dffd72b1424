"""Masks bit-packed by range: the final mask, and a client's votes, at 1 bit per weight.

Element ``e`` is bit ``e % 8`` of byte ``e // 8`` (numpy's ``packbits`` with
little bit order): the bytes are final-mask.bin as written, hashed and
broadcast. Parts are written and read one layer or one chunk at a time, so no
process holds a byte per weight of the whole model; bits past ``length`` stay 0.
"""

from __future__ import annotations

import hashlib

import numpy as np

_COUNT_BYTES = 1 << 24  # bytes popcounted at a time


class PackedMask:
    """A boolean vector of ``length`` elements, 1 bit each."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.bytes = np.zeros((length + 7) // 8, dtype=np.uint8)

    def set(self, offset: int, bits: np.ndarray) -> None:
        """Elements ``[offset, offset + len(bits))`` := ``bits`` (bool or 0/1)."""
        bits = np.asarray(bits).reshape(-1)
        end = offset + len(bits)
        self._check(offset, len(bits))
        lo = min(end, -(-offset // 8) * 8)  # the first byte boundary at or after offset
        hi = max(lo, end // 8 * 8)  # the last byte boundary at or before end
        if lo > offset:
            self._merge(offset, bits[: lo - offset])
        if hi > lo:
            self.bytes[lo // 8 : hi // 8] = np.packbits(bits[lo - offset : hi - offset], bitorder="little")
        if end > hi:
            self._merge(hi, bits[hi - offset :])

    def set_packed(self, offset: int, data: bytes, count: int) -> None:
        """Elements ``[offset, offset + count)`` := the first ``count`` bits of ``data``
        (packed as :meth:`packed` returns them)."""
        self._check(offset, count)
        if len(data) * 8 < count:
            raise ValueError(f"{len(data)} bytes cannot hold {count} bits")
        packed = np.frombuffer(data, dtype=np.uint8)
        whole = count // 8
        if offset % 8 == 0:  # byte-aligned: the bytes as they are, the last partial one merged
            self.bytes[offset // 8 : offset // 8 + whole] = packed[:whole]
            if count % 8:
                tail = np.unpackbits(packed[whole : whole + 1], bitorder="little", count=count % 8)
                self._merge(offset + whole * 8, tail)
        else:
            self.set(offset, np.unpackbits(packed, bitorder="little", count=count))

    def get(self, offset: int, count: int) -> np.ndarray:
        """Elements ``[offset, offset + count)`` as a bool array."""
        self._check(offset, count)
        first, skip = offset // 8, offset % 8
        part = self.bytes[first : (offset + count + 7) // 8]
        return np.unpackbits(part, bitorder="little", count=skip + count)[skip:].view(bool)

    def packed(self, offset: int, count: int) -> bytes:
        """Elements ``[offset, offset + count)`` packed from bit 0, the bits after them 0."""
        self._check(offset, count)
        if offset % 8:
            return np.packbits(self.get(offset, count), bitorder="little").tobytes()
        part = self.bytes[offset // 8 : offset // 8 + (count + 7) // 8].copy()
        if count % 8:
            part[-1] &= (1 << (count % 8)) - 1
        return part.tobytes()

    def count(self, offset: int = 0, count: int | None = None) -> int:
        """How many elements of ``[offset, offset + count)`` (default: all) are set."""
        if offset == 0 and count in (None, self.length):
            return sum(
                int(np.bitwise_count(self.bytes[i : i + _COUNT_BYTES]).sum(dtype=np.int64))
                for i in range(0, len(self.bytes), _COUNT_BYTES)
            )
        return int(np.count_nonzero(self.get(offset, self.length - offset if count is None else count)))

    def sha256(self) -> str:
        return hashlib.sha256(self.bytes).hexdigest()

    def _merge(self, offset: int, bits: np.ndarray) -> None:
        """Set bits inside one byte, keeping its other bits."""
        i, shift = offset // 8, offset % 8
        window = np.unpackbits(self.bytes[i : i + 1], bitorder="little")
        window[shift : shift + len(bits)] = bits
        self.bytes[i] = np.packbits(window, bitorder="little")[0]

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.length:
            raise ValueError(f"range [{offset}, {offset + count}) outside a mask of {self.length} elements")
