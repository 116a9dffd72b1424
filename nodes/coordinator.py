"""The coordinator: client streams, membership, phases with their deadlines, the round loop.

One bidirectional stream per client. Reader threads turn incoming messages
into events (and audit records); a single coordinator thread runs the
protocol on those events with per-phase deadlines, so the secagg state
machines are only ever touched by one thread. A federation reads as its steps:

1. admission (nodes.admission) until ``join_deadline_s``; at least
   ``min_clients`` members, after which nobody else joins;
2. the session: threshold and lane width, session.json, one Welcome each;
3. per round (one-shot: one; iterative and statistics: one per decoder block):
   RoundStart, the aggregator's exchange (nodes.aggregators; each of its steps
   waits at most ``round_deadline_s``), the checks of the sums and selection
   (vote counts, or the pooled statistics: nodes.statistics_rounds), the final
   mask broadcast, a signed receipt;
4. outputs (nodes.outputs) and Finished.

The model is never whole in memory (nodes.model): the server loads a decoder
block only to select it with the magnitude tie-break or to write it pruned.
Vote counts stay packed until the layer being selected is unpacked; the final
mask is kept bit-packed (nodes.masks).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedprune.errors import StatisticsError, VoteCountError
from fedprune.models import LayerSlot, layout
from fedprune.selection import LayerSalts
from fedprune.strategies import apply_vote_counts, layer_salts
from fedprune.wanda import check_vote_counts
from secagg import default_threshold, lane_bits_for
from secagg.errors import SecAggError
from secagg.keys import raw_public, sign

from .admission import ID_PATTERN, Admission, Refusal, refusal_record
from .aggregators import Aggregator, Handler, PlainAggregator, RoundSums, SecureAggregator
from .audit import Transcript, receipt_message
from .config import ServerConfig
from .errors import FederationAborted, ProtocolViolation
from .files import StagedDir
from .identity import load_identity, parse_public_hex
from .masks import PackedMask
from .model import (
    MaskedBlocks,
    block_source,
    free_resident,
    load_node_model,
    load_resident,
    model_fingerprint,
    pruned_writer,
)
from .outputs import mask_summary, perplexities, write_outputs
from .statistics_rounds import INPUT_BOUND, StatisticsParameters, block_layouts, server_block_masks
from .traffic import traffic
from .wire import convert
from .wire import federation_pb2 as pb
from .wire import federation_pb2_grpc as pb_grpc

MASK_CHUNK_BITS = 1 << 23  # elements per FinalMask message (1 MiB bit-packed)
LATE_KINDS = ("chunk", "round_done", "survivor_signature", "unmask_shares")


class Link:
    """One admitted client's stream: its outbox and whether it is still open."""

    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.outbox: queue.Queue = queue.Queue()
        self.alive = True
        self.bytes_received = 0

    def send(self, **body) -> None:
        if self.alive:
            self.outbox.put(pb.ServerMessage(**body))


class Coordinator(pb_grpc.FederationServicer):
    """The server's protocol driver (and gRPC servicer); the ``Federation`` its aggregator uses."""

    def __init__(self, cfg: ServerConfig, log=print) -> None:
        self.cfg = cfg
        self.log = log
        self.roster = {cid: parse_public_hex(pk, cid) for cid, pk in cfg.roster.items()}
        self.prune_cfg = cfg.prune_config()
        t0 = time.perf_counter()
        self.lm = load_node_model(cfg.model, cfg.dtype, cfg.device, log)  # the skeleton; blocks on demand
        self.layout = layout(self.lm.model)
        self.fingerprint = model_fingerprint(self.lm)
        self.final = PackedMask(self.layout.total)  # the final mask, 1 bit per weight
        self.pruned: StagedDir | None = None  # pruned-model/, written block by block as selected
        self.writer = None
        self.blocks = block_source(self.lm)
        # Statistics with DP: the noise that meets (epsilon, delta) over one round per block,
        # found before anything is served or written (a target no noise meets is one line).
        self.dp_calibration = None
        if cfg.strategy == "statistics" and cfg.dp_epsilon is not None:
            from fedprune.statistics import DPConfig, calibrate_noise

            self.dp_calibration = calibrate_noise(
                DPConfig(cfg.dp_epsilon, cfg.dp_delta), self.layout.num_blocks
            )
        self.timings = {"load_model": time.perf_counter() - t0}
        self.transcript = Transcript(cfg.audit_dir, cfg.store_payloads)
        # The identity that signs receipts: a configured key, or one made for this run (its
        # public half is in session.json, inside the chain).
        self.identity = load_identity(cfg.identity) if cfg.identity else Ed25519PrivateKey.generate()
        self.events: queue.Queue = queue.Queue()
        self.links: dict[str, Link] = {}
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
        # Fixed when the session starts (_open_session), from the clients that joined.
        self.members: list[str] = []
        self.index: dict[str, int] = {}
        self.threshold = 0
        self.lane_bits = 0
        self.session_meta: dict = {}
        self.aggregator: Aggregator | None = None
        self.statistics: StatisticsParameters | None = None  # the statistics strategy's parameters
        self.block_layouts: list = []  # statistics: each block's BlockLayout

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

    def _join(self, cid: str, hello, proof) -> Link:
        link = Link(cid)
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

    def _read(self, link: Link, request_iterator) -> None:
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

    def _gone(self, link: Link) -> None:
        if link.alive:
            link.alive = False
            self.events.put((link.id, None))

    # ---- the federation, step by step ----------------------------------------------
    def federate(self) -> dict:
        """Run the federation on the admitted streams, write the outputs; return the report.

        On ``FederationAborted`` every client is told why, and nothing is written.
        """
        try:
            return self._federate()
        except FederationAborted as exc:
            for link in list(self.links.values()):
                link.send(abort=pb.Abort(reason=str(exc)))
            raise

    def hang_up(self) -> None:
        """End every client's stream (after Finished or Abort)."""
        for link in list(self.links.values()):
            link.outbox.put(None)

    def close(self) -> None:
        self.transcript.close()
        if self.aggregator is not None:
            self.aggregator.close()
        if self.pruned is not None:  # left only by an aborted federation
            self.pruned.discard()

    def _federate(self) -> dict:
        eval_before = self._evaluate(block_source(self.lm)) if self.cfg.eval_sources else None
        free_resident(self.lm)  # selection needs no embeddings nor head: only blocks, on demand
        t0 = time.perf_counter()
        self._await_members()
        self.timings["join"] = time.perf_counter() - t0
        self._open_session()
        ranges = self._round_ranges()
        self.block_layouts = block_layouts(self.layout) if self.statistics else []
        salts = layer_salts(self.lm.model)
        if self.cfg.save_model:  # each block is written as it is selected
            Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)
            self.pruned = StagedDir(Path(self.cfg.output_dir) / "pruned-model")
            self.writer = pruned_writer(self.lm, self.pruned.path)
            self.blocks = block_source(self.lm, on_release=self.writer.write_block)
        for rnd, (offset, length, slots) in enumerate(ranges):
            self._round(rnd, offset, length, slots, salts)
            self.log(f"round {rnd + 1}/{len(ranges)} done")
        self.aggregator.close()  # the last round's sum is no longer needed
        if self.writer is not None or self.cfg.eval_sources:
            load_resident(self.lm)
        if self.writer is not None:
            self.writer.finish()
        self.timings["federation"] = time.perf_counter() - t0
        self.timings["key_agreement"] = sum(r.get("keys_s", 0.0) for r in self.rounds)
        report = self._report(eval_before)
        write_outputs(self.cfg.output_dir, self.final, self.layout, self.fingerprint, report, self.pruned)
        for cid in self.alive():
            self.links[cid].send(
                finished=pb.Finished(
                    report_json=json.dumps({"final_mask_sha256": report["final_mask_sha256"]})
                )
            )
        return report

    def _await_members(self) -> None:
        """Step 1: wait for the expected clients until the join deadline; then close the door."""
        cfg = self.cfg
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

    def _open_session(self) -> None:
        """Step 2: the threshold (secure mode: t > g/2 of every sharing group), the lane width,
        session.json, a Welcome for every member, and the aggregator."""
        cfg = self.cfg
        n = len(self.members)
        group = (n - 1 if not cfg.neighbours or cfg.neighbours >= n - 1 else cfg.neighbours) + 1
        self.threshold = cfg.threshold or default_threshold(group, cfg.threat_model)
        if cfg.mode == "secure" and not group // 2 < self.threshold <= group:
            raise FederationAborted(
                f"threshold {self.threshold} must be more than half of each sharing group of {group} "
                f"and at most {group}"
            )
        statistics = cfg.strategy == "statistics"
        # Votes: the counts 0..n fit. Statistics: fixed-point ring elements of Z_(2^64).
        self.lane_bits = 64 if statistics else lane_bits_for(n)
        if statistics:
            from fedprune.statistics import DEFAULT_CLIP

            self.statistics = StatisticsParameters.for_server(
                DEFAULT_CLIP if cfg.stats_clip is None else float(cfg.stats_clip),
                cfg.max_tokens_per_client,
                cfg.seqlen,
                n,
                self.threshold if cfg.mode == "secure" else 1,
                self.layout.num_blocks,
                self.dp_calibration,
            )
        self.session_meta = {
            "mode": cfg.mode,
            "strategy": cfg.strategy,
            "members": self.members,
            "lane_bits": self.lane_bits,
            "threshold": self.threshold,
            "threat_model": cfg.threat_model,
            "session_id": self.session_id.hex(),
            "fingerprint": self.fingerprint.hex(),
            "server_public": raw_public(self.identity.public_key()).hex(),
            "store_payloads": cfg.store_payloads,
            "decoded": [],
        }
        if self.statistics:
            self.session_meta["statistics"] = self.statistics.to_welcome()
        self.transcript.write_meta("session.json", self.session_meta)
        for cid in self.members:
            self.links[cid].send(welcome=self._welcome(cid))
        if cfg.mode == "secure":
            self.aggregator = SecureAggregator(
                self,
                session_id=self.session_id,
                roster={self.index[c]: self.roster[c] for c in self.members},
                threshold=self.threshold,
                lane_bits=self.lane_bits,
                chunk_elems=cfg.chunk_elems,
                neighbours=cfg.neighbours or None,
                work_dir=cfg.output_dir,
                **(
                    {
                        "input_bound": INPUT_BOUND,
                        "values": "pooled per-channel statistics of the round's block",
                    }
                    if statistics
                    else {}
                ),
            )
        else:  # plain votes travel at 1 bit per weight, statistics at 64
            self.aggregator = PlainAggregator(
                self,
                lane_bits=64 if statistics else 1,
                chunk_elems=cfg.chunk_elems,
                min_clients=cfg.min_clients,
            )

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
            **(self.statistics.to_welcome() if self.statistics else {}),
        )

    def _round_ranges(self) -> list[tuple[int, int, tuple[LayerSlot, ...]]]:
        """(offset, length, slots) of every round: the whole vector, or one decoder block each."""
        lay = self.layout
        if self.cfg.strategy == "one-shot":
            return [(0, lay.total, lay.slots)]
        return [(*lay.block_range(b), lay.block_slots(b)) for b in range(lay.num_blocks)]

    def _round(
        self, rnd: int, offset: int, length: int, slots: tuple[LayerSlot, ...], salts: LayerSalts
    ) -> None:
        """Step 3: one round; selects the final mask of ``[offset, offset + length)``."""
        t1 = time.perf_counter()
        before = {c: self.links[c].bytes_received for c in self.members}
        # Statistics: the uploaded vector is the block's statistics, not one vote per weight.
        vector_length = self.block_layouts[slots[0].block].length if self.statistics else length
        for cid in self.alive():
            self.links[cid].send(
                round_start=pb.RoundStart(
                    round=rnd,
                    offset=offset,
                    length=length,
                    vector_length=vector_length if self.statistics else 0,
                )
            )
        extra = {}
        if self.statistics:  # a short vector per block: unpacked whole
            sums, contributors = self.aggregator.aggregate(rnd, vector_length)
            t2 = time.perf_counter()
            self.log(f"round {rnd}: selection over {len(contributors)} contributors")
            extra = self._select_statistics(rnd, sums, slots, len(contributors))
        else:
            counts, contributors = self.aggregator.sum_round(rnd, length)
            t2 = time.perf_counter()
            self.log(f"round {rnd}: selection over {len(contributors)} contributors")
            self._select(rnd, counts, offset, slots, len(contributors), salts)
        self._broadcast_mask(rnd, offset, length)
        self._send_receipt(rnd)
        self.rounds.append(
            {
                "round": rnd,
                "offset": offset,
                "length": length,
                **({"vector_length": vector_length} if self.statistics else {}),
                "contributors": [self.members[i] for i in contributors],
                "bytes_received": {c: self.links[c].bytes_received - before[c] for c in self.members},
                "aggregate_s": t2 - t1,
                "selection_s": time.perf_counter() - t2,
                **extra,
                **self.aggregator.round_report,
            }
        )

    def _select_statistics(
        self, rnd: int, sums: np.ndarray, slots: tuple[LayerSlot, ...], contributors: int
    ) -> dict:
        """The statistics strategy's server step: decode and check the pooled statistics of the
        round's block, select its masks with the server's weights (the block loaded for this,
        and written pruned when the model is saved); the final mask goes into ``self.final``.

        Masking hides the inputs: the decoded sums are the only place a malformed vector shows.
        """
        from fedprune.statistics import decode_block

        block = slots[0].block
        block_layout = self.block_layouts[block]
        try:
            pooled = decode_block(
                np.asarray(sums, dtype=np.uint64),
                block_layout,
                self.statistics.codec(block_layout),
                contributors,
            )
        except StatisticsError as exc:
            raise FederationAborted(f"round {rnd} aborted: {exc}") from exc
        bound = contributors * self.statistics.max_tokens_per_client
        if pooled.tokens > bound:  # the codec allows every member; only the contributors sent
            raise FederationAborted(
                f"round {rnd} aborted: the pooled token count {pooled.tokens} exceeds {contributors} "
                f"contributors x {self.statistics.max_tokens_per_client}; no honest clients send this"
            )
        self.blocks.load(block)
        masks = server_block_masks(self.lm.model, block, pooled, self.prune_cfg)
        for slot in slots:
            self.final.set(slot.offset, masks[slot.name].cpu().numpy())
        del masks
        self.blocks.release(block)
        return {"tokens": pooled.tokens, "clamped_elements": pooled.clamped}

    def _select(
        self,
        rnd: int,
        counts: RoundSums,
        offset: int,
        slots: tuple[LayerSlot, ...],
        contributors: int,
        salts: LayerSalts,
    ) -> None:
        """FedPrLLM's server step on one round's vote counts, layer by layer: check, select,
        prune; the final mask goes into ``self.final``.

        A block's weights are loaded only when they are needed: to break ties by magnitude,
        or to write the block pruned (released after its last layer). Masking hides the
        inputs, so the counts are the only place a malformed vote shows.
        """
        cfg = self.prune_cfg
        load = cfg.tie_break == "magnitude" or self.writer is not None
        for block in sorted({s.block for s in slots}):
            if load:
                self.blocks.load(block)
            for slot in (s for s in slots if s.block == block):
                layer = counts.values(slot.offset - offset, slot.numel).astype(np.int16).reshape(slot.shape)
                votes = torch.from_numpy(layer)
                try:
                    check_vote_counts(votes, cfg, contributors, slot.name)
                except VoteCountError as exc:
                    raise FederationAborted(
                        f"round {rnd} aborted: {exc}; a client sent votes no honest client can send"
                    ) from exc
                mask = apply_vote_counts(self.lm.model, {slot.name: votes}, cfg, contributors, salts)
                self.final.set(slot.offset, mask[slot.name].cpu().numpy())
            if load:
                self.blocks.release(block)

    def _broadcast_mask(self, rnd: int, offset: int, length: int) -> None:
        for start in range(0, length, MASK_CHUNK_BITS):
            count = min(MASK_CHUNK_BITS, length - start)
            part = self.final.packed(offset + start, count)
            last = start + MASK_CHUNK_BITS >= length
            for cid in self.alive():
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
        for cid in self.alive():
            self.links[cid].send(receipt=receipt)

    # ---- the Federation an aggregator sees -------------------------------------------
    def alive(self) -> list[str]:
        return [c for c in self.members if self.links[c].alive]

    def send(self, client_id: str, **body) -> None:
        self.links[client_id].send(**body)

    def collect(self, expected: set[str], handle: Handler, what: str) -> set[str]:
        """Feed events to ``handle`` until every expected client is done, gone, or the deadline.

        A message ``handle`` refuses (``ProtocolViolation``, ``SecAggError``) and a message from
        a client not expected now are rejected and counted; the sender stays in the round.
        """
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
                late = kind in LATE_KINDS
                self._reject("late" if late else "unexpected", f"{kind} from {cid} during {what}")
                continue
            try:
                if handle(cid, msg):
                    done.add(cid)
            except (SecAggError, ProtocolViolation) as exc:
                self._reject(type(exc).__name__, f"{cid}: {exc}")
        return done

    def record_decoded(self, rnd: int, description: str, dropped: list[str]) -> None:
        self.session_meta["decoded"].append(description)
        self.session_meta.setdefault("dropped", {})[str(rnd)] = dropped
        self.transcript.write_meta("session.json", self.session_meta)

    def _reject(self, kind: str, detail: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        self.log(f"rejected ({kind}): {detail}")

    # ---- the report ------------------------------------------------------------------
    def _traffic(self) -> dict:
        """Bytes per client: measured (per round and in total) and the layout's expected bytes
        for this strategy next to one-shot voting, plain and secure (nodes.traffic)."""
        m = len(self.members)
        strategies = [self.cfg.strategy] + (["one-shot"] if self.cfg.strategy != "one-shot" else [])
        neighbours = self.cfg.neighbours or None
        return {
            "bytes_received_per_client_per_round": {
                c: [r["bytes_received"][c] for r in self.rounds] for c in self.members
            },
            "bytes_received_per_client": {c: self.links[c].bytes_received for c in self.members},
            "bytes_received_total": sum(self.links[c].bytes_received for c in self.members),
            "expected": [
                traffic(self.layout, s, secure, m, neighbours=neighbours)
                for s in strategies
                for secure in (False, True)
            ],
        }

    def _evaluate(self, blocks) -> dict[str, float]:
        cfg = self.cfg
        return perplexities(self.lm, cfg.eval_sources, cfg.eval_seqlen, cfg.eval_windows, blocks)

    def _report(self, eval_before) -> dict:
        report = {
            "config": {
                **{k: v for k, v in asdict(self.cfg).items() if k != "roster"},
                "group": self.cfg.comparison_group,
            },
            "members": self.members,
            "fingerprint": self.fingerprint.hex(),
            **mask_summary(self.final, self.layout),
            "rounds": self.rounds,
            "bytes_received": {c: self.links[c].bytes_received for c in self.members},
            "rejected": self.rejected,
            "refused": self.refused,
            "timings": self.timings,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        report["traffic"] = self._traffic()
        if self.statistics:
            report["statistics"] = self.statistics.report(self.block_layouts)
        if eval_before is not None:
            report["perplexity_before"] = eval_before
            report["perplexity_after"] = self._evaluate(MaskedBlocks(self.lm, self.layout, self.final))
        return report
