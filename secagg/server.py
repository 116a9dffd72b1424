"""The server's side of the protocol: it sums masked chunks as they arrive and, after
the consistency check, removes the masks with the survivors' shares.

The server holds one running sum (packed lanes, from ``buffer_factory``) and
never a client's full vector. It never asks for both shares of one client: for
a survivor it collects self-mask shares, for a client that dropped after
sharing keys it collects mask-key shares. Keys are per round, so a client
whose mask key was reconstructed in one round may take part in the next with
fresh keys. After unmasking it checks the sum against what honest inputs
allow (every lane at most ``input_bound`` times the number of survivors):
masking hides each input, so this is where an out-of-range input shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

import numpy as np

from . import keys, shamir
from .client import pair_seed_info
from .errors import (
    IncompleteInputError,
    InvalidAggregateError,
    ProtocolError,
    ReplayError,
    ShareError,
    SignatureError,
    ThresholdError,
    UnknownSenderError,
)
from .messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    KeyDirectory,
    MaskedChunk,
    SessionConfig,
    ShareBundle,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    advert_message,
    seed_commitment,
    survivors_message,
)
from .prg import MaskStream, context
from .ring import unpack

Phase = Literal["idle", "advertise", "share", "input", "consistency", "unmask", "done"]
BufferFactory = Callable[[int], np.ndarray]


def _zeros(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, dtype=np.uint8)


class ServerSession:
    """The coordinator's protocol state for a session; one round at a time."""

    def __init__(
        self,
        config: SessionConfig,
        roster: dict[int, bytes],
        buffer_factory: BufferFactory = _zeros,
    ) -> None:
        missing = [c for c in config.clients if c not in roster]
        if missing:
            raise UnknownSenderError(f"clients {missing} have no identity key on the roster")
        self.config = config
        self._roster = roster
        self._buffer_factory = buffer_factory
        self.phase: Phase = "idle"
        self.round: int | None = None
        self.rejected: dict[str, int] = {}

    # Round 0: this round's keys ------------------------------------------------
    def begin_round(self, round_number: int, vector_length: int | None = None) -> None:
        """Open a round; ``vector_length`` overrides the session's for this round only."""
        if self.phase not in ("idle", "done"):
            raise ProtocolError(f"cannot begin a round during phase {self.phase!r}")
        if self.round is not None and round_number <= self.round:
            raise ReplayError(f"round {round_number} is not after round {self.round}")
        self.round = round_number
        self.phase = "advertise"
        self.round_config = (
            replace(self.config, vector_length=vector_length) if vector_length else self.config
        )
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._shares: dict[int, EncryptedShares] = {}
        self._sum: np.ndarray | None = None
        self._chunks: dict[int, set[int]] = {}
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._unmask: dict[int, UnmaskShares] = {}
        self.dropped: tuple[int, ...] = ()
        self.bad_shares: dict[int, list[int]] = {}  # holder -> owners whose share it corrupted
        self.bytes_received: dict[int, int] = {}

    def receive_advertisement(self, msg: AdvertiseKeys) -> None:
        self._check_message(msg.session, msg.round, msg.sender, "advertise")
        if msg.sender in self._adverts:
            raise self._reject(ProtocolError(f"duplicate key advertisement from client {msg.sender}"))
        self._verify(
            msg.sender,
            msg.signature,
            advert_message(
                msg.session, msg.round, msg.sender, msg.enc_public, msg.mask_public, msg.seed_commitment
            ),
        )
        self._adverts[msg.sender] = msg
        keys_and_commitment = len(msg.enc_public) + len(msg.mask_public) + len(msg.seed_commitment)
        self._count(msg.sender, keys_and_commitment + len(msg.signature))

    def key_directory(self) -> KeyDirectory:
        """Close round 0 and publish this round's verified advertisements."""
        self._expect("advertise")
        self._require(len(self._adverts), "clients advertised keys")
        self.phase = "share"
        adverts = tuple(self._adverts[c] for c in sorted(self._adverts))
        return KeyDirectory(self.config.session_id, self.round, adverts)

    # Round 1 -----------------------------------------------------------------
    def receive_shares(self, msg: EncryptedShares) -> None:
        self._check_message(msg.session, msg.round, msg.sender, "share")
        if msg.sender not in self._adverts:
            raise self._reject(UnknownSenderError(f"client {msg.sender} did not advertise keys this round"))
        if msg.sender in self._shares:
            raise self._reject(ProtocolError(f"duplicate shares from client {msg.sender}"))
        allowed = self.config.graph[msg.sender] & set(self._adverts)
        stray = set(msg.ciphertexts) - allowed
        if stray:
            raise self._reject(
                ProtocolError(f"client {msg.sender} sent shares to non-neighbours {sorted(stray)}")
            )
        self._shares[msg.sender] = msg
        self._count(msg.sender, sum(len(c) for c in msg.ciphertexts.values()))

    def share_bundles(self) -> dict[int, ShareBundle]:
        """Close round 1: forward each client the shares addressed to it (from U2 senders)."""
        self._expect("share")
        senders = set(self._shares)
        self._require(len(senders), "clients shared keys")
        self.phase = "input"
        self._u2 = frozenset(senders)
        self._sum = self._buffer_factory(self.round_config.packed_length)
        bundles = {}
        for receiver in sorted(senders):
            cts = {
                s: self._shares[s].ciphertexts[receiver]
                for s in sorted(senders)
                if receiver in self._shares[s].ciphertexts
            }
            bundles[receiver] = ShareBundle(self.config.session_id, self.round, receiver, cts)
        return bundles

    # Round 2 -----------------------------------------------------------------
    def receive_chunk(self, msg: MaskedChunk) -> None:
        """Validate one masked chunk and add it into the running sum."""
        self.validate_chunk(msg, self._chunks.get(msg.sender, set()))
        self._chunks.setdefault(msg.sender, set()).add(msg.offset)
        start = self.round_config.byte_offset(msg.offset)
        target = self._sum[start : start + len(msg.data)]
        self.round_config.add_(target, np.frombuffer(msg.data, dtype=np.uint8))
        self._count(msg.sender, len(msg.data))

    def validate_chunk(self, msg: MaskedChunk, seen: set[int]) -> None:
        """Every check :meth:`receive_chunk` makes; ``seen``: offsets already taken from the sender.

        A transport that stages each client's chunks until its upload completes validates
        them here as they arrive and feeds them to :meth:`receive_chunk` only then.
        """
        cfg = self.round_config
        self._check_message(msg.session, msg.round, msg.sender, "input")
        if msg.sender not in self._u2:
            raise self._reject(UnknownSenderError(f"client {msg.sender} did not share keys this round"))
        if msg.offset % cfg.chunk_elems or not 0 <= msg.offset < cfg.vector_length:
            raise self._reject(ProtocolError(f"chunk offset {msg.offset} is not on the chunk grid"))
        if len(msg.data) != cfg.chunk_nbytes(msg.offset):
            raise self._reject(
                ProtocolError(
                    f"chunk at {msg.offset} has {len(msg.data)} bytes, "
                    f"expected {cfg.chunk_nbytes(msg.offset)}"
                )
            )
        if msg.offset in seen:
            raise self._reject(ProtocolError(f"duplicate chunk at {msg.offset} from client {msg.sender}"))

    def survivor_list(self) -> SurvivorList:
        """Close round 2: the clients whose whole masked vector arrived (U3)."""
        self._expect("input")
        total = self.round_config.num_chunks
        partial = sorted(c for c, seen in self._chunks.items() if 0 < len(seen) < total)
        if partial:
            self.phase = "done"
            raise IncompleteInputError(
                f"clients {partial} sent only part of their masked vector; their chunks cannot be "
                "removed from the running sum, the round is aborted"
            )
        self._survivors = tuple(sorted(c for c, seen in self._chunks.items() if len(seen) == total))
        self._require(len(self._survivors), "clients sent their masked input")
        self.phase = "consistency"
        return SurvivorList(self.config.session_id, self.round, self._survivors)

    # Round 3 -----------------------------------------------------------------
    def receive_signature(self, msg: ConsistencySignature) -> None:
        self._check_message(msg.session, msg.round, msg.sender, "consistency")
        if msg.sender not in self._survivors:
            raise self._reject(UnknownSenderError(f"client {msg.sender} is not a survivor"))
        if msg.sender in self._signatures:
            raise self._reject(ProtocolError(f"duplicate signature from client {msg.sender}"))
        self._verify(msg.sender, msg.signature, survivors_message(msg.session, msg.round, self._survivors))
        self._signatures[msg.sender] = msg.signature

    def unmask_request(self) -> UnmaskRequest:
        self._expect("consistency")
        self._require(len(self._signatures), "clients signed the survivor list")
        self.phase = "unmask"
        return UnmaskRequest(self.config.session_id, self.round, self._survivors, dict(self._signatures))

    # Round 4 -----------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._check_message(msg.session, msg.round, msg.sender, "unmask")
        if msg.sender not in self._signatures:
            raise self._reject(UnknownSenderError(f"client {msg.sender} did not sign the survivor list"))
        if msg.sender in self._unmask:
            raise self._reject(ProtocolError(f"duplicate unmask shares from client {msg.sender}"))
        survivors = set(self._survivors)
        for owner, share in msg.self_mask_shares.items():
            if owner not in survivors:
                raise self._reject(ProtocolError(f"self-mask share of non-survivor {owner}"))
            self._check_share(msg.sender, owner, share)
        for owner, share in msg.key_shares.items():
            if owner in survivors or owner not in self._u2 or owner == msg.sender:
                raise self._reject(ProtocolError(f"mask key share of client {owner}, who did not drop"))
            self._check_share(msg.sender, owner, share)
        self._unmask[msg.sender] = msg

    def finish(self) -> np.ndarray:
        """Reconstruct the masks, remove them, and return the summed vector (unpacked)."""
        packed = self.finish_packed()
        return unpack(packed, self.config.lane_bits, self.round_config.vector_length)

    def finish_packed(self) -> np.ndarray:
        """As :meth:`finish`, but the packed sum (unmasked in place, chunk by chunk)."""
        self._expect("unmask")
        cfg = self.round_config
        self._require(len(self._unmask), "clients sent unmasking shares")
        survivors = set(self._survivors)
        dropped = sorted(self._u2 - survivors)
        self_seeds = {v: self._reconstruct(v, "self") for v in self._survivors}
        dropped_keys = {v: self._reconstruct(v, "key") for v in dropped}
        info = pair_seed_info(cfg.session_id, self.round)
        session, rnd = cfg.session_id, self.round
        removals: list[tuple[MaskStream, bool]] = []  # (stream, subtract?)
        for v in self._survivors:
            removals.append((MaskStream.derive(self_seeds[v], context(session, rnd, "self", v)), True))
        for v in dropped:
            for w in sorted(cfg.graph[v] & survivors & self._u2):
                if w not in self._shares[v].ciphertexts:
                    continue  # w never received v's shares, so it did not mask with v
                seed = keys.agree(dropped_keys[v], self._adverts[w].mask_public, info)
                stream = MaskStream.derive(seed, context(session, rnd, "pair", *sorted((v, w))))
                removals.append((stream, w < v))  # w added +PRG when w < v: subtract it
        limit = cfg.input_bound * len(self._survivors)
        for start, stop in _chunk_ranges(cfg):
            target = self._sum[start:stop]
            for stream, subtract in removals:
                mask = stream.keystream(start, stop - start)
                (cfg.sub_ if subtract else cfg.add_)(target, mask)
            if limit < (1 << cfg.lane_bits) - 1:
                self._check_chunk(target, start, limit)
        self.phase = "done"
        self.dropped = tuple(dropped)
        return self._sum

    def _check_chunk(self, packed: np.ndarray, byte_start: int, limit: int) -> None:
        """Abort if any unmasked lane exceeds ``limit``: no honest inputs can sum to more."""
        bits = self.config.lane_bits
        lanes = unpack(packed, bits, len(packed) * 8 // bits)
        if lanes.size and int(lanes.max()) > limit:
            self.phase = "done"
            worst = int(np.argmax(lanes))
            raise InvalidAggregateError(
                f"round {self.round}: element {byte_start * 8 // bits + worst} sums to {int(lanes[worst])}, "
                f"more than {limit} ({len(self._survivors)} survivors x {self.config.input_bound}); a "
                "client sent values outside the honest range, the round is aborted"
            )

    @property
    def survivors(self) -> tuple[int, ...]:
        return self._survivors

    # Helpers -----------------------------------------------------------------
    def _reconstruct(self, owner: int, kind: Literal["self", "key"]) -> bytes:
        """The owner's self-mask seed or mask key, checked against its signed advertisement.

        A corrupted share does not abort the round while t good ones remain: the secret
        is found among subsets of t shares, and the holders of the bad ones are named
        in ``bad_shares``.
        """
        shares = []
        for msg in self._unmask.values():
            table = msg.self_mask_shares if kind == "self" else msg.key_shares
            if owner in table:
                shares.append(table[owner])
        if len(shares) < self.config.threshold:
            self.phase = "done"
            raise ThresholdError(
                f"only {len(shares)} of {self.config.threshold} needed shares to remove client "
                f"{owner}'s mask; the round is aborted"
            )
        advert = self._adverts[owner]
        if kind == "self":
            expected = advert.seed_commitment

            def is_secret(candidate: bytes) -> bool:
                return seed_commitment(self.config.session_id, self.round, owner, candidate) == expected
        else:

            def is_secret(candidate: bytes) -> bool:
                return keys.public_of(candidate) == advert.mask_public

        try:
            secret, bad = shamir.recover_verified(shares, self.config.threshold, is_secret)
        except ShareError as exc:
            self.phase = "done"
            raise ShareError(f"client {owner}'s {kind} secret: {exc}; the round is aborted") from exc
        for x in bad:
            self.bad_shares.setdefault(x - 1, []).append(owner)
        return secret

    def _check_share(self, holder: int, owner: int, share: shamir.Share) -> None:
        if (holder != owner and holder not in self.config.graph[owner]) or share.x != holder + 1:
            raise self._reject(ProtocolError(f"client {holder} cannot hold a share of client {owner}"))

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            self.phase = "done"
            raise ThresholdError(
                f"only {count} {what}; at least t = {self.config.threshold} are needed, the round is aborted"
            )

    def _expect(self, phase: Phase) -> None:
        if self.phase != phase:
            raise ProtocolError(f"expected phase {phase!r}, the session is in {self.phase!r}")

    def _check_session(self, session: bytes) -> None:
        if session != self.config.session_id:
            raise self._reject(ProtocolError("message for another session"))

    def _check_member(self, sender: int) -> None:
        if sender not in self.config.clients:
            raise self._reject(UnknownSenderError(f"unknown sender {sender}"))

    def _check_message(self, session: bytes, round_number: int, sender: int, phase: Phase) -> None:
        self._check_session(session)
        self._check_member(sender)
        if round_number != self.round:
            raise self._reject(
                ReplayError(f"message for round {round_number}, the server is in round {self.round}")
            )
        if self.phase != phase:
            raise self._reject(
                ProtocolError(f"{phase} message from client {sender} during phase {self.phase!r}")
            )

    def _verify(self, sender: int, signature: bytes, message: bytes) -> None:
        try:
            keys.verify(self._roster[sender], signature, message, f"client {sender}")
        except SignatureError as exc:
            raise self._reject(exc) from None

    def _reject(self, error: Exception) -> Exception:
        kind = type(error).__name__
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        return error

    def _count(self, sender: int, nbytes: int) -> None:
        self.bytes_received[sender] = self.bytes_received.get(sender, 0) + nbytes


def _chunk_ranges(cfg: SessionConfig) -> Iterator[tuple[int, int]]:
    for offset in range(0, cfg.vector_length, cfg.chunk_elems):
        start = cfg.byte_offset(offset)
        yield start, start + cfg.chunk_nbytes(offset)
