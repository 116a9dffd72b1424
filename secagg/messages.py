"""Protocol messages (frozen dataclasses) and the session configuration.

A session is one roster of clients and one neighbour graph; it runs one or
more rounds (one per aggregation; iterative pruning runs one per decoder
block). Every round is self-contained: it starts with freshly generated,
signed key pairs, so nothing revealed in one round says anything about
another. Message flow per round: AdvertiseKeys -> KeyDirectory ->
EncryptedShares -> ShareBundle -> MaskedChunk* -> SurvivorList ->
ConsistencySignature -> UnmaskRequest -> UnmaskShares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from .errors import ConfigError
from .graph import neighbour_graph
from .ring import LANE_BITS, add_, packed_nbytes, sub_
from .shamir import Share

CHUNK_ALIGN = 128  # elements; keeps every chunk on a whole AES block for any lane width
ThreatModel = Literal["honest-but-curious", "malicious"]


def default_threshold(group_size: int, threat: ThreatModel = "honest-but-curious") -> int:
    """The smallest safe t for a sharing group of ``group_size`` (neighbours + the client).

    ``honest-but-curious``: t > g/2, so two disjoint sets of t holders cannot exist and
    no client's self-mask and mask-key shares can both reach t in one round, whatever
    survivor lists the server shows to whom. ``malicious``: t > 2g/3 (Bonawitz et al.,
    CCS 2017, for an actively malicious server that may also forge dropouts).
    """
    if threat == "malicious":
        return 2 * group_size // 3 + 1
    if threat == "honest-but-curious":
        return group_size // 2 + 1
    raise ConfigError(f"threat model must be honest-but-curious or malicious, got {threat!r}")


@dataclass(frozen=True)
class SessionConfig:
    """Public parameters every party agrees on before the first message."""

    session_id: bytes
    clients: tuple[int, ...]
    threshold: int
    vector_length: int
    lane_bits: int
    chunk_elems: int = 1 << 20
    neighbours: int | None = None  # None: complete graph (classic SecAgg)
    graph_seed: bytes = b""
    # Every honest input value is in [0, input_bound] (1: binary votes). On 32- and 64-bit
    # lanes, input_bound = 2^b - 1 declares ring inputs: any element of Z_(2^b) (fixed-point
    # values, negative ones in two's complement); the sum is then taken modulo 2^b and the
    # caller decodes it and checks it against its own bounds (the server checks nothing).
    input_bound: int = 1

    def __post_init__(self) -> None:
        if len(self.session_id) < 8:
            raise ConfigError("the session id must be at least 8 bytes")
        if len(self.clients) < 2 or len(set(self.clients)) != len(self.clients):
            raise ConfigError("a session needs at least 2 distinct clients")
        if any(c < 0 for c in self.clients):
            raise ConfigError("client ids must be non-negative integers")
        if self.lane_bits not in LANE_BITS:
            raise ConfigError(f"lane width must be one of {LANE_BITS}, got {self.lane_bits}")
        if self.input_bound < 1:
            raise ConfigError("the input bound must be at least 1")
        if self.input_bound > (1 << self.lane_bits) - 1:
            raise ConfigError(f"the input bound {self.input_bound} does not fit {self.lane_bits}-bit lanes")
        if not self.ring_inputs and (1 << self.lane_bits) <= self.input_bound * len(self.clients):
            raise ConfigError(
                f"{self.lane_bits}-bit lanes cannot hold a sum over {len(self.clients)} clients"
            )
        if self.vector_length < 1:
            raise ConfigError("the vector must have at least one element")
        if self.chunk_elems < CHUNK_ALIGN or self.chunk_elems % CHUNK_ALIGN:
            raise ConfigError(f"chunks must be a positive multiple of {CHUNK_ALIGN} elements")
        smallest = min(len(n) for n in self.graph.values()) + 1
        largest = max(len(n) for n in self.graph.values()) + 1
        if not largest // 2 < self.threshold <= smallest:
            raise ConfigError(
                f"threshold {self.threshold} must be more than half of every sharing group "
                f"(the neighbours and the client itself: {largest}) and at most the smallest "
                f"({smallest}); a lower threshold lets a server show two disjoint halves two "
                "different stories and unmask a client"
            )

    @property
    def ring_inputs(self) -> bool:
        """Whether inputs are arbitrary ring elements summed modulo 2^b (wide lanes only)."""
        return self.lane_bits >= 32 and self.input_bound == (1 << self.lane_bits) - 1

    @cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        return neighbour_graph(self.clients, self.neighbours, self.graph_seed or self.session_id)

    def group(self, client: int) -> frozenset[int]:
        """The client's sharing group: its neighbours and itself (the holders of its shares)."""
        return self.graph[client] | {client}

    @property
    def dropout_tolerance(self) -> int:
        """How many members of a sharing group may drop while every round still completes."""
        return min(len(n) for n in self.graph.values()) + 1 - self.threshold

    def add_(self, acc: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc += x, lane by lane in Z_(2^b) (no carry crosses a lane)."""
        return add_(acc, x, self.lane_bits)

    def sub_(self, acc: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc -= x, lane by lane in Z_(2^b)."""
        return sub_(acc, x, self.lane_bits)

    @property
    def num_chunks(self) -> int:
        return -(-self.vector_length // self.chunk_elems)

    def chunk_count(self, offset: int) -> int:
        """Elements in the chunk that starts at ``offset``."""
        return min(self.chunk_elems, self.vector_length - offset)

    def byte_offset(self, offset: int) -> int:
        return offset * self.lane_bits // 8

    def chunk_nbytes(self, offset: int) -> int:
        return packed_nbytes(self.chunk_count(offset), self.lane_bits)

    @property
    def packed_length(self) -> int:
        return packed_nbytes(self.vector_length, self.lane_bits)


@dataclass(frozen=True)
class AdvertiseKeys:
    """A client's key pairs for one round, generated for that round alone."""

    session: bytes
    round: int
    sender: int
    enc_public: bytes  # X25519, encrypts this round's shares
    mask_public: bytes  # X25519, agrees this round's pairwise mask seeds
    seed_commitment: bytes  # SHA-256 binding this round's self-mask seed (see seed_commitment)
    signature: bytes  # Ed25519 identity key over all of the above


@dataclass(frozen=True)
class KeyDirectory:
    session: bytes
    round: int
    adverts: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShares:
    session: bytes
    round: int
    sender: int
    ciphertexts: Mapping[int, bytes] = field(default_factory=dict)  # receiver -> AES-GCM


@dataclass(frozen=True)
class ShareBundle:
    session: bytes
    round: int
    receiver: int
    ciphertexts: Mapping[int, bytes] = field(default_factory=dict)  # sender -> AES-GCM


@dataclass(frozen=True)
class MaskedChunk:
    session: bytes
    round: int
    sender: int
    offset: int  # in elements, a multiple of chunk_elems
    data: bytes  # packed lanes


@dataclass(frozen=True)
class SurvivorList:
    session: bytes
    round: int
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class ConsistencySignature:
    session: bytes
    round: int
    sender: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    session: bytes
    round: int
    survivors: tuple[int, ...]
    signatures: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskShares:
    session: bytes
    round: int
    sender: int
    self_mask_shares: Mapping[int, Share] = field(default_factory=dict)  # survivor -> share
    key_shares: Mapping[int, Share] = field(default_factory=dict)  # dropped client -> share


def advert_message(
    session: bytes, round_number: int, sender: int, enc_public: bytes, mask_public: bytes, commitment: bytes
) -> bytes:
    fields = [b"advertise", session, str(round_number).encode(), str(sender).encode()]
    return b"|".join([*fields, enc_public, mask_public, commitment])


def seed_commitment(session: bytes, round_number: int, sender: int, self_seed: bytes) -> bytes:
    """A hiding, binding commitment to a self-mask seed (the seed is 32 random bytes).

    It lets the server recognise the right seed when some unmask shares are corrupted,
    and name the holders that sent them, instead of aborting the round.
    """
    context = b"|".join([b"self-seed", session, str(round_number).encode(), str(sender).encode()])
    return hashlib.sha256(context + b"|" + self_seed).digest()


def survivors_message(session: bytes, round_number: int, survivors: tuple[int, ...]) -> bytes:
    ids = ",".join(str(c) for c in sorted(survivors)).encode()
    return b"|".join([b"survivors", session, str(round_number).encode(), ids])
