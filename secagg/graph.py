"""Neighbour graphs: complete (classic SecAgg) or a SecAgg+ random k-regular graph.

The SecAgg+ graph (Bell et al. 2020) is a Harary graph over a random permutation
of the clients, derived from a public seed so that every party computes the
same graph: each client is linked to the k/2 clients on either side of it in
the permuted ring.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from .errors import ConfigError


def neighbour_graph(clients: Sequence[int], k: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """Client -> its neighbours. ``k=None`` (or k >= n-1) gives the complete graph."""
    ids = sorted(clients)
    n = len(ids)
    if k is None or k >= n - 1:
        return {c: frozenset(ids) - {c} for c in ids}
    if k < 2 or k % 2:
        raise ConfigError(f"a SecAgg+ graph needs an even number of neighbours >= 2, got {k}")
    order = list(ids)
    random.Random(hashlib.sha256(b"secagg+ graph|" + seed).digest()).shuffle(order)
    position = {c: i for i, c in enumerate(order)}
    graph = {}
    for c in ids:
        i = position[c]
        graph[c] = frozenset(order[(i + d) % n] for d in range(-(k // 2), k // 2 + 1) if d)
    return graph
