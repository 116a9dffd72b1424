"""Key material: X25519 agreement, Ed25519 identities, AES-GCM share encryption."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import DecryptionError, SignatureError
from .prg import PROTOCOL, hkdf

NONCE_BYTES = 12


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return raw_public(X25519PrivateKey.from_private_bytes(private).public_key())


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519 shared secret of two parties, run through HKDF-SHA256 with ``info``."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # low-order point or malformed key
        raise SignatureError(f"invalid X25519 public key: {exc}") from exc
    return hkdf(shared, PROTOCOL + b"|" + info)


def sign(identity: Ed25519PrivateKey, message: bytes) -> bytes:
    return identity.sign(message)


def verify(identity_public: bytes, signature: bytes, message: bytes, who: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"bad signature from {who}") from exc


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: random nonce || ciphertext+tag, bound to ``associated`` data."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, who: str) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError(f"share ciphertext from {who} failed authentication") from exc
