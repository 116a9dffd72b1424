"""Admission: who may join a federation, decided before anything is stored under a name.

A stream is admitted in three steps, all within ``hello_deadline_s``:
Hello (claimed id, model fingerprint, protocol version; bounded sizes) ->
Challenge (the server's fresh nonce and session id) -> HelloProof (the
client's Ed25519 signature over both, so that no Hello copied from an old
audit or another session is valid). The TLS certificate's common name must
be the claimed id (unless --insecure on loopback) and the id must be on the
roster. At most ``max_pending`` streams may be unauthenticated at once and
each gets a deadline, so silent connections cannot pin the server's workers.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass

import grpc

from secagg.errors import SecAggError
from secagg.keys import verify as verify_signature

from .errors import NodesError

PROTOCOL_VERSION = 2
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_HELLO_BYTES = 1024
FINGERPRINT_BYTES = 32


def hello_message(session_id: bytes, nonce: bytes, client_id: str, fingerprint: bytes) -> bytes:
    """What a client signs to prove its identity for this session and this challenge."""
    return b"|".join([b"hello", session_id, nonce, client_id.encode(), fingerprint])


@dataclass(frozen=True)
class Refusal(NodesError):
    """A stream is refused admission: the gRPC status and a one-line reason."""

    status: grpc.StatusCode
    reason: str

    def __str__(self) -> str:
        return self.reason


class Admission:
    """The admission rules of one server: roster, TLS identity, challenge-response, limits."""

    def __init__(
        self,
        roster: dict[str, bytes],
        fingerprint: bytes,
        session_id: bytes,
        insecure: bool,
        deadline_s: float,
        max_pending: int,
    ) -> None:
        self.roster = roster
        self.fingerprint = fingerprint
        self.session_id = session_id
        self.insecure = insecure
        self.deadline_s = deadline_s
        self._pending = threading.BoundedSemaphore(max_pending)

    def gate(self, context) -> _Gate:
        """Hold one of the ``max_pending`` unauthenticated slots, with a deadline, or refuse."""
        if not self._pending.acquire(blocking=False):
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many connections awaiting authentication")
        return _Gate(self._pending, context, self.deadline_s)

    def check_hello(self, message, context) -> tuple[str, bytes]:
        """Validate the first message; return (client id, fresh challenge nonce)."""
        if message is None or message.WhichOneof("body") != "hello":
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        if message.ByteSize() > MAX_HELLO_BYTES:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"Hello larger than {MAX_HELLO_BYTES} bytes")
        hello = message.hello
        cid = hello.client_id
        if not ID_PATTERN.fullmatch(cid):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "malformed client id")
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} unsupported (server: {PROTOCOL_VERSION})",
            )
        if cid not in self.roster:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"client {cid!r} is not on the roster")
        if not self.insecure:
            names = context.auth_context().get("x509_common_name", [])
            if cid.encode() not in names:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED, f"TLS certificate does not belong to {cid!r}"
                )
        if hello.fingerprint != self.fingerprint:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION, "model fingerprint mismatch: not the server's model"
            )
        return cid, os.urandom(32)

    def check_proof(self, message, cid: str, nonce: bytes) -> None:
        """The client's signature over this session's challenge."""
        if message is None or message.WhichOneof("body") != "hello_proof":
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "expected the signed answer to the challenge")
        try:
            verify_signature(
                self.roster[cid],
                message.hello_proof.signature,
                hello_message(self.session_id, nonce, cid, self.fingerprint),
                f"client {cid}",
            )
        except SecAggError:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"bad identity signature from {cid!r}") from None


def refusal_record(claimed: str, reason: str) -> bytes:
    """A compact audit entry for a refused attempt (never filed under the claimed id)."""
    return json.dumps({"claimed_id": claimed[:64], "reason": reason[:200]}).encode()


class _Gate:
    """One unauthenticated slot: cancels the stream at the deadline, frees the slot on exit."""

    def __init__(self, semaphore: threading.BoundedSemaphore, context, deadline_s: float) -> None:
        self._semaphore = semaphore
        self._timer = threading.Timer(deadline_s, context.cancel)
        self._timer.daemon = True

    def __enter__(self) -> _Gate:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._semaphore.release()
