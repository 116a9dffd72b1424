"""The bit-packed mask (nodes.masks): final-mask.bin's bytes, written and read by range."""

from __future__ import annotations

import numpy as np
import pytest

from nodes.masks import PackedMask


def test_known_bytes_little_bit_order():
    mask = PackedMask(11)
    mask.set(0, np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=bool))
    mask.set(8, np.array([0, 1, 1], dtype=bool))
    assert mask.bytes.tobytes() == b"\x81\x06"
    assert mask.packed(3, 8) == bytes([0b11010000])  # bits 3..10 from bit 0: 0,0,0,0,1,0,1,1
    assert mask.packed(8, 3) == b"\x06"
    assert mask.count() == 4 and mask.count(8, 3) == 2


def test_ranges_at_any_offset_match_numpy_packbits():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 150))
        ref = np.zeros(n, dtype=bool)
        mask = PackedMask(n)
        for _ in range(8):
            a = int(rng.integers(0, n))
            b = int(rng.integers(a, n + 1))
            bits = rng.random(b - a) < 0.5
            if rng.random() < 0.5:
                mask.set(a, bits)
            else:  # as a final-mask part arrives: packed from bit 0
                mask.set_packed(a, np.packbits(bits, bitorder="little").tobytes(), b - a)
            ref[a:b] = bits
            assert mask.bytes.tobytes() == np.packbits(ref, bitorder="little").tobytes()  # tail bits 0
            c = int(rng.integers(0, n))
            d = int(rng.integers(c, n + 1))
            assert np.array_equal(mask.get(c, d - c), ref[c:d])
            assert mask.packed(c, d - c) == np.packbits(ref[c:d], bitorder="little").tobytes()
            assert mask.count(c, d - c) == ref[c:d].sum() and mask.count() == ref.sum()


def test_out_of_range_is_refused():
    mask = PackedMask(10)
    with pytest.raises(ValueError):
        mask.set(8, np.ones(3, dtype=bool))
    with pytest.raises(ValueError):
        mask.get(-1, 2)
