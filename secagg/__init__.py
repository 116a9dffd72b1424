"""Secure aggregation (SecAgg with SecAgg+ neighbour graphs) on numpy + cryptography.

Pure protocol logic: no torch, no gRPC, no files. ``ClientSession`` and
``ServerSession`` are state machines from messages to messages; ``simulate``
runs the whole protocol in process.
"""

from .client import ClientSession
from .errors import (
    ConfigError,
    DecryptionError,
    IncompleteInputError,
    InvalidAggregateError,
    ProtocolError,
    RefusalError,
    ReplayError,
    SecAggError,
    ShareError,
    SignatureError,
    ThresholdError,
    UnknownSenderError,
)
from .messages import SessionConfig, ThreatModel, default_threshold
from .ring import lane_bits_for
from .server import ServerSession
from .simulate import SimulationResult, make_session, run_round, simulate

__all__ = [
    "ClientSession",
    "ConfigError",
    "DecryptionError",
    "IncompleteInputError",
    "InvalidAggregateError",
    "ProtocolError",
    "RefusalError",
    "ReplayError",
    "SecAggError",
    "ServerSession",
    "SessionConfig",
    "ShareError",
    "SignatureError",
    "SimulationResult",
    "ThreatModel",
    "ThresholdError",
    "UnknownSenderError",
    "default_threshold",
    "lane_bits_for",
    "make_session",
    "run_round",
    "simulate",
]
