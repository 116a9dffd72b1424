"""An in-process run of the whole protocol: for tests, benchmarks and the pruning simulation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import keys
from .client import ClientSession
from .messages import SessionConfig, ThreatModel, default_threshold
from .ring import lane_bits_for
from .server import ServerSession

DropPoint = Literal["before_advertising", "before_key_sharing", "after_key_sharing", "after_masked_input"]


@dataclass
class SimulationResult:
    """The unmasked sum and what the server saw."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    masked_inputs: dict[int, bytes] = field(default_factory=dict)  # only with record=True
    bytes_received: dict[int, int] = field(default_factory=dict)


def make_session(
    num_clients: int,
    vector_length: int,
    *,
    threshold: int | None = None,
    neighbours: int | None = None,
    lane_bits: int | None = None,
    chunk_elems: int = 1 << 16,
    session_id: bytes | None = None,
    threat: ThreatModel = "honest-but-curious",
    input_bound: int = 1,
) -> tuple[SessionConfig, ServerSession, dict[int, ClientSession]]:
    """A fresh session with random identities: the config, the server and every client."""
    ids = tuple(range(num_clients))
    identities = {c: Ed25519PrivateKey.generate() for c in ids}
    roster = {c: keys.raw_public(k.public_key()) for c, k in identities.items()}
    k = neighbours if neighbours is not None and neighbours < num_clients - 1 else None
    group = (k if k is not None else num_clients - 1) + 1
    config = SessionConfig(
        session_id=session_id or os.urandom(16),
        clients=ids,
        threshold=threshold if threshold is not None else default_threshold(group, threat),
        vector_length=vector_length,
        lane_bits=lane_bits or lane_bits_for(num_clients),
        chunk_elems=chunk_elems,
        neighbours=k,
        input_bound=input_bound,
    )
    server = ServerSession(config, roster)
    clients = {c: ClientSession(config, c, identities[c], roster) for c in ids}
    return config, server, clients


def run_round(
    server: ServerSession,
    clients: Mapping[int, ClientSession],
    vectors: Mapping[int, np.ndarray],
    round_number: int,
    dropouts: Mapping[int, DropPoint] | None = None,
    record: bool = False,
) -> SimulationResult:
    """One aggregation round among ``clients``: fresh keys, shares, masked input, unmasking."""
    dropouts = dict(dropouts or {})
    server.begin_round(round_number)
    for c in sorted(clients):
        if dropouts.get(c) != "before_advertising":
            server.receive_advertisement(clients[c].advertise(round_number))
    directory = server.key_directory()
    for c in sorted(clients):
        if dropouts.get(c) in ("before_advertising",):
            continue
        clients[c].receive_keys(directory)
        if dropouts.get(c) != "before_key_sharing":
            server.receive_shares(clients[c].share_keys())
    bundles = server.share_bundles()
    masked: dict[int, bytes] = {}
    for c, bundle in bundles.items():
        clients[c].receive_shares(bundle)
        if dropouts.get(c) == "after_key_sharing":
            continue
        parts = []
        for chunk in clients[c].masked_chunks(vectors[c]):
            server.receive_chunk(chunk)
            if record:
                parts.append(chunk.data)
        if record:
            masked[c] = b"".join(parts)
    survivors = server.survivor_list()
    responders = [c for c in survivors.survivors if dropouts.get(c) != "after_masked_input"]
    for c in responders:
        server.receive_signature(clients[c].sign_survivors(survivors))
    request = server.unmask_request()
    for c in responders:
        server.receive_unmask(clients[c].unmask(request))
    total = server.finish()
    return SimulationResult(total, server.survivors, server.dropped, masked, dict(server.bytes_received))


def simulate(
    vectors: Sequence[np.ndarray],
    *,
    dropouts: Mapping[int, DropPoint] | None = None,
    threshold: int | None = None,
    neighbours: int | None = None,
    lane_bits: int | None = None,
    chunk_elems: int = 1 << 16,
    record: bool = False,
    input_bound: int = 1,
) -> SimulationResult:
    """Run one secure round over ``vectors`` (one per client, values <= ``input_bound``).

    ``dropouts`` maps a client to the point where it drops. The result's ``total``
    equals the plain sum over the clients that sent their masked input.
    """
    length = len(vectors[0])
    _, server, clients = make_session(
        len(vectors),
        length,
        threshold=threshold,
        neighbours=neighbours,
        lane_bits=lane_bits,
        chunk_elems=chunk_elems,
        input_bound=input_bound,
    )
    return run_round(server, clients, dict(enumerate(vectors)), 0, dropouts, record)
