"""The one PRG: an AES-256-CTR keystream, addressable by byte offset.

A stream is named by a 32-byte seed and a context (session, round, purpose,
parties). HKDF-SHA256 turns (seed, context) into the AES key; the CTR counter
block for byte offset ``o`` is ``o // 16`` (big-endian, 128 bits), so any chunk
of any stream can be produced alone, and chunked generation equals one-shot
generation. Masks are added to packed lane vectors byte for byte, so a mask
for lanes ``[e, e + n)`` is the keystream at the packed byte offset of ``e``.
"""

from __future__ import annotations

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

    def fill(self, byte_offset: int, out: np.ndarray) -> np.ndarray:
        """Write the keystream bytes ``[byte_offset, byte_offset + len(out))`` into ``out``."""
        block, skip = divmod(byte_offset, 16)
        encryptor = Cipher(algorithms.AES(self.key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        if skip:
            encryptor.update(bytes(skip))
        n = len(out)
        zeros = _zeros(n)
        # update_into needs room for one extra block; write into a view of a wider scratch.
        scratch = _scratch(n + 15)
        written = encryptor.update_into(zeros, scratch)
        out[:] = np.frombuffer(scratch, dtype=np.uint8, count=written)
        return out

    def bytes(self, byte_offset: int, length: int) -> bytes:
        return self.fill(byte_offset, np.empty(length, dtype=np.uint8)).tobytes()


_ZEROS = memoryview(bytearray(0))
_SCRATCH = bytearray(0)


def _zeros(n: int) -> memoryview:
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = memoryview(bytearray(n))
    return _ZEROS[:n]


def _scratch(n: int) -> bytearray:
    global _SCRATCH
    if len(_SCRATCH) < n:
        _SCRATCH = bytearray(n)
    return _SCRATCH
