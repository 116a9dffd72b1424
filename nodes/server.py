"""The coordinator process: gRPC server, protocol driver, selection, outputs.

One bidirectional stream per client. Reader threads turn incoming messages
into events (and audit records); a single coordinator thread runs the
protocol on those events with per-phase deadlines, so the secagg state
machines are only ever touched by one thread. In secure mode masked chunks
go straight into the running sum; the server never keeps a client's vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import resource
import threading
import time
from concurrent import futures
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedprune.errors import VoteCountError
from fedprune.models import fingerprint, layout, load_model
from fedprune.strategies import apply_vote_counts, layer_salts
from fedprune.wanda import check_vote_counts
from secagg import ServerSession, SessionConfig, default_threshold, lane_bits_for
from secagg.errors import SecAggError
from secagg.keys import raw_public, sign
from secagg.messages import ConsistencySignature, MaskedChunk

from .admission import ID_PATTERN, Admission, Refusal, refusal_record
from .audit import Transcript, receipt_message
from .config import ServerConfig
from .errors import FederationAborted, ProtocolViolation
from .files import atomic_write_bytes, atomic_write_dir, atomic_write_text
from .identity import load_identity, parse_public_hex
from .staging import ChunkStaging
from .wire import convert
from .wire import federation_pb2 as pb
from .wire import federation_pb2_grpc as pb_grpc

MASK_CHUNK_BITS = 1 << 23  # elements per FinalMask message (1 MiB bit-packed)
SPILL_BYTES = 1 << 30  # running sums larger than this live in a memory-mapped file


class _Link:
    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.outbox: queue.Queue = queue.Queue()
        self.alive = True
        self.bytes_received = 0

    def send(self, **body) -> None:
        if self.alive:
            self.outbox.put(pb.ServerMessage(**body))


class FederationServer(pb_grpc.FederationServicer):
    def __init__(self, cfg: ServerConfig, log=print) -> None:
        self.cfg = cfg
        self.log = log
        self.roster = {cid: parse_public_hex(pk, cid) for cid, pk in cfg.roster.items()}
        self.prune_cfg = cfg.prune_config()
        t0 = time.perf_counter()
        self.lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.layout = layout(self.lm.model)
        self.fingerprint = bytes.fromhex(fingerprint(self.lm.model))
        self.timings = {"load_model": time.perf_counter() - t0}
        self.transcript = Transcript(cfg.audit_dir, cfg.store_payloads)
        # The identity that signs receipts: a configured key, or one made for this run (its
        # public half is in session.json, inside the chain).
        self.identity = load_identity(cfg.identity) if cfg.identity else Ed25519PrivateKey.generate()
        self.events: queue.Queue = queue.Queue()
        self.links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._started = False
        self._joined = threading.Condition(self._lock)
        self.rejected: dict[str, int] = {}
        self.refused: list[str] = []
        self.session_id = os.urandom(16)
        self.rounds: list[dict] = []
        self.admission = Admission(
            self.roster,
            self.fingerprint,
            self.session_id,
            cfg.insecure,
            cfg.hello_deadline_s,
            cfg.max_pending_hellos,
        )

    # ---- gRPC side -------------------------------------------------------------
    def Session(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        """Admit the stream (see nodes.admission), then relay the coordinator's messages."""
        claimed = "?"
        try:
            with self.admission.gate(context):
                first = next(request_iterator, None)
                if first is not None and first.WhichOneof("body") == "hello":
                    claimed = first.hello.client_id
                cid, nonce = self.admission.check_hello(first, context)
                self._check_vacancy(cid)
                yield pb.ServerMessage(challenge=pb.Challenge(session_id=self.session_id, nonce=nonce))
                proof = next(request_iterator, None)
                self.admission.check_proof(proof, cid, nonce)
                link = self._join(cid, first, proof)
        except Refusal as refusal:
            self._refuse(claimed, refusal.reason)
            context.abort(refusal.status, refusal.reason)
            return
        except grpc.RpcError:
            self._refuse(claimed, "no answer before the admission deadline")
            return
        if not context.add_callback(lambda: self._gone(link)):  # cancelled at the deadline, after joining
            self._gone(link)
            return
        reader = threading.Thread(target=self._read, args=(link, request_iterator), daemon=True)
        reader.start()
        while True:
            item = link.outbox.get()
            if item is None:
                return
            yield item

    def _check_vacancy(self, cid: str) -> None:
        with self._lock:
            if self._started:
                raise Refusal(grpc.StatusCode.UNAVAILABLE, "the session has already started")
            if cid in self.links:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS, f"client {cid!r} is already connected")

    def _join(self, cid: str, hello, proof) -> _Link:
        link = _Link(cid)
        with self._lock:
            if self._started or cid in self.links:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS, f"client {cid!r} is already connected")
            self.links[cid] = link
            self._joined.notify_all()
        # Only now, authenticated, is anything recorded under the client's name.
        self.transcript.record(cid, None, "hello", hello.SerializeToString())
        self.transcript.record(cid, None, "hello_proof", proof.SerializeToString())
        self.log(f"client {cid} joined ({len(self.links)}/{self.cfg.expected_clients})")
        return link

    def _refuse(self, claimed: str, reason: str) -> None:
        shown = claimed if ID_PATTERN.fullmatch(claimed) else "(no valid Hello)"
        self.refused.append(f"{shown}: {reason}")
        self.transcript.record("(refused)", None, "refused", refusal_record(shown, reason))
        self.log(f"refused {shown!r}: {reason}")

    def _read(self, link: _Link, request_iterator) -> None:
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("body")
                payload = msg.SerializeToString()
                rnd = getattr(getattr(msg, kind), "round", None)
                self.transcript.record(link.id, rnd, kind, payload)
                link.bytes_received += len(payload)
                self.events.put((link.id, msg))
        except grpc.RpcError:
            pass
        finally:
            self._gone(link)

    def _gone(self, link: _Link) -> None:
        if link.alive:
            link.alive = False
            self.events.put((link.id, None))

    # ---- coordinator -------------------------------------------------------------
    def run(self) -> dict:
        """Serve, run the federation, write the outputs; return the report."""
        server = grpc.server(
            # every admitted client holds a worker; unauthenticated streams hold at most
            # max_pending_hellos more, so honest clients always find one free
            futures.ThreadPoolExecutor(
                max_workers=self.cfg.expected_clients + self.cfg.max_pending_hellos + 4
            ),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        pb_grpc.add_FederationServicer_to_server(self, server)
        if self.cfg.insecure:
            port = server.add_insecure_port(self.cfg.listen)
        else:
            creds = grpc.ssl_server_credentials(
                [(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())],
                root_certificates=Path(self.cfg.client_ca).read_bytes(),
                require_client_auth=True,
            )
            port = server.add_secure_port(self.cfg.listen, creds)
        self.port = port
        server.start()
        self.log(f"listening on {self.cfg.listen.rsplit(':', 1)[0]}:{port} ({self.cfg.mode} mode)")
        try:
            return self._federate()
        except FederationAborted as exc:
            for link in list(self.links.values()):
                link.send(abort=pb.Abort(reason=str(exc)))
            raise
        finally:
            for link in list(self.links.values()):
                link.outbox.put(None)
            server.stop(grace=2)
            self.transcript.close()
            if getattr(self, "_spill", None) is not None:
                self._spill.unlink(missing_ok=True)

    def _federate(self) -> dict:
        cfg = self.cfg
        eval_before = self._evaluate() if cfg.eval_sources else None
        t0 = time.perf_counter()
        deadline = time.monotonic() + cfg.join_deadline_s
        with self._lock:
            while len(self.links) < cfg.expected_clients and time.monotonic() < deadline:
                self._joined.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._started = True
            members = sorted(c for c, link in self.links.items() if link.alive)
        if len(members) < cfg.min_clients:
            raise FederationAborted(f"only {len(members)} clients joined, at least {cfg.min_clients} needed")
        self.members = members
        self.index = {cid: i for i, cid in enumerate(members)}
        self.timings["join"] = time.perf_counter() - t0
        n = len(members)
        group = (n - 1 if not cfg.neighbours or cfg.neighbours >= n - 1 else cfg.neighbours) + 1
        self.threshold = cfg.threshold or default_threshold(group, cfg.threat_model)
        if cfg.mode == "secure" and not group // 2 < self.threshold <= group:
            raise FederationAborted(
                f"threshold {self.threshold} must be more than half of each sharing group of {group} "
                f"and at most {group}"
            )
        self.lane_bits = lane_bits_for(n)
        self.transcript.write_meta(
            "session.json",
            {
                "mode": cfg.mode,
                "strategy": cfg.strategy,
                "members": members,
                "lane_bits": self.lane_bits,
                "threshold": self.threshold,
                "threat_model": cfg.threat_model,
                "session_id": self.session_id.hex(),
                "fingerprint": self.fingerprint.hex(),
                "server_public": raw_public(self.identity.public_key()).hex(),
                "store_payloads": cfg.store_payloads,
                "decoded": [],
            },
        )
        for cid in members:
            self.links[cid].send(welcome=self._welcome(cid))
        if cfg.mode == "secure":
            self._secure_setup()
        ranges = self._round_ranges()
        salts = layer_salts(self.lm.model)
        final = np.zeros(self.layout.total, dtype=bool)
        for rnd, (offset, length, slots) in enumerate(ranges):
            t1 = time.perf_counter()
            for cid in self._alive():
                self.links[cid].send(round_start=pb.RoundStart(round=rnd, offset=offset, length=length))
            self._round_extra = {}
            counts, contributors = (self._secure_round if cfg.mode == "secure" else self._plain_round)(
                rnd, length
            )
            t2 = time.perf_counter()
            self.log(f"round {rnd}: selection over {len(contributors)} contributors")
            layer_counts = {
                name: torch.from_numpy(c.astype(np.int16))
                for name, c in self.layout.unflatten(counts, offset).items()
            }
            try:
                for name, votes in layer_counts.items():
                    check_vote_counts(votes, self.prune_cfg, len(contributors), name)
            except VoteCountError as exc:
                raise FederationAborted(
                    f"round {rnd} aborted: {exc}; a client sent votes no honest client can send"
                ) from exc
            masks = apply_vote_counts(self.lm.model, layer_counts, self.prune_cfg, len(contributors), salts)
            final[offset : offset + length] = self.layout.flatten(masks, slots)
            self._broadcast_mask(rnd, final[offset : offset + length])
            self._send_receipt(rnd)
            self.rounds.append(
                {
                    "round": rnd,
                    "offset": offset,
                    "length": length,
                    "contributors": [self.members[i] for i in contributors],
                    "aggregate_s": t2 - t1,
                    "selection_s": time.perf_counter() - t2,
                    **self._round_extra,
                }
            )
            self.log(f"round {rnd + 1}/{len(ranges)} done")
        self.timings["federation"] = time.perf_counter() - t0
        self.timings["key_agreement"] = sum(r.get("keys_s", 0.0) for r in self.rounds)
        report = self._report(final, eval_before)
        self._write_outputs(final, report)
        for cid in self._alive():
            self.links[cid].send(
                finished=pb.Finished(
                    report_json=json.dumps({"final_mask_sha256": report["final_mask_sha256"]})
                )
            )
        return report

    def _alive(self) -> list[str]:
        return [c for c in self.members if self.links[c].alive]

    def _welcome(self, cid: str) -> pb.Welcome:
        return pb.Welcome(
            session_id=self.session_id,
            index=self.index[cid],
            mode=self.cfg.mode,
            strategy=self.cfg.strategy,
            **convert.prune_to_welcome(self.prune_cfg),
            threshold=self.threshold,
            neighbours=self.cfg.neighbours,
            lane_bits=self.lane_bits,
            chunk_elems=self.cfg.chunk_elems,
            fingerprint=self.fingerprint,
            roster=[
                pb.RosterEntry(index=self.index[c], client_id=c, identity_public=self.roster[c])
                for c in self.members
            ],
            manifest=[
                pb.LayerSlot(name=s.name, block=s.block, rows=s.shape[0], cols=s.shape[1], offset=s.offset)
                for s in self.layout.slots
            ],
            deadline_s=self.cfg.round_deadline_s,
        )

    def _round_ranges(self):
        if self.cfg.strategy == "one-shot":
            return [(0, self.layout.total, self.layout.slots)]
        return [
            (*self.layout.block_range(b), self.layout.block_slots(b)) for b in range(self.layout.num_blocks)
        ]

    def _collect(self, expected: set[str], handle, what: str) -> set[str]:
        """Feed events to ``handle`` until every expected client is done, gone, or the deadline."""
        done: set[str] = set()
        deadline = time.monotonic() + self.cfg.round_deadline_s
        while expected - done:
            missing = {c for c in expected - done if self.links[c].alive}
            if not missing:
                break
            try:
                cid, msg = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.log(f"deadline passed waiting for {what} from {sorted(missing)}")
                break
            if msg is None:
                if cid in expected - done:
                    self.log(f"client {cid} disconnected during {what}")
                continue
            if cid not in expected or cid in done:
                kind = msg.WhichOneof("body")
                late = kind in ("chunk", "round_done", "survivor_signature", "unmask_shares")
                self._reject("late" if late else "unexpected", f"{kind} from {cid} during {what}")
                continue
            try:
                if handle(cid, msg):
                    done.add(cid)
            except (SecAggError, ProtocolViolation) as exc:
                self._reject(type(exc).__name__, f"{cid}: {exc}")
        return done

    def _reject(self, kind: str, detail: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        self.log(f"rejected ({kind}): {detail}")

    # ---- secure mode ---------------------------------------------------------------
    def _secure_setup(self) -> None:
        """The session: roster, graph and threshold. Keys are fresh in every round."""
        self.sa_config = SessionConfig(
            session_id=self.session_id,
            clients=tuple(range(len(self.members))),
            threshold=self.threshold,
            vector_length=self.layout.total,
            lane_bits=self.lane_bits,
            chunk_elems=self.cfg.chunk_elems,
            neighbours=self.cfg.neighbours or None,
        )
        roster = {self.index[c]: self.roster[c] for c in self.members}
        self.sa = ServerSession(self.sa_config, roster, buffer_factory=self._sum_buffer)

    def _secure_round(self, rnd: int, length: int):
        """One SecAgg round: (keys, share_keys, collect_masked_vectors, consistency, unmask)."""
        sa, sid = self.sa, self.session_id
        inverse = {i: c for c, i in self.index.items()}
        times = {}
        try:
            t0 = time.perf_counter()
            sa.begin_round(rnd, vector_length=length)

            def on_advert(cid, msg):
                if msg.WhichOneof("body") != "key_advert" or msg.key_advert.sender != self.index[cid]:
                    raise ProtocolViolation("expected this client's key advertisement")
                sa.receive_advertisement(convert.advert_from_pb(msg.key_advert, sid))
                return True

            advertised = self._collect(set(self._alive()), on_advert, f"round {rnd} keys")
            directory = convert.directory_to_pb(sa.key_directory())
            for cid in advertised:
                self.links[cid].send(key_directory=directory)
            times["keys_s"] = time.perf_counter() - t0

            def on_shares(cid, msg):
                if msg.WhichOneof("body") != "encrypted_shares":
                    raise ProtocolViolation("expected encrypted shares")
                sa.receive_shares(convert.shares_from_pb(msg.encrypted_shares, sid, self.index[cid]))
                return True

            self._collect(advertised, on_shares, f"round {rnd} key shares")
            bundles = sa.share_bundles()
            for i, bundle in bundles.items():
                self.links[inverse[i]].send(share_bundle=convert.bundle_to_pb(bundle))
            self.log(f"round {rnd}: {len(bundles)} clients shared keys; collecting masked input")

            staging = ChunkStaging(self.cfg.output_dir)
            nchunks = sa.round_config.num_chunks

            def on_input(cid, msg):
                kind = msg.WhichOneof("body")
                if kind == "round_done" and msg.round_done.round == rnd:
                    if len(staging.offsets.get(cid, ())) != nchunks:
                        staging.discard(cid)
                        self.log(f"round {rnd}: {cid}'s upload is incomplete; treated as dropped")
                        return True
                    for offset, data in staging.drain(cid):  # complete: into the running sum
                        sa.receive_chunk(MaskedChunk(sid, rnd, self.index[cid], offset, data))
                    return True
                if kind != "chunk":
                    raise ProtocolViolation(f"expected masked chunks, got {kind}")
                c = msg.chunk
                chunk = MaskedChunk(sid, c.round, self.index[cid], c.offset, c.data)
                sa.validate_chunk(chunk, staging.offsets.setdefault(cid, set()))
                staging.add(cid, c.offset, c.data)
                return False

            try:
                uploaded = self._collect({inverse[i] for i in bundles}, on_input, f"round {rnd} masked input")
                for cid in {inverse[i] for i in bundles} - uploaded:
                    self.log(f"round {rnd}: {cid} did not finish its upload; treated as dropped")
            finally:
                staging.close()
            survivors = sa.survivor_list()
            self.log(f"round {rnd}: inputs from {len(survivors.survivors)}/{len(bundles)}; consistency check")
            for i in survivors.survivors:
                self.links[inverse[i]].send(survivor_list=convert.survivors_to_pb(survivors))

            def on_signature(cid, msg):
                if msg.WhichOneof("body") != "survivor_signature":
                    raise ProtocolViolation("expected a survivor-list signature")
                s = msg.survivor_signature
                sa.receive_signature(ConsistencySignature(sid, s.round, self.index[cid], s.signature))
                return True

            signers = self._collect(
                {inverse[i] for i in survivors.survivors}, on_signature, f"round {rnd} consistency signatures"
            )
            request = sa.unmask_request()
            for cid in signers:
                self.links[cid].send(unmask_request=convert.request_to_pb(request))

            def on_unmask(cid, msg):
                if msg.WhichOneof("body") != "unmask_shares":
                    raise ProtocolViolation("expected unmasking shares")
                sa.receive_unmask(convert.unmask_from_pb(msg.unmask_shares, sid, self.index[cid]))
                return True

            self._collect(set(signers), on_unmask, f"round {rnd} unmasking shares")
            self.log(f"round {rnd}: unmasking")
            counts = sa.finish()
        except SecAggError as exc:
            raise FederationAborted(f"round {rnd} aborted: {exc}") from exc
        dropped = [self.members[i] for i in sa.dropped]
        bad = {self.members[h]: [self.members[o] for o in owners] for h, owners in sa.bad_shares.items()}
        for holder, owners in bad.items():
            self.log(f"round {rnd}: {holder} sent corrupted unmask shares (for {owners}); excluded from them")
        meta_path = Path(self.cfg.audit_dir) / "session.json"
        meta = json.loads(meta_path.read_text())
        meta["decoded"].append(
            f"round {rnd}: {length} vote counts over clients {[self.members[i] for i in survivors.survivors]}"
            + (f"; mask keys of this round reconstructed for dropped clients {dropped}" if dropped else "")
        )
        meta.setdefault("dropped", {})[str(rnd)] = dropped
        self.transcript.write_meta("session.json", meta)
        self._round_extra = {**times, "dropped": dropped, "bad_shares": bad}
        return counts, list(survivors.survivors)

    def _sum_buffer(self, nbytes: int) -> np.ndarray:
        """The running sum: in memory, or a memory-mapped file for large one-shot vectors."""
        if nbytes < SPILL_BYTES:
            return np.zeros(nbytes, dtype=np.uint8)
        Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.cfg.output_dir) / ".running-sum.tmp"
        self._spill = path
        return np.memmap(path, dtype=np.uint8, mode="w+", shape=(nbytes,))

    # ---- plain mode ----------------------------------------------------------------
    def _plain_round(self, rnd: int, length: int):
        chunk = self.cfg.chunk_elems  # a multiple of 128, so chunks start on whole bytes
        buffers: dict[str, np.ndarray] = {}  # bit-packed, as received: 1 bit per weight
        seen: dict[str, set[int]] = {}
        nchunks = -(-length // chunk)

        def on_input(cid, msg):
            kind = msg.WhichOneof("body")
            if kind == "round_done" and msg.round_done.round == rnd:
                if len(seen.get(cid, ())) != nchunks:
                    raise ProtocolViolation(f"incomplete mask from {cid}")
                return True
            if kind != "chunk" or msg.chunk.round != rnd:
                raise ProtocolViolation(f"expected mask chunks of round {rnd}, got {kind}")
            c = msg.chunk
            count = min(chunk, length - c.offset) if c.offset < length else 0
            if c.offset % chunk or count <= 0 or len(c.data) != -(-count // 8):
                raise ProtocolViolation(f"malformed chunk at offset {c.offset}")
            if c.offset in seen.setdefault(cid, set()):
                raise ProtocolViolation(f"duplicate chunk at offset {c.offset}")
            seen[cid].add(c.offset)
            buf = buffers.setdefault(cid, np.zeros(-(-length // 8), dtype=np.uint8))
            buf[c.offset // 8 : c.offset // 8 + len(c.data)] = np.frombuffer(c.data, dtype=np.uint8)
            return False

        done = self._collect(set(self._alive()), on_input, f"round {rnd} masks")
        if len(done) < self.cfg.min_clients:
            raise FederationAborted(
                f"round {rnd}: only {len(done)} complete masks, at least {self.cfg.min_clients} needed"
            )
        counts = np.zeros(length, dtype=np.int32)
        for cid in done:
            counts += np.unpackbits(buffers.pop(cid), bitorder="little", count=length)
        return counts, sorted(self.index[c] for c in done)

    # ---- outputs -------------------------------------------------------------------
    def _broadcast_mask(self, rnd: int, mask: np.ndarray) -> None:
        for start in range(0, len(mask), MASK_CHUNK_BITS):
            part = np.packbits(mask[start : start + MASK_CHUNK_BITS], bitorder="little").tobytes()
            last = start + MASK_CHUNK_BITS >= len(mask)
            for cid in self._alive():
                self.links[cid].send(final_mask=pb.FinalMask(round=rnd, offset=start, data=part, last=last))

    def _send_receipt(self, rnd: int) -> None:
        """Sign the transcript's head and give every client a copy to keep (see nodes.audit)."""
        records, head = self.transcript.head()
        signature = sign(self.identity, receipt_message(self.session_id, rnd, records, head))
        receipt = pb.Receipt(
            round=rnd,
            records=records,
            head=head,
            server_public=raw_public(self.identity.public_key()),
            signature=signature,
        )
        for cid in self._alive():
            self.links[cid].send(receipt=receipt)

    def _evaluate(self) -> dict[str, float]:
        from fedprune.data import eval_windows, load_text, source_label, tokenize
        from fedprune.evaluation import perplexity

        out = {}
        for src in self.cfg.eval_sources:
            ids = tokenize(self.lm.tokenizer, load_text(src, "evaluation"))
            out[source_label(src)] = perplexity(
                self.lm.model, eval_windows(ids, self.cfg.eval_seqlen, self.cfg.eval_windows)
            )
        return out

    def _report(self, final: np.ndarray, eval_before) -> dict:
        packed = np.packbits(final, bitorder="little").tobytes()
        per_layer = {name: float(m.mean()) for name, m in self.layout.unflatten(final).items()}
        report = {
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "roster"},
            "members": self.members,
            "fingerprint": self.fingerprint.hex(),
            "final_mask_sha256": hashlib.sha256(packed).hexdigest(),
            "sparsity": float(final.mean()),
            "sparsity_per_layer": per_layer,
            "rounds": self.rounds,
            "bytes_received": {c: self.links[c].bytes_received for c in self.members},
            "rejected": self.rejected,
            "refused": self.refused,
            "timings": self.timings,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if eval_before is not None:
            report["perplexity_before"] = eval_before
            report["perplexity_after"] = self._evaluate()
        self._packed_mask = packed
        return report

    def _write_outputs(self, final: np.ndarray, report: dict) -> None:
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "final-mask.bin", self._packed_mask)
        atomic_write_text(
            out / "manifest.json",
            json.dumps(
                {
                    "fingerprint": self.fingerprint.hex(),
                    "bit_order": "little",
                    "total": self.layout.total,
                    "layout": self.layout.to_json(),
                    "final_mask_sha256": report["final_mask_sha256"],
                },
                indent=2,
            ),
        )
        if self.cfg.save_model:

            def fill(tmp: Path) -> None:
                self.lm.model.save_pretrained(tmp, safe_serialization=True)
                self.lm.tokenizer.save_pretrained(tmp)

            atomic_write_dir(out / "pruned-model", fill)
        atomic_write_text(out / "report.json", json.dumps(report, indent=2))
