"""The audit transcript: an append-only, hash-chained record of what the server received.

Each received message becomes one JSON line: sequence number, time, sender,
round, kind, size, SHA-256 of the payload, the previous record's hash, and
this record's hash (over all of the above), so that any edit, deletion or
reordering breaks the chain. Payloads are kept as blobs when configured. The
session metadata (session.json) is chained too, as "session-meta" records.

The chain alone cannot show that its tail was cut or that the whole file was
re-chained: after each round the server signs the head (record count and
last hash) and sends it to every client as a receipt. ``fedprune audit DIR
--receipt FILE...`` reads the transcript back and checks it against them.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import numpy as np

from secagg.errors import SecAggError
from secagg.keys import verify

from .errors import AuditError
from .files import atomic_write_bytes, atomic_write_text

GENESIS = "0" * 64
LANE_BITS = (1, 2, 4, 8, 16, 32, 64)
UNIFORMITY_BITS = 16  # wider lanes are tested byte by byte (a uniform lane has uniform bytes)


def _record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Transcript:
    """Appends records; thread-safe; resumes a chain left by an earlier run."""

    def __init__(self, directory: str | Path, store_payloads: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "blobs").mkdir(exist_ok=True)
        self.path = self.dir / "transcript.jsonl"
        self.store_payloads = store_payloads
        self._lock = threading.Lock()
        self._seq, self._prev = 0, GENESIS
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self._seq, self._prev = rec["seq"] + 1, rec["hash"]
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write_meta(self, name: str, data: dict) -> None:
        """Write ``name`` and chain its exact bytes as a "session-meta" record."""
        text = json.dumps(data, indent=2)
        atomic_write_text(self.dir / name, text)
        self.record("server", None, "session-meta", text.encode())

    def head(self) -> tuple[int, str]:
        """(number of records, hash of the last one): what a receipt signs."""
        with self._lock:
            return self._seq, self._prev

    def record(self, sender: str, round_number: int | None, kind: str, payload: bytes) -> None:
        with self._lock:
            rec = {
                "seq": self._seq,
                "time": time.time(),
                "sender": sender,
                "round": round_number,
                "kind": kind,
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
                "prev": self._prev,
            }
            rec["hash"] = _record_hash(rec)
            if self.store_payloads:
                atomic_write_bytes(self.dir / "blobs" / f"{self._seq:09d}.bin", payload)
            self._file.write(json.dumps(rec, sort_keys=True) + "\n")
            self._file.flush()
            self._seq, self._prev = self._seq + 1, rec["hash"]

    def close(self) -> None:
        with self._lock:
            self._file.close()


def receipt_message(session_id: bytes, round_number: int, records: int, head: str) -> bytes:
    return b"|".join(
        [b"receipt", session_id, str(round_number).encode(), str(records).encode(), head.encode()]
    )


def read_records(directory: str | Path, require_blobs: bool = False) -> tuple[list[dict], str | None]:
    """All records and the first chain error (None if the chain is intact)."""
    path = Path(directory) / "transcript.jsonl"
    if not path.exists():
        return [], f"no transcript at {path}"
    records, prev = [], GENESIS
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return records, f"line {lineno} is not JSON"
        if not _well_formed(rec):
            return records, f"line {lineno} is not a transcript record"
        if rec.get("prev") != prev or _record_hash(rec) != rec.get("hash") or rec.get("seq") != len(records):
            return records, f"hash chain broken at line {lineno} (record {rec.get('seq')})"
        blob = Path(directory) / "blobs" / f"{rec['seq']:09d}.bin"
        if blob.exists():
            if hashlib.sha256(blob.read_bytes()).hexdigest() != rec["sha256"]:
                return records, f"payload of record {rec['seq']} does not match its SHA-256"
        elif require_blobs:
            return records, f"payload of record {rec['seq']} is missing"
        records.append(rec)
        prev = rec["hash"]
    return records, None


_FIELDS = {"seq": int, "sender": str, "kind": str, "size": int, "sha256": str, "prev": str, "hash": str}


def _well_formed(rec: object) -> bool:
    return (
        isinstance(rec, dict)
        and all(isinstance(rec.get(k), t) and not isinstance(rec.get(k), bool) for k, t in _FIELDS.items())
        and (rec.get("round") is None or type(rec.get("round")) is int)
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path} is not UTF-8 text (byte {exc.start}); not a fedprune transcript") from exc
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_meta(path: Path) -> dict:
    """session.json, checked: a JSON object whose lane width is one the ring supports."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(meta, dict):
        raise AuditError(f"{path} is not a JSON object")
    bits = meta.get("lane_bits", 1)
    if isinstance(bits, bool) or bits not in LANE_BITS:
        raise AuditError(f"{path}: lane_bits must be one of {LANE_BITS}, got {bits!r}")
    if not isinstance(meta.get("decoded", []), list):
        raise AuditError(f"{path}: 'decoded' must be a list")
    return meta


def uniformity_z(lanes: np.ndarray, bits: int) -> float:
    """Chi-square goodness of fit to the uniform distribution on 2^b values, as a z-score
    (Wilson-Hilferty); z < 3.1 means consistent with uniform at p = 0.001."""
    k = 1 << bits
    counts = np.bincount(lanes.astype(np.int64), minlength=k)
    expected = len(lanes) / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = k - 1
    return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def check_meta(directory: Path, records: list[dict]) -> str | None:
    """Whether session.json is its last chained copy (None if it is)."""
    chained = [r for r in records if r["kind"] == "session-meta"]
    if not chained:
        return "no session metadata in the chain"
    try:
        data = (directory / "session.json").read_bytes()
    except OSError:
        return "session.json is missing"
    if hashlib.sha256(data).hexdigest() != chained[-1]["sha256"]:
        return "session.json differs from the copy in the chain"
    return None


def check_receipts(records: list[dict], meta: dict, paths) -> list[str]:
    """Each receipt's signature, and that the transcript still holds the head it signed."""
    problems, keys = [], set()
    session = bytes.fromhex(meta.get("session_id", ""))
    for path in paths:
        try:
            receipts = json.loads(Path(path).read_text())
            receipts = receipts if isinstance(receipts, list) else [receipts]
            for r in receipts:
                public = bytes.fromhex(r["server_public"])
                message = receipt_message(session, int(r["round"]), int(r["records"]), r["head"])
                verify(public, bytes.fromhex(r["signature"]), message, "the server")
                keys.add(public)
                count = int(r["records"])
                if count > len(records):
                    problems.append(
                        f"{path}: round {r['round']} receipt covers {count} records, "
                        f"the transcript has {len(records)}"
                    )
                elif count < 1 or records[count - 1]["hash"] != r["head"]:
                    problems.append(f"{path}: round {r['round']} receipt does not match record {count - 1}")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: not a receipt file ({exc.__class__.__name__})")
        except SecAggError:
            problems.append(f"{path}: a receipt's signature is not the server's for this session")
    if meta.get("server_public") and keys - {bytes.fromhex(meta["server_public"])}:
        problems.append("receipts signed by a key other than the server identity in session.json")
    return problems


def audit(directory: str | Path, receipts=()) -> tuple[str, bool]:
    """A human-readable account of what the server received, and whether it is intact."""
    from google.protobuf.message import DecodeError

    from secagg.ring import unpack

    from .wire import federation_pb2 as pb

    directory = Path(directory)
    if not (directory / "transcript.jsonl").is_file():
        raise AuditError(f"no transcript at {directory} (expected the server's audit directory)")
    meta = _read_meta(directory / "session.json")
    records, chain_error = read_records(directory)
    meta_error = check_meta(directory, records) if chain_error is None else None
    if meta.get("store_payloads") and chain_error is None:
        records, chain_error = read_records(directory, require_blobs=True)
    error = chain_error or meta_error
    if error is None and not records:
        error = "the transcript is empty"
    mode = meta.get("mode", "?")
    lines = [f"audit of {directory}: {len(records)} records, mode {mode}"]
    lines.append("hash chain: " + ("intact" if error is None else f"BROKEN: {error}"))
    problems = check_receipts(records, meta, receipts) if receipts else []
    if receipts:
        lines.append(
            f"receipts: {len(receipts)} file(s), "
            + ("all match the transcript" if not problems else "MISMATCH: " + "; ".join(problems))
        )
    table: dict[tuple[str, object], dict] = {}
    chunks: dict[tuple[str, object], list[bytes]] = {}
    for rec in records:
        row = table.setdefault((rec["sender"], rec["round"]), {"bytes": 0, "kinds": {}})
        row["bytes"] += rec["size"]
        row["kinds"][rec["kind"]] = row["kinds"].get(rec["kind"], 0) + 1
        blob = directory / "blobs" / f"{rec['seq']:09d}.bin"
        if rec["kind"] == "chunk" and blob.exists() and chain_error is None:
            try:
                msg = pb.ClientMessage.FromString(blob.read_bytes())
            except DecodeError as exc:
                raise AuditError(f"{blob} is not a client message (payload of record {rec['seq']})") from exc
            chunks.setdefault((rec["sender"], rec["round"]), []).append(msg.chunk.data)
    lines.append("")
    lines.append("| client | round | bytes | messages | what the server can read |")
    lines.append("|---|---|---|---|---|")
    verdict_ok = error is None and not problems
    bits = int(meta.get("lane_bits", 1))
    statistics = meta.get("strategy") == "statistics"
    for (sender, rnd), row in sorted(table.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        kinds = ", ".join(f"{k}×{n}" for k, n in sorted(row["kinds"].items()))
        data = b"".join(chunks.get((sender, rnd), []))
        if not data:
            seen = "-"
        elif mode == "plain" and statistics:
            lanes = unpack(np.frombuffer(data, dtype=np.uint8), bits, len(data) * 8 // bits)
            digest = hashlib.sha256(data).hexdigest()[:12]
            seen = (
                f"VISIBLE: this client's statistics ({len(lanes)} {bits}-bit elements, "
                f"{int(lanes[-1])} tokens, sha256 {digest}…)"
            )
        elif mode == "plain":
            mask = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
            digest = hashlib.sha256(data).hexdigest()[:12]
            seen = f"VISIBLE: this client's mask ({mask.mean():.3f} pruned, sha256 {digest}…)"
        else:
            tested = bits if bits <= UNIFORMITY_BITS else 8
            lanes = unpack(np.frombuffer(data, dtype=np.uint8), tested, len(data) * 8 // tested)
            z = uniformity_z(lanes, tested)
            ok = z < 3.1
            verdict_ok &= ok
            how = f"{bits}-bit lanes" + (" (tested byte by byte)" if tested != bits else "")
            seen = f"{'uniform' if ok else 'NOT UNIFORM'} {how} (chi-square z = {z:.2f})"
        lines.append(f"| {sender} | {rnd} | {row['bytes']} | {kinds} | {seen} |")
    if mode == "secure":
        lines.append("")
        what = (
            "the pooled statistics of each block" if statistics else "the aggregate vote counts of each round"
        )
        lines.append(
            f"decoded by the server: only {what} ({', '.join(meta.get('decoded', [])) or 'none recorded'})"
        )
        for rnd, dropped in sorted(meta.get("dropped", {}).items(), key=lambda kv: int(kv[0])):
            for client in dropped:
                lines.append(
                    f"dropout: {client} left round {rnd} after sharing its keys; the server rebuilt "
                    f"its round-{rnd} mask key, which no other round uses (keys are fresh every round)"
                )
    lines.append("")
    lines.append("verdict: " + ("PASS" if verdict_ok else "FAIL"))
    return "\n".join(lines), verdict_ok
