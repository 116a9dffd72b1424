"""The client process: private data stays here; only (masked) votes or statistics leave.

It loads the model, proves it is the server's (fingerprint), computes its
Wanda masks with fedprune (or, for the statistics strategy, its per-channel
input statistics block by block: nodes.statistics_rounds), runs the secagg
client over the gRPC stream, applies the final mask it receives, and can save
its pruned model.

The model is never whole in memory (nodes.model): each pass loads one decoder
block at a time. Votes are bit-packed as soon as a block's masks exist, and
fed to the upload (plain, or SecAgg's masking) one chunk at a time; the final
mask is kept bit-packed (nodes.masks).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from fedprune.assets import cache_dir
from fedprune.data import load_text, sample_windows, tokenize
from fedprune.errors import FedPruneError
from fedprune.models import layout
from fedprune.strategies import ClientPruner, local_block_masks
from secagg import ClientSession, SessionConfig
from secagg.client import ChunkSource
from secagg.errors import SecAggError
from secagg.keys import sign, verify
from secagg.ring import pack

from .admission import PROTOCOL_VERSION, hello_message
from .audit import receipt_message
from .errors import ClientFailed
from .files import StagedDir, atomic_write_text
from .identity import load_identity
from .masks import PackedMask
from .model import (
    apply_final_mask,
    block_source,
    free_resident,
    load_node_model,
    load_resident,
    model_fingerprint,
    pruned_writer,
)
from .statistics_rounds import INPUT_BOUND, LANE_BITS, StatisticsClient, StatisticsParameters
from .wire import convert
from .wire import federation_pb2 as pb
from .wire import federation_pb2_grpc as pb_grpc

_EOF = object()


@dataclass(frozen=True)
class ClientConfig:
    server: str
    client_id: str
    identity: str
    data: tuple[str, ...]
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    nsamples: int = 16
    seqlen: int = 128
    seed: int = 0
    batch_size: int = 8
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    insecure: bool = False
    save_model: str = ""
    connect_timeout_s: float = 60.0
    receipts: str = ""  # where to keep the server's signed receipts; "": the fedprune cache


def _channel(cfg: ClientConfig) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    if cfg.insecure:
        return grpc.insecure_channel(cfg.server, options=options)
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(cfg.tls_ca).read_bytes(),
            private_key=Path(cfg.tls_key).read_bytes(),
            certificate_chain=Path(cfg.tls_cert).read_bytes(),
        )
    except OSError as exc:
        raise ClientFailed(f"cannot read TLS files: {exc}") from exc
    return grpc.secure_channel(cfg.server, creds, options=options)


def run_client(cfg: ClientConfig, log=print, hooks: ClientHooks | None = None) -> dict:
    identity = load_identity(cfg.identity)
    lm = load_node_model(cfg.model, cfg.dtype, cfg.device, log)  # the skeleton; blocks on demand
    lay = layout(lm.model)
    fp = model_fingerprint(lm)
    text = "\n\n".join(load_text(path, "calibration") for path in cfg.data)
    windows = sample_windows(tokenize(lm.tokenizer, text), cfg.nsamples, cfg.seqlen, cfg.seed)
    log(f"{cfg.client_id}: {len(windows)} private windows of {cfg.seqlen} tokens")

    outgoing: queue.Queue = queue.Queue()
    inbox: queue.Queue = queue.Queue()
    channel = _channel(cfg)
    try:
        grpc.channel_ready_future(channel).result(timeout=cfg.connect_timeout_s)
    except grpc.FutureTimeoutError as exc:
        raise ClientFailed(f"cannot reach the server at {cfg.server}") from exc
    stub = pb_grpc.FederationStub(channel)
    responses = stub.Session(iter(outgoing.get, _EOF))

    def read() -> None:
        try:
            for msg in responses:
                inbox.put(msg)
            inbox.put(_EOF)
        except grpc.RpcError as exc:
            inbox.put(exc)

    threading.Thread(target=read, daemon=True).start()
    hello = pb.Hello(client_id=cfg.client_id, fingerprint=fp, protocol_version=PROTOCOL_VERSION)
    outgoing.put(pb.ClientMessage(hello=hello))
    try:
        return _session(cfg, lm, lay, fp, windows, identity, inbox, outgoing, log, hooks or ClientHooks())
    finally:
        outgoing.put(_EOF)
        channel.close()


def _next(inbox: queue.Queue, deadline_s: float):
    try:
        item = inbox.get(timeout=deadline_s)
    except queue.Empty:
        raise ClientFailed(f"no word from the server for {deadline_s:.0f} s; giving up") from None
    if item is _EOF:
        raise ClientFailed("the server closed the session before it finished")
    if isinstance(item, grpc.RpcError):
        code = item.code().name if hasattr(item, "code") else "?"
        details = item.details() if hasattr(item, "details") else str(item)
        raise ClientFailed(f"server refused or failed ({code}): {details}")
    return item


class ClientHooks:
    """The seam through which tests inject faults; the shipped client uses these no-ops.

    A test passes a subclass to :func:`run_client` (see tests/fault_client.py); nothing
    in a shipped process reads a fault from its environment.
    """

    def round_input(self, rnd: int, values: ChunkSource) -> ChunkSource:
        """Where the values this client sends in round ``rnd`` come from: ``values(offset,
        count)`` gives elements ``[offset, offset + count)`` of the round's vector."""
        return values

    def after_shares(self, rnd: int) -> None:
        """Called after this client sent its encrypted key shares for round ``rnd``."""

    def before_input(self, rnd: int) -> None:
        """Called after the share bundle arrived, before any masked chunk is sent."""

    def chunks(self, rnd: int, chunks: Iterator[pb.VectorChunk]) -> Iterator[pb.VectorChunk]:
        """The chunks about to be sent (a test may add, drop or alter some)."""
        return chunks

    def after_input(self, rnd: int) -> None:
        """Called after this client's whole input for round ``rnd`` was queued."""

    def unmask_shares(self, message: pb.UnmaskShares) -> pb.UnmaskShares:
        """The unmask shares about to be sent."""
        return message


class _Session:
    """One client's side of the federation: one handler per server message kind."""

    def __init__(self, cfg, lm, lay, fp, windows, identity, outgoing, log, hooks: ClientHooks) -> None:
        self.cfg, self.lm, self.lay, self.fp, self.windows = cfg, lm, lay, fp, windows
        self.identity, self.outgoing, self.log, self.hooks = identity, outgoing, log, hooks
        self.welcome = None
        self.session_id: bytes | None = None  # from the server's challenge
        self.sa: ClientSession | None = None
        self.pruner: ClientPruner | None = None
        self.statistics: StatisticsClient | None = None
        self.votes: PackedMask | None = None  # one-shot: every layer's votes, bit-packed
        self.pending: ChunkSource | None = None  # this round's votes, waiting for the share bundle
        self.final = PackedMask(lay.total)
        self.blocks = block_source(lm)  # the local passes: blocks loaded and freed
        self.pruned: StagedDir | None = None  # --save-model: the pruned model, block by block
        self.writer = None
        self.pruned_blocks = self.blocks  # blocks that are written out pruned when released
        self.ranges: dict[int, tuple[int, int]] = {}
        self.result: dict | None = None
        self.receipts: list[dict] = []

    def send(self, **body) -> None:
        self.outgoing.put(pb.ClientMessage(**body))

    def handle(self, msg) -> dict | None:
        kind = msg.WhichOneof("body")
        getattr(self, f"on_{kind}")(getattr(msg, kind))
        return self.result

    def on_challenge(self, challenge) -> None:
        """Prove our identity: sign the server's fresh nonce and session id (no replayable Hello)."""
        if self.session_id is not None or len(challenge.nonce) < 16 or len(challenge.session_id) < 8:
            raise ClientFailed("the server sent a malformed or repeated challenge")
        self.session_id = challenge.session_id
        message = hello_message(challenge.session_id, challenge.nonce, self.cfg.client_id, self.fp)
        self.send(hello_proof=pb.HelloProof(signature=sign(self.identity, message)))

    def on_welcome(self, welcome) -> None:
        cfg, lay = self.cfg, self.lay
        if self.session_id is None or welcome.session_id != self.session_id:
            raise ClientFailed("the server's welcome is for another session than the one we proved")
        self.welcome = welcome
        if welcome.fingerprint != self.fp:
            raise ClientFailed("the server's model fingerprint differs from ours; refusing to continue")
        manifest = [(s.name, (s.rows, s.cols), s.offset) for s in welcome.manifest]
        if manifest != [(s.name, s.shape, s.offset) for s in lay.slots]:
            raise ClientFailed("the server's layout manifest differs from our model's layout")
        if welcome.weight_scaling:
            raise ClientFailed("weight scaling cannot be applied from a broadcast mask")
        prune_cfg = convert.prune_from_welcome(welcome, cfg.batch_size)
        statistics = welcome.strategy == "statistics"
        params = None
        if statistics:
            if welcome.lane_bits != LANE_BITS:
                raise ClientFailed(
                    f"the statistics strategy uses {LANE_BITS}-bit lanes, the server says {welcome.lane_bits}"
                )
            try:
                params = StatisticsParameters.from_welcome(welcome, lay.num_blocks)
            except FedPruneError as exc:
                raise ClientFailed(f"refusing the server's statistics settings: {exc}") from exc
        elif welcome.strategy not in ("one-shot", "iterative"):
            raise ClientFailed(f"unknown strategy {welcome.strategy!r} from the server")
        if welcome.mode == "secure":
            roster = {e.index: e.identity_public for e in welcome.roster}
            try:  # the client enforces t > g/2 itself: a server cannot lower it
                sa_cfg = SessionConfig(
                    session_id=welcome.session_id,
                    clients=tuple(sorted(roster)),
                    threshold=welcome.threshold,
                    vector_length=lay.total,
                    lane_bits=welcome.lane_bits,
                    chunk_elems=welcome.chunk_elems,
                    neighbours=welcome.neighbours or None,
                    **({"input_bound": INPUT_BOUND} if statistics else {}),
                )
            except SecAggError as exc:
                raise ClientFailed(f"refusing the server's secure-aggregation settings: {exc}") from exc
            self.sa = ClientSession(sa_cfg, welcome.index, self.identity, roster)
        self.log(f"{cfg.client_id}: joined as #{welcome.index} ({welcome.mode}, {welcome.strategy})")
        if cfg.save_model:
            self.pruned = StagedDir(cfg.save_model)
            self.writer = pruned_writer(self.lm, self.pruned.path)
            self.pruned_blocks = block_source(self.lm, on_release=self.writer.write_block)
        t0 = time.perf_counter()
        progress = self._progress("local Wanda masks", lay.num_blocks)
        if welcome.strategy == "one-shot":
            self.votes = PackedMask(lay.total)
            for block, masks in local_block_masks(self.lm.model, self.windows, prune_cfg, blocks=self.blocks):
                _pack_votes(self.votes, lay, masks, block)
                progress(block + 1)
            self.log(f"{cfg.client_id}: local masks ready in {time.perf_counter() - t0:.1f} s")
            free_resident(self.lm)  # the embeddings are needed again only to save the model
        elif statistics:
            try:
                self.statistics = StatisticsClient(self.lm.model, self.windows, lay, params, cfg.batch_size)
            except FedPruneError as exc:
                raise ClientFailed(f"refusing to join: {exc}") from exc
            dp = f", DP epsilon {params.dp_epsilon:g}, delta {params.dp_delta:g}" if params.dp else ""
            self.log(f"{cfg.client_id}: calibration inputs ready in {time.perf_counter() - t0:.1f} s{dp}")
            free_resident(self.lm)  # the windows are embedded: from here on, blocks only
        else:
            self.pruner = ClientPruner(self.lm.model, self.windows, prune_cfg)
            free_resident(self.lm)  # the windows are embedded: from here on, blocks only
            self.log(f"{cfg.client_id}: calibration inputs ready in {time.perf_counter() - t0:.1f} s")

    def _progress(self, what: str, total: int):
        name = self.cfg.client_id

        def report(done: int) -> None:
            self.log(f"{name}: {what}: block {done}/{total}")

        return report

    def on_round_start(self, rs) -> None:
        self.ranges[rs.round] = (rs.offset, rs.length)
        block = next((s.block for s in self.lay.slots if s.offset == rs.offset), None)
        if self.welcome.strategy != "one-shot" and block is None:
            raise ClientFailed(f"round {rs.round} starts at offset {rs.offset}, where no block starts")
        length = rs.length
        if self.statistics is not None:
            length = _statistics_length(self.lay, block)
            if rs.vector_length != length:
                raise ClientFailed(
                    f"round {rs.round}: the server asks for {rs.vector_length} statistics of block "
                    f"{block}, which has {length}"
                )
        if self.sa is not None:  # fresh keys first, so the key round overlaps our local work
            self.send(key_advert=convert.advert_to_pb(self.sa.advertise(rs.round, length)))
        if self.statistics is not None:
            self.pruned_blocks.load(block)  # released once the final mask is applied
            try:
                vector = self.statistics.vector(block)
            except FedPruneError as exc:
                raise ClientFailed(f"round {rs.round}: {exc}") from exc
            self.log(f"{self.cfg.client_id}: block {block + 1}/{self.lay.num_blocks} statistics ready")
            source = _slicer(vector)
        elif self.welcome.strategy == "iterative":
            if self.lay.block_range(block) != (rs.offset, rs.length):
                raise ClientFailed(f"round {rs.round} is not one decoder block of the layout")
            self.pruned_blocks.load(block)  # released once the final mask is applied
            votes = PackedMask(rs.length)
            _pack_votes(votes, self.lay, self.pruner.local_masks(block), block, rs.offset)
            source = _vote_source(votes)
            self.log(f"{self.cfg.client_id}: block {block + 1}/{self.lay.num_blocks} masks ready")
        else:
            if (rs.offset, rs.length) != (0, self.lay.total):
                raise ClientFailed(f"one-shot round {rs.round} does not cover the whole layout")
            source = _vote_source(self.votes)
        values = self.hooks.round_input(rs.round, source)
        if self.sa is None:
            bits = LANE_BITS if self.statistics is not None else 1
            chunks = _plain_chunks(rs.round, values, length, self.welcome.chunk_elems, bits)
            self._send_input(rs.round, chunks)
        else:
            self.pending = values

    def on_key_directory(self, directory) -> None:
        self.sa.receive_keys(convert.directory_from_pb(directory, self.welcome.session_id))
        self.send(encrypted_shares=convert.shares_to_pb(self.sa.share_keys()))
        self.hooks.after_shares(self.sa.round)

    def on_share_bundle(self, bundle) -> None:
        sa = self.sa
        sa.receive_shares(convert.bundle_from_pb(bundle, self.welcome.session_id, self.welcome.index))
        self.hooks.before_input(sa.round)
        chunks = (
            pb.VectorChunk(round=c.round, offset=c.offset, data=c.data)
            for c in sa.masked_chunks(self.pending)
        )
        self._send_input(sa.round, chunks)
        self.pending = None

    def _send_input(self, rnd: int, chunks) -> None:
        for chunk in self.hooks.chunks(rnd, chunks):
            self.send(chunk=chunk)
        self.send(round_done=pb.RoundDone(round=rnd))
        self.hooks.after_input(rnd)

    def on_survivor_list(self, survivors) -> None:
        sig = self.sa.sign_survivors(convert.survivors_from_pb(survivors, self.welcome.session_id))
        self.send(survivor_signature=pb.SurvivorSignature(round=sig.round, signature=sig.signature))

    def on_unmask_request(self, request) -> None:
        shares = self.sa.unmask(convert.request_from_pb(request, self.welcome.session_id))
        self.send(unmask_shares=self.hooks.unmask_shares(convert.unmask_to_pb(shares)))

    def on_final_mask(self, fm) -> None:
        if fm.round not in self.ranges:
            raise ClientFailed(f"the server sent a final mask for round {fm.round}, which it never started")
        offset, length = self.ranges[fm.round]
        if not 0 <= fm.offset < length:
            raise ClientFailed(f"the server sent a final mask part outside round {fm.round}")
        self.final.set_packed(offset + fm.offset, fm.data, min(len(fm.data) * 8, length - fm.offset))
        if not fm.last:
            return
        if self.pruner is not None or self.statistics is not None:  # the next block's inputs come
            block = next(s.block for s in self.lay.slots if s.offset == offset)  # from this one pruned
            apply_final_mask(self.lm, self.lay, self.final, block)
            (self.pruner or self.statistics).advance(block)
            self.pruned_blocks.release(block)
        elif self.writer is not None:  # one-shot: one more pass, to write the pruned model
            for block in range(self.lay.num_blocks):
                self.pruned_blocks.load(block)
                apply_final_mask(self.lm, self.lay, self.final, block)
                self.pruned_blocks.release(block)

    def on_receipt(self, receipt) -> None:
        """Keep the server's signed transcript head: later, an audit can be checked against it."""
        public = receipt.server_public
        if self.receipts and public.hex() != self.receipts[0]["server_public"]:
            raise ClientFailed("the server signed a receipt with a different identity key")
        message = receipt_message(self.session_id, receipt.round, receipt.records, receipt.head)
        try:
            verify(public, receipt.signature, message, "the server")
        except SecAggError as exc:
            raise ClientFailed(
                f"the server's receipt for round {receipt.round} is not signed correctly"
            ) from exc
        self.receipts.append(
            {
                "session_id": self.session_id.hex(),
                "round": receipt.round,
                "records": receipt.records,
                "head": receipt.head,
                "server_public": public.hex(),
                "signature": receipt.signature.hex(),
            }
        )
        path = Path(
            self.cfg.receipts
            or cache_dir() / "receipts" / f"{self.session_id.hex()}-{self.cfg.client_id}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.receipts, indent=2))
        self.receipts_path = path

    def on_finished(self, _finished) -> None:
        cfg, final = self.cfg, self.final
        digest, sparsity = final.sha256(), final.count() / final.length
        if self.writer is not None:
            load_resident(self.lm)
            self.writer.finish()
            self.pruned.commit()
        self.log(f"{cfg.client_id}: finished; final mask sha256 {digest[:16]}…, sparsity {sparsity:.3f}")
        if self.receipts:
            self.log(f"{cfg.client_id}: {len(self.receipts)} signed receipts kept in {self.receipts_path}")
        self.result = {"final_mask_sha256": digest, "sparsity": sparsity}

    def close(self) -> None:
        """Remove a pruned model left half-written by a session that did not finish."""
        if self.pruned is not None:
            self.pruned.discard()

    def on_abort(self, abort) -> None:
        raise ClientFailed(f"the server aborted the federation: {abort.reason}")


def _session(cfg, lm, lay, fp, windows, identity, inbox, outgoing, log, hooks) -> dict:
    session = _Session(cfg, lm, lay, fp, windows, identity, outgoing, log, hooks)
    deadline = cfg.connect_timeout_s + 600
    try:
        while True:
            msg = _next(inbox, deadline)
            try:
                result = session.handle(msg)
            except SecAggError as exc:
                raise ClientFailed(f"refusing to continue: {exc}") from exc
            if session.welcome is not None:
                deadline = session.welcome.deadline_s + 60
            if result is not None:
                return result
    finally:
        session.close()


def _pack_votes(votes: PackedMask, lay, masks, block: int, offset: int = 0) -> None:
    """Block ``block``'s local masks into ``votes`` (which starts at element ``offset``),
    one layer at a time, through the host."""
    for slot in lay.block_slots(block):
        votes.set(slot.offset - offset, masks[slot.name].cpu().numpy())


def _vote_source(votes: PackedMask) -> ChunkSource:
    """The votes as SecAgg's chunk source: elements ``[offset, offset + count)`` as 0/1."""
    return lambda offset, count: votes.get(offset, count).view(np.uint8)


def _plain_chunks(
    rnd: int, values: ChunkSource, length: int, chunk: int, bits: int = 1
) -> Iterator[pb.VectorChunk]:
    """The plain upload, chunk by chunk: the votes bit-packed."""
    for start in range(0, length, chunk):
        data = pack(values(start, min(chunk, length - start)), bits).tobytes()
        yield pb.VectorChunk(round=rnd, offset=start, data=data)


def _slicer(vector: np.ndarray) -> ChunkSource:
    """A short vector held whole (a block's statistics) as a chunk source."""
    return lambda offset, count: vector[offset : offset + count]


def _statistics_length(lay, block: int) -> int:
    from fedprune.statistics import BlockLayout

    return BlockLayout.from_slots(lay.block_slots(block)).length
