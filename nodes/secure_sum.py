"""The in-process secure sum: fedprune's aggregation seam filled by the secagg protocol.

``secure_sum`` has the signature of ``fedprune.strategies.plain_sum``: it takes
every simulated client's masks and returns vote counts, but the counts come
out of a full SecAgg round (keys, shares, masked vectors, unmasking).
``secure_vector_sum`` does the same for the ``statistics`` strategy: one round
over the clients' fixed-point uint64 vectors on 64-bit lanes with ring inputs
(the sum is modulo 2^64; ``fedprune.statistics.decode_block`` checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

import secagg


def secure_sum(client_masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = list(client_masks[0])
    vectors = [
        np.concatenate([m[n].flatten().cpu().numpy() for n in names]).astype(np.uint8) for m in client_masks
    ]
    total = secagg.simulate(vectors, chunk_elems=1 << 20).total
    counts, start = {}, 0
    for name in names:
        shape = client_masks[0][name].shape
        size = client_masks[0][name].numel()
        counts[name] = torch.from_numpy(total[start : start + size].astype(np.int16)).reshape(shape)
        start += size
    return counts


def secure_vector_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2^64 of every client's uint64 vector, out of one SecAgg round."""
    inputs = [np.asarray(v, dtype=np.uint64) for v in vectors]
    return secagg.simulate(inputs, lane_bits=64, input_bound=2**64 - 1, chunk_elems=1 << 16).total
