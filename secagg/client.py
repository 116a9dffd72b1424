"""The client's side of the protocol: a state machine from messages to messages.

Bonawitz et al. (CCS 2017), rounds 0-4, with the SecAgg+ neighbour graph and
a multi-round session. Every round starts from scratch: fresh X25519 key pairs
(share encryption and mask agreement), signed with the round number, a fresh
self-mask seed, fresh Shamir shares. Whatever the server may legitimately
reconstruct in one round (a dropped client's mask key, a survivor's self-mask
seed) is therefore useless in every other round, and the rule "never reveal
both shares of one client" only has to hold within a round, where it holds by
construction: a client signs one survivor list per round and answers one
unmask request for exactly that list, revealing for each peer either its
self-mask share (a survivor) or its mask-key share (dropped), never both.

Every set the server shows a client is checked against the threshold t
(t > half of each sharing group, the client counted): the neighbours that
advertised keys, the neighbours whose shares it received, the survivors it
masked with, and the survivors that signed the same list. With t > g/2, two
disjoint groups of t holders cannot exist, so no split view can collect t
self-mask shares and t mask-key shares of one client in one round.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import keys, shamir
from .errors import ProtocolError, RefusalError, ReplayError, ThresholdError, UnknownSenderError
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
from .ring import pack

ChunkSource = Callable[[int, int], np.ndarray]  # (offset, count) -> values


def pair_seed_info(session: bytes, round_number: int) -> bytes:
    return b"pair-seed|" + session + b"|" + str(round_number).encode()


def share_key_info(session: bytes, round_number: int) -> bytes:
    return b"share-encryption|" + session + b"|" + str(round_number).encode()


def share_associated_data(session: bytes, round_number: int, sender: int, receiver: int) -> bytes:
    return context(session, round_number, "share", sender, receiver)


class ClientSession:
    """One client's protocol state for a whole session (all its rounds)."""

    def __init__(
        self,
        config: SessionConfig,
        client_id: int,
        identity: Ed25519PrivateKey,
        roster: dict[int, bytes],
    ) -> None:
        if client_id not in config.clients:
            raise UnknownSenderError(f"client {client_id} is not in this session")
        self.config = config
        self.id = client_id
        self._identity = identity
        self._roster = roster
        self.neighbours = config.graph[client_id]
        self.round: int | None = None
        self.phase = "idle"

    # Round 0: advertise this round's keys ------------------------------------
    def advertise(self, round_number: int, vector_length: int | None = None) -> AdvertiseKeys:
        """Open round ``round_number`` with fresh key pairs, signed with the round number.

        ``vector_length`` overrides the session's for this round only.
        """
        if self.round is not None and round_number <= self.round:
            raise ReplayError(f"round {round_number} is not after round {self.round}")
        self.round = round_number
        self.round_config = (
            replace(self.config, vector_length=vector_length) if vector_length else self.config
        )
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._peer_enc: dict[int, bytes] = {}
        self._pair_seeds: dict[int, bytes] = {}
        self._self_seed = os.urandom(32)  # committed to in the advertisement
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # peer -> (key, self)
        self._active: frozenset[int] = frozenset()
        self._signed: tuple[int, ...] | None = None
        self.phase = "advertised"
        enc = keys.raw_public(self._enc_key.public_key())
        mask = keys.raw_public(self._mask_key.public_key())
        session = self.config.session_id
        commit = seed_commitment(session, round_number, self.id, self._self_seed)
        sig = keys.sign(self._identity, advert_message(session, round_number, self.id, enc, mask, commit))
        return AdvertiseKeys(session, round_number, self.id, enc, mask, commit, sig)

    def receive_keys(self, directory: KeyDirectory) -> None:
        """Verify the neighbours' signed keys for this round; agree a pairwise mask seed with each."""
        self._check_round(directory.session, directory.round, "advertised")
        info = pair_seed_info(self.config.session_id, self.round)
        peer_enc, pair_seeds = {}, {}
        for ad in directory.adverts:
            if ad.sender not in self.neighbours:
                continue
            if ad.session != self.config.session_id or ad.round != self.round:
                raise ReplayError(f"client {ad.sender}'s keys are for another session or round")
            if ad.sender in peer_enc:
                raise ProtocolError(f"two key advertisements from client {ad.sender}")
            keys.verify(
                self._roster_key(ad.sender),
                ad.signature,
                advert_message(
                    ad.session, ad.round, ad.sender, ad.enc_public, ad.mask_public, ad.seed_commitment
                ),
                f"client {ad.sender}",
            )
            peer_enc[ad.sender] = ad.enc_public
            pair_seeds[ad.sender] = keys.agree(self._mask_key, ad.mask_public, info)
        self._require(len(pair_seeds) + 1, "neighbours (this client counted) advertised keys")
        self._peer_enc, self._pair_seeds = peer_enc, pair_seeds
        self.phase = "keys"

    # Round 1: share keys -----------------------------------------------------
    def share_keys(self) -> EncryptedShares:
        """Fresh self-mask seed; Shamir shares of it and of this round's mask key, sealed per neighbour."""
        self._expect("keys")
        session, rnd = self.config.session_id, self.round
        holders = sorted(self._peer_enc)
        xs = [h + 1 for h in (*holders, self.id)]  # as in Bonawitz et al., we hold a share too
        key_shares = shamir.split(keys.raw_private(self._mask_key), self.config.threshold, xs)
        self_shares = shamir.split(self._self_seed, self.config.threshold, xs)
        info = share_key_info(session, rnd)
        sealed = {}
        for h in holders:
            key = keys.agree(self._enc_key, self._peer_enc[h], info)
            plaintext = key_shares[h + 1].y + self_shares[h + 1].y
            sealed[h] = keys.seal(key, plaintext, share_associated_data(session, rnd, self.id, h))
        self._own_shares = (key_shares[self.id + 1], self_shares[self.id + 1])
        self.phase = "shared"
        return EncryptedShares(session, rnd, self.id, sealed)

    def receive_shares(self, bundle: ShareBundle) -> None:
        """Open the shares the neighbours sent us; they define who we mask with this round."""
        self._check_round(bundle.session, bundle.round, "shared")
        if bundle.receiver != self.id:
            raise ProtocolError(f"bundle for client {bundle.receiver} delivered to {self.id}")
        info = share_key_info(self.config.session_id, self.round)
        held = {}
        for sender, sealed in bundle.ciphertexts.items():
            if sender not in self._peer_enc:
                raise UnknownSenderError(f"shares from client {sender}, not a neighbour with keys")
            key = keys.agree(self._enc_key, self._peer_enc[sender], info)
            ad = share_associated_data(self.config.session_id, bundle.round, sender, self.id)
            plain = keys.open_sealed(key, sealed, ad, f"client {sender}")
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise ProtocolError(f"share payload from client {sender} has the wrong length")
            x = self.id + 1
            held[sender] = (
                shamir.Share(x, plain[: shamir.SHARE_BYTES]),
                shamir.Share(x, plain[shamir.SHARE_BYTES :]),
            )
        # Masking with fewer than t - 1 peers would leave the input behind the self mask
        # alone, which the ordinary unmasking of a survivor removes.
        self._require(len(held) + 1, "neighbours (this client counted) sent key shares")
        self._active = frozenset(held)
        held[self.id] = self._own_shares  # revealed only as a self-mask share, when we survive
        self._held = held
        self.phase = "input"

    # Round 2: masked input ---------------------------------------------------
    def masked_chunks(self, values: np.ndarray | ChunkSource) -> Iterator[MaskedChunk]:
        """Stream the masked vector chunk by chunk: x + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^b per lane."""
        self._expect("input")
        cfg = self.round_config
        source = values if callable(values) else _slicer(np.asarray(values), cfg.vector_length)
        session, rnd = cfg.session_id, self.round
        self_stream = MaskStream.derive(self._self_seed, context(session, rnd, "self", self.id))
        pair_streams = [
            (v, MaskStream.derive(self._pair_seeds[v], context(session, rnd, "pair", *sorted((self.id, v)))))
            for v in sorted(self._active)
        ]
        for offset in range(0, cfg.vector_length, cfg.chunk_elems):
            count = cfg.chunk_count(offset)
            chunk = source(offset, count)
            if len(chunk) != count or (len(chunk) and int(chunk.max()) > cfg.input_bound):
                raise ProtocolError(f"input chunk at {offset} must hold {count} values <= {cfg.input_bound}")
            data = pack(chunk, cfg.lane_bits)
            byte_offset = cfg.byte_offset(offset)
            cfg.add_(data, self_stream.keystream(byte_offset, len(data)))
            for v, stream in pair_streams:
                mask = stream.keystream(byte_offset, len(data))
                (cfg.add_ if self.id < v else cfg.sub_)(data, mask)
            yield MaskedChunk(session, rnd, self.id, offset, data.tobytes())

    # Round 3: consistency check ----------------------------------------------
    def sign_survivors(self, message: SurvivorList) -> ConsistencySignature:
        self._check_round(message.session, message.round, "input")
        survivors = tuple(sorted(set(message.survivors)))
        if self.id not in survivors:
            raise ProtocolError("the survivor list does not include this client")
        if self._signed is not None and self._signed != survivors:
            raise RefusalError("the server sent two different survivor lists in one round")
        # The survivors that masked with us (and we ourselves): fewer than t, and the
        # masks of the rest would be removed with their key shares.
        self._require(
            len(set(survivors) & (self._active | {self.id})),
            "of the clients this client masked with (itself counted) are survivors",
        )
        self._signed = survivors
        sig = keys.sign(self._identity, survivors_message(message.session, message.round, survivors))
        return ConsistencySignature(message.session, message.round, self.id, sig)

    # Round 4: unmasking ------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal self-mask shares of survivors and key shares of dropped peers, never both."""
        self._check_round(request.session, request.round, "input")
        survivors = tuple(sorted(set(request.survivors)))
        if self._signed is None or survivors != self._signed:
            raise RefusalError("unmask request for a survivor list this client did not sign")
        message = survivors_message(request.session, request.round, survivors)
        group = self.config.group(self.id)
        signers = [c for c in request.signatures if c in survivors and c in group]
        for signer in signers:
            keys.verify(self._roster_key(signer), request.signatures[signer], message, f"client {signer}")
        self._require(len(signers), "members of this client's sharing group signed the survivor list")
        survivor_set = set(survivors)
        self_shares, key_shares = {}, {}
        for peer, (key_share, self_share) in self._held.items():
            if peer in survivor_set:
                self_shares[peer] = self_share
            else:
                key_shares[peer] = key_share
        self.phase = "done"  # one answer per round: a second request is refused
        return UnmaskShares(request.session, request.round, self.id, self_shares, key_shares)

    # Validation helpers ------------------------------------------------------
    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            self.phase = "refused"
            raise ThresholdError(
                f"only {count} {what}; this client needs at least t = {self.config.threshold} "
                "and refuses to go on this round"
            )

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise ProtocolError(f"expected phase {phase!r}, this client is in {self.phase!r}")

    def _check_round(self, session: bytes, round_number: int, phase: str) -> None:
        if session != self.config.session_id:
            raise ProtocolError("message for another session")
        if round_number != self.round:
            raise ReplayError(f"message for round {round_number}, this client is in round {self.round}")
        if self.phase == "done":
            raise RefusalError("this client already revealed its shares for this round")
        self._expect(phase)

    def _roster_key(self, client: int) -> bytes:
        try:
            return self._roster[client]
        except KeyError:
            raise UnknownSenderError(f"client {client} is not on the roster") from None


def _slicer(values: np.ndarray, length: int) -> ChunkSource:
    if len(values) != length:
        raise ProtocolError(f"input vector has {len(values)} elements, the session expects {length}")
    return lambda offset, count: values[offset : offset + count]
