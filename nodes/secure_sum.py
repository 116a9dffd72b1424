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
from fedprune.models import Layout


def secure_sum(client_masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # The masks' own layout: their layers end to end, in the order the clients list them.
    lay = Layout.from_shapes((name, 0, tuple(mask.shape)) for name, mask in client_masks[0].items())
    vectors = [lay.flatten(masks).astype(np.uint8) for masks in client_masks]
    total = secagg.simulate(vectors, chunk_elems=1 << 20).total
    return {name: torch.from_numpy(counts.astype(np.int16)) for name, counts in lay.unflatten(total).items()}


def secure_vector_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2^64 of every client's uint64 vector, out of one SecAgg round."""
    inputs = [np.asarray(v, dtype=np.uint64) for v in vectors]
    return secagg.simulate(inputs, lane_bits=64, input_bound=2**64 - 1, chunk_elems=1 << 16).total
