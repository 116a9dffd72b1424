"""The in-process secure sum: fedprune's aggregation seam filled by the secagg protocol.

``secure_sum`` has the signature of ``fedprune.strategies.plain_sum``: it takes
every simulated client's masks and returns vote counts, but the counts come
out of a full SecAgg round (keys, shares, masked vectors, unmasking).
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
