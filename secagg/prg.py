"""The one PRG: an AES-256-CTR keystream, addressable by byte offset.

A stream is named by a 32-byte seed and a context (session, round, purpose,
parties). HKDF-SHA256 turns (seed, context) into the AES key; the CTR counter
block for byte offset ``o`` is ``o // 16`` (big-endian, 128 bits), so any chunk
of any stream can be produced alone, and chunked generation equals one-shot
generation. Masks are added to packed lane vectors byte for byte, so a mask
for lanes ``[e, e + n)`` is the keystream at the packed byte offset of ``e``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"fedprune-secagg/v1"


def context(session: bytes, round_number: int, purpose: str, *parties: int) -> bytes:
    """The PRG domain: protocol, session, round, purpose and the parties involved."""
    parts = [PROTOCOL, session.hex().encode(), str(round_number).encode(), purpose.encode()]
    parts += [str(p).encode() for p in parties]
    return b"|".join(parts)


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class MaskStream:
    """One keystream: AES-256-CTR under HKDF(seed, context)."""

    key: bytes

    @classmethod
    def derive(cls, seed: bytes, ctx: bytes) -> MaskStream:
        return cls(hkdf(seed, ctx))

    def keystream(self, byte_offset: int, length: int) -> np.ndarray:
        """Keystream bytes ``[byte_offset, byte_offset + length)`` as a uint8 view.

        The view lives in a per-thread buffer that the next call overwrites: consume
        it (add it into a vector) before asking for more.
        """
        block, skip = divmod(byte_offset, 16)
        encryptor = Cipher(algorithms.AES(self.key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        if skip:
            encryptor.update(bytes(skip))
        buf = _buffers(length)
        written = encryptor.update_into(buf.zeros[:length], buf.out)  # needs 15 bytes of slack
        return np.frombuffer(buf.out, dtype=np.uint8, count=written)

    def bytes(self, byte_offset: int, length: int) -> bytes:
        return self.keystream(byte_offset, length).tobytes()


class _Buffers(threading.local):
    zeros: memoryview = memoryview(b"")
    out: bytearray = bytearray(0)


_BUFFERS = _Buffers()


def _buffers(length: int) -> _Buffers:
    if len(_BUFFERS.zeros) < length:
        _BUFFERS.zeros = memoryview(bytearray(length))
        _BUFFERS.out = bytearray(length + 16)
    return _BUFFERS
