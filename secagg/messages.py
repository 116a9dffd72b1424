"""Protocol messages (frozen dataclasses) and the session configuration.

A session is one roster of clients with agreed keys; it runs one or more
rounds (one per aggregation; iterative pruning runs one per decoder block).
Message flow per round: EncryptedShares -> ShareBundle -> MaskedChunk* ->
SurvivorList -> ConsistencySignature -> UnmaskRequest -> UnmaskShares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from .errors import ConfigError
from .graph import neighbour_graph
from .ring import LANE_BITS, add_, add_words_, packed_nbytes, sub_, sub_words_
from .shamir import Share

CHUNK_ALIGN = 128  # elements; keeps every chunk on a whole AES block for any lane width


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
    arithmetic: Literal["words", "lanes"] = "words"  # masking group, see secagg.ring

    def __post_init__(self) -> None:
        if len(self.session_id) < 8:
            raise ConfigError("the session id must be at least 8 bytes")
        if len(self.clients) < 2 or len(set(self.clients)) != len(self.clients):
            raise ConfigError("a session needs at least 2 distinct clients")
        if any(c < 0 for c in self.clients):
            raise ConfigError("client ids must be non-negative integers")
        if self.lane_bits not in LANE_BITS:
            raise ConfigError(f"lane width must be one of {LANE_BITS}, got {self.lane_bits}")
        if (1 << self.lane_bits) <= len(self.clients):
            raise ConfigError(
                f"{self.lane_bits}-bit lanes cannot hold a sum over {len(self.clients)} clients"
            )
        if self.vector_length < 1:
            raise ConfigError("the vector must have at least one element")
        if self.chunk_elems < CHUNK_ALIGN or self.chunk_elems % CHUNK_ALIGN:
            raise ConfigError(f"chunks must be a positive multiple of {CHUNK_ALIGN} elements")
        if self.arithmetic not in ("words", "lanes"):
            raise ConfigError(f"arithmetic must be 'words' or 'lanes', got {self.arithmetic!r}")
        smallest = min(len(n) for n in self.graph.values())
        if not 1 <= self.threshold <= smallest + 1:
            raise ConfigError(
                f"threshold {self.threshold} must be between 1 and the sharing group size {smallest + 1} "
                "(the neighbours and the client itself)"
            )

    @cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        return neighbour_graph(self.clients, self.neighbours, self.graph_seed or self.session_id)

    def add_(self, acc: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc += x in the session's masking group."""
        if self.arithmetic == "words":
            return add_words_(acc, x)
        return add_(acc, x, self.lane_bits)

    def sub_(self, acc: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc -= x in the session's masking group."""
        if self.arithmetic == "words":
            return sub_words_(acc, x)
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
    session: bytes
    sender: int
    enc_public: bytes  # X25519, encrypts shares
    mask_public: bytes  # X25519, agrees pairwise mask seeds
    signature: bytes  # Ed25519 identity key over the above


@dataclass(frozen=True)
class KeyDirectory:
    session: bytes
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


def advert_message(session: bytes, sender: int, enc_public: bytes, mask_public: bytes) -> bytes:
    return b"|".join([b"advertise", session, str(sender).encode(), enc_public, mask_public])


def survivors_message(session: bytes, round_number: int, survivors: tuple[int, ...]) -> bytes:
    ids = ",".join(str(c) for c in sorted(survivors)).encode()
    return b"|".join([b"survivors", session, str(round_number).encode(), ids])
