"""secagg primitives: packed ring arithmetic, the PRG (known answers), Shamir, the graph."""

import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import shamir
from secagg.errors import ConfigError, ShareError
from secagg.graph import neighbour_graph
from secagg.prg import MaskStream, context
from secagg.ring import add_, lane_bits_for, pack, packed_nbytes, sub_, unpack, unpack_range

# ---- ring ------------------------------------------------------------------

PACKED_KAT = {  # [1,0,3,2,1,1,0,1,1,3,0,2,1] mod 2^b, packed
    1: "b513",
    2: "b1458d01",
    4: "01231110312001",
    8: "01000302010100010103000201",
    16: "0100000003000200010001000000010001000300000002000100",
    32: (
        "01000000000000000300000002000000"
        "01000000010000000000000001000000"
        "01000000030000000000000002000000"
        "01000000"
    ),
    64: (
        "0100000000000000000000000000000003000000000000000200000000000000"
        "0100000000000000010000000000000000000000000000000100000000000000"
        "0100000000000000030000000000000000000000000000000200000000000000"
        "0100000000000000"
    ),
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_packing_known_answer(bits):
    values = np.array([1, 0, 3, 2, 1, 1, 0, 1, 1, 3, 0, 2, 1], dtype=np.uint64)
    values %= np.uint64(1 << min(bits, 63))
    packed = pack(values, bits)
    assert packed.tobytes().hex() == PACKED_KAT[bits]
    assert len(packed) == packed_nbytes(13, bits)
    assert np.array_equal(unpack(packed, bits, 13), values)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8, 16, 32, 64]), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_packed_add_and_sub_equal_lanewise_modular_arithmetic(bits, n, seed):
    rng = np.random.default_rng(seed)
    # Python integers, so that the expected sums are exact beyond 64 bits.
    a = [int(x) for x in rng.integers(0, 1 << bits, n, dtype=np.uint64, endpoint=False)]
    b = [int(x) for x in rng.integers(0, 1 << bits, n, dtype=np.uint64, endpoint=False)]
    s = pack(np.array(a, dtype=np.uint64), bits)
    add_(s, pack(np.array(b, dtype=np.uint64), bits), bits)
    assert [int(x) for x in unpack(s, bits, n)] == [(x + y) % (1 << bits) for x, y in zip(a, b, strict=True)]
    d = pack(np.array(a, dtype=np.uint64), bits)
    sub_(d, pack(np.array(b, dtype=np.uint64), bits), bits)
    assert [int(x) for x in unpack(d, bits, n)] == [(x - y) % (1 << bits) for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_every_tail_length_keeps_lanes_apart(bits):
    """Whole 64-bit words followed by every tail length (0..7 bytes), at every lane width."""
    rng = np.random.default_rng(bits)
    for nbytes in range(8, 8 * 3 + 8):
        n = nbytes * 8 // bits
        if n == 0 or packed_nbytes(n, bits) != nbytes:
            continue
        a = rng.integers(0, 1 << bits, n)
        b = rng.integers(0, 1 << bits, n)
        a[0], b[0] = (1 << bits) - 1, (1 << bits) - 1  # the largest carry out of a lane
        a[-1], b[-1] = (1 << bits) - 1, 1  # ... in the tail too
        s = pack(a, bits)
        add_(s, pack(b, bits), bits)
        assert np.array_equal(unpack(s, bits, n), (a + b) % (1 << bits)), nbytes
        sub_(s, pack(b, bits), bits)
        sub_(s, pack(b, bits), bits)
        assert np.array_equal(unpack(s, bits, n), (a - b) % (1 << bits)), nbytes
    if bits == 16:  # the reported bug: a 16-bit tail added byte by byte lost its carries
        s = pack(np.array([200, 200, 200]), 16)
        add_(s, pack(np.array([200, 200, 200]), 16), 16)
        assert unpack(s, 16, 3).tolist() == [400, 400, 400]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8, 16]), n=st.integers(1, 300), seed=st.integers(0, 99))
def test_no_input_carries_into_a_neighbouring_lane(bits, n, seed):
    """A malicious lane value (2^b - 1, i.e. -1) changes its own lane's sum and no other."""
    rng = np.random.default_rng(seed)
    honest = rng.integers(0, 2, n)
    evil = np.zeros(n, dtype=np.int64)
    evil[rng.integers(0, n)] = (1 << bits) - 1
    mask = rng.integers(0, 256, packed_nbytes(n, bits), dtype=np.uint8)
    acc = pack(honest, bits)
    add_(acc, mask, bits)
    add_(acc, pack(evil, bits), bits)
    sub_(acc, mask, bits)
    assert np.array_equal(unpack(acc, bits, n), (honest + evil) % (1 << bits))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_a_range_unpacks_as_the_same_slice_of_the_whole(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << min(bits, 62), 333, dtype=np.uint64)
    packed = pack(values, bits)
    for start, count in [(0, 333), (5, 17), (7, 0), (100, 233), (331, 2)]:
        part = unpack_range(packed, bits, start, count)
        assert np.array_equal(part.astype(np.uint64), values[start : start + count])


def test_lane_width_is_the_smallest_that_holds_m():
    assert [lane_bits_for(m) for m in (1, 2, 3, 4, 15, 16, 255, 256)] == [1, 2, 2, 4, 4, 8, 8, 16]
    with pytest.raises(ConfigError):
        lane_bits_for(70000)


# ---- PRG -------------------------------------------------------------------

SEED = bytes(range(32))
CTX = context(bytes(16), 3, "self", 7)


def test_prg_known_answer():
    stream = MaskStream.derive(SEED, CTX)
    assert CTX == b"fedprune-secagg/v1|00000000000000000000000000000000|3|self|7"
    assert stream.key.hex() == "a044df6fec2eec9abca36821bc2f4a6ba3d1fa1789a214b9304414e3c4b071aa"
    assert stream.bytes(0, 32).hex() == ("3d12ef19ea2633194a327361834ed49be3a7a3a5db069b4ac3502980819303d0")
    assert stream.bytes(1000, 16).hex() == "e2735c34b0e80de17d537750ce6c8add"


def test_prg_is_aes_ctr_with_the_block_index_as_counter():
    """Independent derivation: AES-ECB of big-endian counter blocks."""
    stream = MaskStream.derive(SEED, CTX)
    ecb = Cipher(algorithms.AES(stream.key), modes.ECB()).encryptor()
    blocks = b"".join(i.to_bytes(16, "big") for i in range(62, 66))
    expected = ecb.update(blocks)
    assert stream.bytes(62 * 16, 64) == expected


@settings(max_examples=30, deadline=None)
@given(offset=st.integers(0, 5000), length=st.integers(1, 3000))
def test_chunked_generation_equals_one_shot(offset, length):
    stream = MaskStream.derive(SEED, CTX)
    whole = stream.bytes(0, 8000)
    assert stream.bytes(offset, length) == whole[offset : offset + length]


def test_contexts_separate_streams():
    a = MaskStream.derive(SEED, context(bytes(16), 0, "pair", 1, 2)).bytes(0, 32)
    b = MaskStream.derive(SEED, context(bytes(16), 1, "pair", 1, 2)).bytes(0, 32)
    c = MaskStream.derive(SEED, context(bytes(16), 0, "self", 1)).bytes(0, 32)
    assert len({a, b, c}) == 3


# ---- Shamir ----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_t_shares_recover_the_secret(n, data):
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert shamir.combine([shares[x] for x in subset], t) == secret


def test_too_few_inconsistent_or_duplicate_shares_are_rejected():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    with pytest.raises(ShareError, match="need 3"):
        shamir.combine([shares[1], shares[2]], 3)
    tampered = shamir.Share(4, (int.from_bytes(shares[4].y, "big") ^ 1).to_bytes(66, "big"))
    with pytest.raises(ShareError, match="inconsistent"):
        shamir.combine([shares[1], shares[2], shares[3], tampered], 3)
    with pytest.raises(ShareError, match="duplicate"):
        shamir.combine([shares[1], shares[1], shares[2]], 3)


# ---- graph -----------------------------------------------------------------


def test_secagg_plus_graph_is_k_regular_symmetric_and_seeded():
    g = neighbour_graph(range(64), 12, b"seed")
    assert all(len(n) == 12 and c not in n for c, n in g.items())
    assert all(c in g[v] for c, n in g.items() for v in n)
    assert g == neighbour_graph(range(64), 12, b"seed")
    assert g != neighbour_graph(range(64), 12, b"other")
    assert all(len(n) == 4 for n in neighbour_graph(range(5), None, b"x").values())


def test_secagg_imports_neither_torch_nor_grpc():
    code = (
        "import sys, secagg; bad = {'torch', 'grpc', 'transformers'} & set(sys.modules); "
        "print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
