"""The aggregator interface, driven in process: ``aggregate(round, length) -> (sums, contributors)``.

A fake ``Federation`` stands in for the coordinator: it hands each server
message to an in-process client and feeds the client's answers back to the
aggregator's handler, step by step, as the gRPC streams would. The real
processes are covered by test_nodes_federation.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.aggregators import PlainAggregator, SecureAggregator
from nodes.errors import FederationAborted
from nodes.wire import convert
from nodes.wire import federation_pb2 as pb
from secagg import ClientSession, SessionConfig
from secagg.keys import raw_public
from secagg.ring import pack

SESSION = b"s" * 16
CHUNK = 256


class FakeClient:
    """One client's answers to the server's messages; ``vectors[round]`` is what it sends."""

    def __init__(self, index, identity, roster, vectors, lane_bits, input_bound, secure) -> None:
        self.index, self.vectors, self.lane_bits = index, vectors, lane_bits
        self.sa, self.pending = None, None
        if secure:
            cfg = SessionConfig(
                session_id=SESSION,
                clients=tuple(sorted(roster)),
                threshold=len(roster) // 2 + 1,
                vector_length=1,
                lane_bits=lane_bits,
                chunk_elems=CHUNK,
                input_bound=input_bound,
            )
            self.sa = ClientSession(cfg, index, identity, roster)

    def answer(self, kind, body) -> list[pb.ClientMessage]:
        sa = self.sa
        if kind == "round_start":
            vector = self.vectors[body.round]
            if sa is not None:
                self.pending = vector
                return [
                    pb.ClientMessage(key_advert=convert.advert_to_pb(sa.advertise(body.round, body.length)))
                ]
            chunks = [
                pb.VectorChunk(
                    round=body.round, offset=o, data=pack(vector[o : o + CHUNK], self.lane_bits).tobytes()
                )
                for o in range(0, len(vector), CHUNK)
            ]
            return [pb.ClientMessage(chunk=c) for c in chunks] + [
                pb.ClientMessage(round_done=pb.RoundDone(round=body.round))
            ]
        if kind == "key_directory":
            sa.receive_keys(convert.directory_from_pb(body, SESSION))
            return [pb.ClientMessage(encrypted_shares=convert.shares_to_pb(sa.share_keys()))]
        if kind == "share_bundle":
            sa.receive_shares(convert.bundle_from_pb(body, SESSION, self.index))
            msgs = [
                pb.ClientMessage(chunk=pb.VectorChunk(round=c.round, offset=c.offset, data=c.data))
                for c in sa.masked_chunks(self.pending)
            ]
            return msgs + [pb.ClientMessage(round_done=pb.RoundDone(round=sa.round))]
        if kind == "survivor_list":
            sig = sa.sign_survivors(convert.survivors_from_pb(body, SESSION))
            return [
                pb.ClientMessage(
                    survivor_signature=pb.SurvivorSignature(round=sig.round, signature=sig.signature)
                )
            ]
        if kind == "unmask_request":
            return [
                pb.ClientMessage(
                    unmask_shares=convert.unmask_to_pb(sa.unmask(convert.request_from_pb(body, SESSION)))
                )
            ]
        raise AssertionError(f"unexpected server message {kind}")


class FakeFederation:
    """The coordinator's side of the interface, with in-process clients and no deadlines."""

    def __init__(self, clients: dict[str, FakeClient], silent: set[str] = frozenset()) -> None:
        self.members = sorted(clients)
        self.index = {c: i for i, c in enumerate(self.members)}
        self.clients, self.silent = clients, silent
        self.inbox: dict[str, list] = {c: [] for c in clients}
        self.decoded: list[str] = []

    def alive(self):
        return list(self.members)

    def send(self, client_id, **body):
        ((kind, value),) = body.items()
        self.inbox[client_id].append((kind, value))

    def collect(self, expected, handle, what):
        done = set()
        for cid in sorted(expected):
            pending, self.inbox[cid] = self.inbox[cid], []
            if cid in self.silent:
                continue
            for kind, body in pending:
                for msg in self.clients[cid].answer(kind, body):
                    if handle(cid, msg):
                        done.add(cid)
        return done

    def log(self, message):
        pass

    def record_decoded(self, rnd, description, dropped):
        self.decoded.append(description)


def _world(vectors_by_client, lane_bits, input_bound, secure, silent=frozenset()):
    ids = {name: Ed25519PrivateKey.generate() for name in vectors_by_client}
    roster = {i: raw_public(ids[c].public_key()) for i, c in enumerate(sorted(ids))}
    clients = {
        c: FakeClient(i, ids[c], roster, vectors_by_client[c], lane_bits, input_bound, secure)
        for i, c in enumerate(sorted(ids))
    }
    return FakeFederation(clients, silent), roster


def _aggregator(fed, roster, secure, lane_bits, input_bound, values, work_dir):
    """The aggregator under test, with the coordinator's minimum of 2 complete inputs."""
    if secure:
        return SecureAggregator(
            fed,
            session_id=SESSION,
            roster=roster,
            threshold=2,
            lane_bits=lane_bits,
            chunk_elems=CHUNK,
            neighbours=None,
            work_dir=work_dir,
            input_bound=input_bound,
            values=values,
        )
    return PlainAggregator(fed, lane_bits=lane_bits, chunk_elems=CHUNK, min_clients=2)


def _start_round(fed, rnd, length):
    for cid in fed.alive():  # what the coordinator sends before it asks for the sum
        fed.send(cid, round_start=pb.RoundStart(round=rnd, offset=0, length=length))


@pytest.mark.parametrize(
    ("secure", "lane_bits", "input_bound"),
    [(False, 1, 1), (True, 2, 1), (False, 4, 3), (True, 4, 3)],  # votes of 3 clients; values 0..3
)
def test_every_round_sums_its_own_length_at_the_configured_lane_width(
    secure, lane_bits, input_bound, tmp_path
):
    """Two rounds of different lengths (as iterative blocks, or statistics rounds, have);
    the lane width and input bound are the aggregator's configuration, not vote counts'."""
    rng = np.random.default_rng(0)
    lengths = [1000, 300]
    vectors = {c: [rng.integers(0, input_bound + 1, n).astype(np.uint8) for n in lengths] for c in "abc"}
    fed, roster = _world(vectors, lane_bits, input_bound, secure)
    agg = _aggregator(fed, roster, secure, lane_bits, input_bound, "test values", tmp_path)
    for rnd, length in enumerate(lengths):
        _start_round(fed, rnd, length)
        sums, contributors = agg.aggregate(rnd, length)
        assert contributors == [0, 1, 2]
        assert np.array_equal(sums, sum(vectors[c][rnd].astype(np.int64) for c in "abc"))
    agg.close()
    if secure:
        assert fed.decoded == [
            "round 0: 1000 test values over clients ['a', 'b', 'c']",
            "round 1: 300 test values over clients ['a', 'b', 'c']",
        ]
        assert agg.round_report["dropped"] == [] and "keys_s" in agg.round_report


def test_plain_round_with_too_few_complete_vectors_aborts():
    vectors = {c: [np.ones(500, dtype=np.uint8)] for c in "abc"}
    fed, _ = _world(vectors, 1, 1, secure=False, silent={"b", "c"})
    agg = PlainAggregator(fed, lane_bits=1, chunk_elems=CHUNK, min_clients=2)
    _start_round(fed, 0, 500)
    with pytest.raises(FederationAborted, match="only 1 complete masks, at least 2 needed"):
        agg.aggregate(0, 500)


@pytest.mark.parametrize("secure", [False, True])
def test_64_bit_ring_inputs_sum_modulo_2_64(secure, tmp_path):
    """The statistics strategy's lanes: any uint64 (two's-complement fixed point), summed
    modulo 2^64 in plain mode as under SecAgg, over several chunks and a short last one."""
    rng = np.random.default_rng(1)
    length = 2 * CHUNK + 77
    vectors = {c: [rng.integers(0, 2**64, length, dtype=np.uint64, endpoint=False)] for c in "abc"}
    vectors["a"][0][:3] = [2**64 - 1, 2**63, 5]  # wraps: -1 + ... and the sign bit
    fed, roster = _world(vectors, 64, 2**64 - 1, secure)
    agg = _aggregator(fed, roster, secure, 64, 2**64 - 1, "statistics", tmp_path)
    _start_round(fed, 0, length)
    sums, contributors = agg.aggregate(0, length)
    expected = vectors["a"][0].copy()
    for c in "bc":
        np.add(expected, vectors[c][0], out=expected)
    assert contributors == [0, 1, 2] and sums.dtype == np.uint64
    assert np.array_equal(sums, expected)
