"""Typed errors of the secure-aggregation protocol."""


class SecAggError(Exception):
    """Base class of every protocol failure."""


class ConfigError(SecAggError):
    """Session parameters are inconsistent (threshold, lane width, chunking...)."""


class ProtocolError(SecAggError):
    """A message is invalid here: wrong session, phase, length, offset, or a duplicate."""


class UnknownSenderError(ProtocolError):
    """The sender is not a member of this session (not on the roster)."""


class ReplayError(ProtocolError):
    """A message for another round (an old message replayed, or one from the future)."""


class SignatureError(SecAggError):
    """An Ed25519 signature does not verify against the roster."""


class DecryptionError(SecAggError):
    """An AES-GCM share ciphertext was tampered with or is not addressed to us."""


class ShareError(SecAggError):
    """Shamir reconstruction failed: too few shares, or shares that do not agree."""


class ThresholdError(SecAggError):
    """Fewer than t parties survived; the round aborts and outputs nothing."""


class InvalidAggregateError(SecAggError):
    """The unmasked sum is impossible for honest inputs (a lane above its bound): a client cheated."""


class RefusalError(SecAggError):
    """A client refuses a request that would unmask a peer (both shares of one peer)."""


class IncompleteInputError(SecAggError):
    """A client's masked vector is partial; it cannot be removed from the running sum."""
