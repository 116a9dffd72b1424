"""Faulty and malicious clients for the federation tests, through the ClientHooks seam.

    python -m tests.fault_client FAULT client --server ... (the usual client arguments)

The shipped client never reads a fault from its environment; these hooks exist only here.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

import secagg.client
from nodes.cli import main
from nodes.client import ClientHooks


class ExitBeforeInput(ClientHooks):
    def before_input(self, rnd):
        os._exit(3)


class StallBeforeInput(ClientHooks):
    def before_input(self, rnd):
        time.sleep(3600)  # holds the round open until the test kills us


class ExitAfterInput(ClientHooks):
    def after_input(self, rnd):
        time.sleep(1.0)  # let the stream flush, then vanish
        os._exit(3)


class ExitAfterSharesInRound1(ClientHooks):
    """Shares its keys in round 1, then vanishes: its round-1 mask key gets reconstructed."""

    def after_shares(self, rnd):
        if rnd == 1:
            time.sleep(1.0)
            os._exit(3)


class ExitMidUpload(ClientHooks):
    """Sends its first masked chunk, then dies: the rest of its upload never arrives."""

    def chunks(self, rnd, chunks):
        yield next(iter(chunks))
        time.sleep(1.0)
        os._exit(3)


class BadChunk(ClientHooks):
    """An off-grid chunk, then every chunk with the first one sent twice."""

    def chunks(self, rnd, chunks):
        from nodes.wire import federation_pb2 as pb

        yield pb.VectorChunk(round=rnd, offset=3, data=b"\x00")
        for i, chunk in enumerate(chunks):
            yield chunk
            if i == 0:
                yield chunk


class ExtraVotes(ClientHooks):
    """A malicious client: two votes for each of the first 64 weights of every round.

    It also skips its own secure-aggregation range check, as a real attacker would.
    """

    def __init__(self) -> None:
        original = secagg.client.ClientSession.masked_chunks

        def unchecked(session, values):
            loose = copy.copy(session.round_config)
            object.__setattr__(loose, "input_bound", (1 << loose.lane_bits) - 1)
            session.round_config = loose
            return original(session, values)

        secagg.client.ClientSession.masked_chunks = unchecked

    def round_input(self, rnd, values):
        def doubled(offset, count):
            chunk = np.array(values(offset, count), dtype=np.uint8)
            chunk[: max(0, 64 - offset)] = 2
            return chunk

        return doubled


class HugeStatistics(ClientHooks):
    """A malicious statistics client: channel 0 of every block claims 2^62 (fixed point), far
    above what its token count and the clip allow. SecAgg's ring inputs let it through; only
    the server's check of the decoded sum can catch it."""

    def round_input(self, rnd, values):
        def huge(offset, count):
            chunk = np.array(values(offset, count), dtype=np.uint64)
            if offset == 0 and count:
                chunk[0] = np.uint64(2**62)
            return chunk

        return huge


class CorruptUnmaskShares(ClientHooks):
    """Flips one byte of every share it reveals (a faulty or malicious share holder)."""

    def unmask_shares(self, message):
        for table in (message.self_mask_shares, message.key_shares):
            for share in table.values():
                share.y = share.y[:-1] + bytes([share.y[-1] ^ 1])
        return message


FAULTS = {
    "exit-before-input": ExitBeforeInput,
    "stall-before-input": StallBeforeInput,
    "exit-after-input": ExitAfterInput,
    "exit-after-shares-round-1": ExitAfterSharesInRound1,
    "bad-chunk": BadChunk,
    "exit-mid-upload": ExitMidUpload,
    "extra-votes": ExtraVotes,
    "corrupt-unmask-shares": CorruptUnmaskShares,
    "huge-statistics": HugeStatistics,
}


class LateJoin(ClientHooks):
    """An honest client that connects only after a few seconds (the attackers go first)."""

    def __init__(self) -> None:
        time.sleep(6.0)


FAULTS["late-join"] = LateJoin


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], client_hooks=FAULTS[sys.argv[1]]()))
