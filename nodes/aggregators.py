"""Aggregators: one round's sum of the clients' vectors, in the clear or under SecAgg.

The coordinator opens a round (``RoundStart``) and asks its aggregator for
``sum_round(round, length) -> (sums, contributors)``: the element-wise sum of
the ``length``-element vectors the clients send in that round, kept packed
(``RoundSums``: read one range, such as one layer, at a time), and the
indices of the clients whose vectors it holds; ``aggregate`` is the same with
the whole sum unpacked (for short vectors). Each aggregator owns its
round's exchange with the clients, through the small ``Federation``
interface the coordinator lends it (members, send, collect under the round
deadline, log). It knows nothing about what the vectors mean: the lane width
(bits per element on the wire, and for SecAgg the ring Z_(2^b)), the honest
input bound and the name of the values come from its configuration; checking
the sums against what honest clients can send is the caller's job.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from secagg import ServerSession, SessionConfig
from secagg.errors import SecAggError
from secagg.messages import ConsistencySignature, MaskedChunk
from secagg.ring import LANE_BITS, packed_nbytes, unpack_range

from .errors import FederationAborted, ProtocolViolation
from .staging import ChunkStaging
from .wire import convert
from .wire import federation_pb2 as pb

SPILL_BYTES = 1 << 30  # running sums larger than this live in a memory-mapped file

Handler = Callable[[str, pb.ClientMessage], bool]
"""Takes one client's message; True when that client is done for this step. Raises
``ProtocolViolation`` or ``SecAggError`` to reject the message (counted, the client stays)."""


class Federation(Protocol):
    """What the coordinator lends an aggregator: the session's members and its message pump."""

    members: list[str]  # members[i] is client index i
    index: dict[str, int]

    def alive(self) -> list[str]:
        """The members whose stream is still open, in index order."""

    def send(self, client_id: str, **body) -> None:
        """Queue one ServerMessage for a client (dropped if its stream is gone)."""

    def collect(self, expected: set[str], handle: Handler, what: str) -> set[str]:
        """Feed messages to ``handle`` until every expected client is done, gone, or the deadline."""

    def log(self, message: str) -> None: ...

    def record_decoded(self, rnd: int, description: str, dropped: list[str]) -> None:
        """Note in the audit's session.json what the server decoded in round ``rnd``."""


class RoundSums(Protocol):
    """One round's element-wise sum, still packed; unpacked one range at a time."""

    length: int

    def values(self, start: int, count: int) -> np.ndarray:
        """Elements ``[start, start + count)`` of the sum."""


class LaneSums:
    """Sums held as packed lanes of ``bits`` bits (SecAgg's unmasked running sum)."""

    def __init__(self, packed: np.ndarray, bits: int, length: int) -> None:
        self.packed, self.bits, self.length = packed, bits, length

    def values(self, start: int, count: int) -> np.ndarray:
        return unpack_range(self.packed, self.bits, start, count)


class VectorSums:
    """Sums of the clients' packed vectors, added up range by range (plain mode). Up to
    16-bit lanes the sums are counts (int32); wider lanes carry ring elements, summed
    modulo 2^bits as under SecAgg."""

    def __init__(self, vectors: list[np.ndarray], bits: int, length: int) -> None:
        self.vectors, self.bits, self.length = vectors, bits, length

    def values(self, start: int, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.int32 if self.bits <= 16 else np.dtype(f"uint{self.bits}"))
        for vector in self.vectors:
            np.add(out, unpack_range(vector, self.bits, start, count), out=out, casting="unsafe")
        return out


class Aggregator(ABC):
    """One round's sum of the members' vectors; ``round_report`` holds that round's extra facts."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.round_report: dict = {}

    @abstractmethod
    def sum_round(self, rnd: int, length: int) -> tuple[RoundSums, list[int]]:
        """The sum of round ``rnd``'s ``length``-element vectors (packed) and its contributors'
        indices.

        Raises ``FederationAborted`` when the round cannot produce a sum.
        """

    def aggregate(self, rnd: int, length: int) -> tuple[np.ndarray, list[int]]:
        """As :meth:`sum_round`, with the whole sum unpacked."""
        sums, contributors = self.sum_round(rnd, length)
        return sums.values(0, length), contributors

    def close(self) -> None:  # noqa: B027 (optional: most aggregators hold nothing)
        """Release what the aggregator still holds, in memory or on disk (after the last round;
        calling it again does nothing)."""


def _check_lane_bits(bits: int) -> None:
    if bits not in LANE_BITS:
        raise ValueError(f"lane width must be one of {LANE_BITS}, got {bits}")


class PlainAggregator(Aggregator):
    """Plain mode: every client sends its vector packed at ``lane_bits`` per element; the
    server sees each one and adds them up (Wanda votes: 1 bit per weight; the statistics
    strategy's fixed-point elements: 64-bit lanes, summed modulo 2^64).
    """

    def __init__(self, federation: Federation, *, lane_bits: int, chunk_elems: int, min_clients: int) -> None:
        super().__init__(federation)
        _check_lane_bits(lane_bits)
        self.lane_bits = lane_bits
        self.chunk_elems = chunk_elems  # a multiple of 128, so chunks start on whole bytes
        self.min_clients = min_clients

    def sum_round(self, rnd: int, length: int) -> tuple[RoundSums, list[int]]:
        fed, bits, chunk = self.federation, self.lane_bits, self.chunk_elems
        buffers: dict[str, np.ndarray] = {}  # packed, as received
        seen: dict[str, set[int]] = {}
        nchunks = -(-length // chunk)
        self.round_report = {}

        def on_input(cid, msg):
            kind = msg.WhichOneof("body")
            if kind == "round_done" and msg.round_done.round == rnd:
                if len(seen.get(cid, ())) != nchunks:
                    raise ProtocolViolation(f"incomplete mask from {cid}")
                return True
            if kind != "chunk" or msg.chunk.round != rnd:
                raise ProtocolViolation(f"expected mask chunks of round {rnd}, got {kind}")
            c = msg.chunk
            count = min(chunk, length - c.offset) if c.offset < length else 0
            if c.offset % chunk or count <= 0 or len(c.data) != packed_nbytes(count, bits):
                raise ProtocolViolation(f"malformed chunk at offset {c.offset}")
            if c.offset in seen.setdefault(cid, set()):
                raise ProtocolViolation(f"duplicate chunk at offset {c.offset}")
            seen[cid].add(c.offset)
            buf = buffers.get(cid)
            if buf is None:
                buf = buffers[cid] = np.zeros(packed_nbytes(length, bits), dtype=np.uint8)
            start = c.offset * bits // 8
            buf[start : start + len(c.data)] = np.frombuffer(c.data, dtype=np.uint8)
            return False

        done = fed.collect(set(fed.alive()), on_input, f"round {rnd} masks")
        if len(done) < self.min_clients:
            raise FederationAborted(
                f"round {rnd}: only {len(done)} complete masks, at least {self.min_clients} needed"
            )
        contributors = sorted(done, key=fed.index.__getitem__)
        sums = VectorSums([buffers.pop(cid) for cid in contributors], bits, length)
        return sums, [fed.index[c] for c in contributors]


class SecureAggregator(Aggregator):
    """Secure mode: one SecAgg round per call (Bonawitz et al.; SecAgg+ graphs), in the
    steps of Flower's SecAgg+ workflow: keys, share_keys, collect_masked_vectors,
    consistency, unmask. The server learns only the sum mod 2^lane_bits.

    The session (roster, graph, threshold) is fixed here; every round takes fresh
    keys, and its own vector length from the call.
    """

    def __init__(
        self,
        federation: Federation,
        *,
        session_id: bytes,
        roster: dict[int, bytes],
        threshold: int,
        lane_bits: int,
        chunk_elems: int,
        neighbours: int | None,
        work_dir: str | Path,
        input_bound: int = 1,
        values: str = "vote counts",
    ) -> None:
        """``roster``: client index -> Ed25519 identity key; ``work_dir``: where masked chunks
        are staged and a large running sum spills; ``values``: what the sums are, for the audit.
        """
        super().__init__(federation)
        self.session_id = session_id
        self.work_dir = Path(work_dir)
        self.values = values
        self.config = SessionConfig(
            session_id=session_id,
            clients=tuple(sorted(roster)),
            threshold=threshold,
            vector_length=1,  # a placeholder: every round sets its own (begin_round)
            lane_bits=lane_bits,
            chunk_elems=chunk_elems,
            neighbours=neighbours,
            input_bound=input_bound,
        )
        self._roster = roster
        self.session = ServerSession(self.config, roster, buffer_factory=self._sum_buffer)
        self._spill: Path | None = None

    def sum_round(self, rnd: int, length: int) -> tuple[RoundSums, list[int]]:
        fed, sa, sid = self.federation, self.session, self.session_id
        member = fed.members  # index -> client id
        times = {}
        self.round_report = {}
        try:
            t0 = time.perf_counter()
            sa.begin_round(rnd, vector_length=length)

            def on_advert(cid, msg):
                if msg.WhichOneof("body") != "key_advert" or msg.key_advert.sender != fed.index[cid]:
                    raise ProtocolViolation("expected this client's key advertisement")
                sa.receive_advertisement(convert.advert_from_pb(msg.key_advert, sid))
                return True

            advertised = fed.collect(set(fed.alive()), on_advert, f"round {rnd} keys")
            directory = convert.directory_to_pb(sa.key_directory())
            for cid in advertised:
                fed.send(cid, key_directory=directory)
            times["keys_s"] = time.perf_counter() - t0

            def on_shares(cid, msg):
                if msg.WhichOneof("body") != "encrypted_shares":
                    raise ProtocolViolation("expected encrypted shares")
                sa.receive_shares(convert.shares_from_pb(msg.encrypted_shares, sid, fed.index[cid]))
                return True

            fed.collect(advertised, on_shares, f"round {rnd} key shares")
            bundles = sa.share_bundles()
            for i, bundle in bundles.items():
                fed.send(member[i], share_bundle=convert.bundle_to_pb(bundle))
            fed.log(f"round {rnd}: {len(bundles)} clients shared keys; collecting masked input")

            sharers = {member[i] for i in bundles}
            self._collect_masked_input(rnd, sharers, sa.round_config.num_chunks)
            survivors = sa.survivor_list()
            fed.log(f"round {rnd}: inputs from {len(survivors.survivors)}/{len(bundles)}; consistency check")
            for i in survivors.survivors:
                fed.send(member[i], survivor_list=convert.survivors_to_pb(survivors))

            def on_signature(cid, msg):
                if msg.WhichOneof("body") != "survivor_signature":
                    raise ProtocolViolation("expected a survivor-list signature")
                s = msg.survivor_signature
                sa.receive_signature(ConsistencySignature(sid, s.round, fed.index[cid], s.signature))
                return True

            signers = fed.collect(
                {member[i] for i in survivors.survivors}, on_signature, f"round {rnd} consistency signatures"
            )
            request = sa.unmask_request()
            for cid in signers:
                fed.send(cid, unmask_request=convert.request_to_pb(request))

            def on_unmask(cid, msg):
                if msg.WhichOneof("body") != "unmask_shares":
                    raise ProtocolViolation("expected unmasking shares")
                sa.receive_unmask(convert.unmask_from_pb(msg.unmask_shares, sid, fed.index[cid]))
                return True

            fed.collect(set(signers), on_unmask, f"round {rnd} unmasking shares")
            fed.log(f"round {rnd}: unmasking")
            sums = LaneSums(sa.finish_packed(), self.config.lane_bits, length)
        except SecAggError as exc:
            raise FederationAborted(f"round {rnd} aborted: {exc}") from exc
        dropped = [member[i] for i in sa.dropped]
        bad = {member[h]: [member[o] for o in owners] for h, owners in sa.bad_shares.items()}
        for holder, owners in bad.items():
            fed.log(f"round {rnd}: {holder} sent corrupted unmask shares (for {owners}); excluded from them")
        fed.record_decoded(
            rnd,
            f"round {rnd}: {length} {self.values} over clients {[member[i] for i in survivors.survivors]}"
            + (f"; mask keys of this round reconstructed for dropped clients {dropped}" if dropped else ""),
            dropped,
        )
        self.round_report = {**times, "dropped": dropped, "bad_shares": bad}
        return sums, list(survivors.survivors)

    def _collect_masked_input(self, rnd: int, sharers: set[str], nchunks: int) -> None:
        """Stage each client's masked chunks; add a client's to the sum only once all arrived.

        A client whose upload stays incomplete is treated as dropped (see nodes.staging).
        """
        fed, sa, sid = self.federation, self.session, self.session_id
        staging = ChunkStaging(self.work_dir)

        def on_input(cid, msg):
            kind = msg.WhichOneof("body")
            if kind == "round_done" and msg.round_done.round == rnd:
                if len(staging.offsets.get(cid, ())) != nchunks:
                    staging.discard(cid)
                    fed.log(f"round {rnd}: {cid}'s upload is incomplete; treated as dropped")
                    return True
                for offset, data in staging.drain(cid):  # complete: into the running sum
                    sa.receive_chunk(MaskedChunk(sid, rnd, fed.index[cid], offset, data))
                return True
            if kind != "chunk":
                raise ProtocolViolation(f"expected masked chunks, got {kind}")
            c = msg.chunk
            chunk = MaskedChunk(sid, c.round, fed.index[cid], c.offset, c.data)
            sa.validate_chunk(chunk, staging.offsets.setdefault(cid, set()))
            staging.add(cid, c.offset, c.data)
            return False

        try:
            uploaded = fed.collect(sharers, on_input, f"round {rnd} masked input")
            for cid in sharers - uploaded:
                fed.log(f"round {rnd}: {cid} did not finish its upload; treated as dropped")
        finally:
            staging.close()

    def _sum_buffer(self, nbytes: int) -> np.ndarray:
        """The running sum: in memory, or a memory-mapped file for large one-shot vectors."""
        if nbytes < SPILL_BYTES:
            return np.zeros(nbytes, dtype=np.uint8)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / ".running-sum.tmp"
        self._spill = path
        return np.memmap(path, dtype=np.uint8, mode="w+", shape=(nbytes,))

    def close(self) -> None:
        # The session keeps the last round's running sum until another round begins.
        self.session = ServerSession(self.config, self._roster, buffer_factory=self._sum_buffer)
        if self._spill is not None:
            self._spill.unlink(missing_ok=True)
