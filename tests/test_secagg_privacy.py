"""What the server holds in secure mode looks uniform and uncorrelated with each input."""

import itertools

import numpy as np
import pytest

from secagg import simulate
from secagg.ring import unpack

N = 1 << 16
# chi-square critical values at p = 1e-6 for 2^b - 1 degrees of freedom (Wilson-Hilferty):
# about 90 checks per run, so a false alarm is a one-in-ten-thousand event, not a flaky test.
CHI2_CRIT = {4: 57.3, 8: 377.2}


def chi_square(lanes: np.ndarray, bits: int) -> float:
    counts = np.bincount(lanes.astype(np.int64), minlength=1 << bits)
    expected = len(lanes) / (1 << bits)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module", params=[4, 8])
def secure_run(request):
    bits = request.param
    rng = np.random.default_rng(5)
    # Skewed, structured inputs: mostly zeros, with a block of ones (like a pruning mask).
    vectors = []
    for c in range(5):
        v = (rng.random(N) < 0.2).astype(np.uint8)
        v[c * 1000 : c * 1000 + 5000] = 1
        vectors.append(v)
    result = simulate(vectors, lane_bits=bits, chunk_elems=1 << 14, record=True)
    return bits, vectors, result


def test_each_masked_vector_is_uniform(secure_run):
    bits, vectors, result = secure_run
    for c, data in result.masked_inputs.items():
        lanes = unpack(np.frombuffer(data, dtype=np.uint8), bits, N)
        assert chi_square(lanes, bits) < CHI2_CRIT[bits], f"client {c}"
    # the test has teeth: a plain mask is far from uniform
    assert chi_square(vectors[0], bits) > 100 * CHI2_CRIT[bits]


def test_masked_vectors_are_uncorrelated_with_inputs(secure_run):
    bits, vectors, result = secure_run
    for c, data in result.masked_inputs.items():
        lanes = unpack(np.frombuffer(data, dtype=np.uint8), bits, N).astype(np.float64)
        r = np.corrcoef(lanes, vectors[c].astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(N)


def test_sum_of_any_proper_subset_is_uniform(secure_run):
    bits, vectors, result = secure_run
    lanes = {
        c: unpack(np.frombuffer(d, dtype=np.uint8), bits, N).astype(np.int64)
        for c, d in result.masked_inputs.items()
    }
    clients = sorted(lanes)
    for size in range(2, len(clients)):
        for subset in itertools.combinations(clients, size):
            total = sum(lanes[c] for c in subset) % (1 << bits)
            assert chi_square(total, bits) < CHI2_CRIT[bits], subset
    # Even the full sum is uniform until the self masks are removed with the survivors' shares.
    full = sum(lanes.values()) % (1 << bits)
    assert chi_square(full, bits) < CHI2_CRIT[bits]
    assert np.array_equal(result.total, sum(v.astype(np.int64) for v in vectors))
