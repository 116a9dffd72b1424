"""The client's side of the protocol: a state machine from messages to messages.

Bonawitz et al. (CCS 2017), rounds 0-4, with the SecAgg+ neighbour graph and a
multi-round session: the X25519 keys are advertised once; every round takes a
fresh self-mask seed and fresh Shamir shares of the pairwise mask key and that
seed. The client never reveals both shares of one peer, and never reveals the
self-mask share of a peer whose key share it has already revealed.
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
    survivors_message,
)
from .prg import MaskStream, context
from .ring import pack

ChunkSource = Callable[[int, int], np.ndarray]  # (offset, count) -> values


def pair_seed_info(session: bytes) -> bytes:
    return b"pair-seed|" + session


def share_key_info(session: bytes) -> bytes:
    return b"share-encryption|" + session


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
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self.neighbours = config.graph[client_id]
        self._peer_enc: dict[int, bytes] = {}
        self._pair_seeds: dict[int, bytes] = {}
        self.round: int | None = None
        self._self_seed: bytes | None = None
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # peer -> (key, self)
        self._active: frozenset[int] = frozenset()
        self._signed: tuple[int, ...] | None = None
        self._key_revealed: set[int] = set()  # peers whose mask key share we have revealed
        self._done_unmask = False

    # Round 0: advertise keys -------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        enc = keys.raw_public(self._enc_key.public_key())
        mask = keys.raw_public(self._mask_key.public_key())
        sig = keys.sign(self._identity, advert_message(self.config.session_id, self.id, enc, mask))
        return AdvertiseKeys(self.config.session_id, self.id, enc, mask, sig)

    def receive_keys(self, directory: KeyDirectory) -> None:
        """Verify the neighbours' signed keys and agree a pairwise mask seed with each."""
        self._check_session(directory.session)
        info = pair_seed_info(self.config.session_id)
        for ad in directory.adverts:
            if ad.sender not in self.neighbours:
                continue
            self._check_session(ad.session)
            keys.verify(
                self._roster_key(ad.sender),
                ad.signature,
                advert_message(ad.session, ad.sender, ad.enc_public, ad.mask_public),
                f"client {ad.sender}",
            )
            self._peer_enc[ad.sender] = ad.enc_public
            self._pair_seeds[ad.sender] = keys.agree(self._mask_key, ad.mask_public, info)
        if len(self._pair_seeds) + 1 < self.config.threshold:
            raise ThresholdError(
                f"only {len(self._pair_seeds)} neighbours advertised keys; with this client that is "
                f"fewer than the threshold {self.config.threshold}"
            )

    # Round 1: share keys -----------------------------------------------------
    def share_keys(self, round_number: int, vector_length: int | None = None) -> EncryptedShares:
        """Fresh self-mask seed; Shamir shares of it and of the mask key, sealed per neighbour.

        ``vector_length`` overrides the session's for this round only.
        """
        if not self._pair_seeds:
            raise ProtocolError("keys have not been agreed yet")
        if self.round is not None and round_number <= self.round:
            raise ReplayError(f"round {round_number} is not after round {self.round}")
        self.round = round_number
        self.round_config = (
            replace(self.config, vector_length=vector_length) if vector_length else self.config
        )
        self._self_seed = os.urandom(32)
        self._held, self._active, self._signed, self._done_unmask = {}, frozenset(), None, False
        holders = sorted(self._peer_enc)
        xs = [h + 1 for h in (*holders, self.id)]  # as in Bonawitz et al., we hold a share too
        key_shares = shamir.split(keys.raw_private(self._mask_key), self.config.threshold, xs)
        self_shares = shamir.split(self._self_seed, self.config.threshold, xs)
        info = share_key_info(self.config.session_id)
        sealed = {}
        for h in holders:
            key = keys.agree(self._enc_key, self._peer_enc[h], info)
            plaintext = key_shares[h + 1].y + self_shares[h + 1].y
            ad = share_associated_data(self.config.session_id, round_number, self.id, h)
            sealed[h] = keys.seal(key, plaintext, ad)
        self._own_shares = (key_shares[self.id + 1], self_shares[self.id + 1])
        return EncryptedShares(self.config.session_id, round_number, self.id, sealed)

    def receive_shares(self, bundle: ShareBundle) -> None:
        """Open the shares the neighbours sent us; they define who we mask with this round."""
        self._check_round(bundle.session, bundle.round)
        if bundle.receiver != self.id:
            raise ProtocolError(f"bundle for client {bundle.receiver} delivered to {self.id}")
        info = share_key_info(self.config.session_id)
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
        self._active = frozenset(held)
        held[self.id] = self._own_shares  # revealed only as a self-mask share, when we survive
        self._held = held

    # Round 2: masked input ---------------------------------------------------
    def masked_chunks(self, values: np.ndarray | ChunkSource) -> Iterator[MaskedChunk]:
        """Stream the masked vector chunk by chunk: x + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^b."""
        if self._self_seed is None or self.round is None:
            raise ProtocolError("share keys before sending a masked input")
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
            if len(chunk) != count or (len(chunk) and int(chunk.max()) >= (1 << cfg.lane_bits)):
                raise ProtocolError(f"input chunk at {offset} must hold {count} values < 2^{cfg.lane_bits}")
            data = pack(chunk, cfg.lane_bits)
            byte_offset = cfg.byte_offset(offset)
            cfg.add_(data, self_stream.keystream(byte_offset, len(data)))
            for v, stream in pair_streams:
                mask = stream.keystream(byte_offset, len(data))
                (cfg.add_ if self.id < v else cfg.sub_)(data, mask)
            yield MaskedChunk(session, rnd, self.id, offset, data.tobytes())

    # Round 3: consistency check ----------------------------------------------
    def sign_survivors(self, message: SurvivorList) -> ConsistencySignature:
        self._check_round(message.session, message.round)
        survivors = tuple(sorted(message.survivors))
        if self.id not in survivors:
            raise ProtocolError("the survivor list does not include this client")
        if len(survivors) < self.config.threshold:
            raise ThresholdError(f"{len(survivors)} survivors, threshold is {self.config.threshold}")
        if self._signed is not None and self._signed != survivors:
            raise RefusalError("the server sent two different survivor lists in one round")
        self._signed = survivors
        sig = keys.sign(self._identity, survivors_message(message.session, message.round, survivors))
        return ConsistencySignature(message.session, message.round, self.id, sig)

    # Round 4: unmasking ------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal self-mask shares of survivors and key shares of dropped peers, never both."""
        self._check_round(request.session, request.round)
        survivors = tuple(sorted(request.survivors))
        if self._signed is None or survivors != self._signed:
            raise RefusalError("unmask request for a survivor list this client did not sign")
        if self._done_unmask:
            raise RefusalError("this client already revealed its shares for this round")
        signers = [c for c in request.signatures if c in survivors]
        if len(signers) < self.config.threshold:
            raise ThresholdError(
                f"{len(signers)} consistency signatures, threshold is {self.config.threshold}"
            )
        message = survivors_message(request.session, request.round, survivors)
        for signer in signers:
            keys.verify(self._roster_key(signer), request.signatures[signer], message, f"client {signer}")
        survivor_set = set(survivors)
        self_shares, key_shares = {}, {}
        for peer, (key_share, self_share) in self._held.items():
            if peer in survivor_set:
                if peer in self._key_revealed:
                    raise RefusalError(
                        f"client {peer}'s mask key share was revealed earlier; revealing its "
                        "self-mask share too would unmask it"
                    )
                self_shares[peer] = self_share
            else:
                key_shares[peer] = key_share
        self._key_revealed.update(key_shares)
        self._done_unmask = True
        return UnmaskShares(request.session, request.round, self.id, self_shares, key_shares)

    # Validation helpers ------------------------------------------------------
    def _check_session(self, session: bytes) -> None:
        if session != self.config.session_id:
            raise ProtocolError("message for another session")

    def _check_round(self, session: bytes, round_number: int) -> None:
        self._check_session(session)
        if round_number != self.round:
            raise ReplayError(f"message for round {round_number}, this client is in round {self.round}")

    def _roster_key(self, client: int) -> bytes:
        try:
            return self._roster[client]
        except KeyError:
            raise UnknownSenderError(f"client {client} is not on the roster") from None


def _slicer(values: np.ndarray, length: int) -> ChunkSource:
    if len(values) != length:
        raise ProtocolError(f"input vector has {len(values)} elements, the session expects {length}")
    return lambda offset, count: values[offset : offset + count]
