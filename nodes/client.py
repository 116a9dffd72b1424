"""The client process: private data stays here; only (masked) votes or statistics leave.

It loads the model, proves it is the server's (fingerprint), computes its
Wanda masks with fedprune (or, for the statistics strategy, its per-channel
input statistics block by block: nodes.statistics_rounds), runs the secagg
client over the gRPC stream, applies the final mask it receives, and can save
its pruned model.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from fedprune.assets import cache_dir
from fedprune.data import load_text, sample_windows, tokenize
from fedprune.errors import FedPruneError
from fedprune.models import fingerprint, layout, load_model, prunable_weights
from fedprune.strategies import ClientPruner, local_pruning_masks
from secagg import ClientSession, SessionConfig
from secagg.errors import SecAggError
from secagg.keys import sign, verify
from secagg.ring import pack

from .admission import PROTOCOL_VERSION, hello_message
from .audit import receipt_message
from .errors import ClientFailed
from .files import atomic_write_dir, atomic_write_text
from .identity import load_identity
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
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    lay = layout(lm.model)
    fp = bytes.fromhex(fingerprint(lm.model))
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

    def round_vector(self, rnd: int, vector: np.ndarray) -> np.ndarray:
        """The votes this client is about to send in round ``rnd``."""
        return vector

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
        self.vector: np.ndarray | None = None  # one-shot: every layer; iterative: this block
        self.pending: np.ndarray | None = None  # this round's votes, waiting for the share bundle
        self.final = np.zeros(lay.total, dtype=bool)
        self.received: dict[int, list[bytes]] = {}
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
        t0 = time.perf_counter()
        progress = self._progress("local Wanda masks", lay.num_blocks)
        if welcome.strategy == "one-shot":
            masks = local_pruning_masks(self.lm.model, self.windows, prune_cfg, on_block=progress)
            self.vector = _votes(lay, masks)
            self.log(f"{cfg.client_id}: local masks ready in {time.perf_counter() - t0:.1f} s")
        elif statistics:
            try:
                self.statistics = StatisticsClient(self.lm.model, self.windows, lay, params, cfg.batch_size)
            except FedPruneError as exc:
                raise ClientFailed(f"refusing to join: {exc}") from exc
            dp = f", DP epsilon {params.dp_epsilon:g}, delta {params.dp_delta:g}" if params.dp else ""
            self.log(f"{cfg.client_id}: calibration inputs ready in {time.perf_counter() - t0:.1f} s{dp}")
        else:
            self.pruner = ClientPruner(self.lm.model, self.windows, prune_cfg)
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
            try:
                vector = self.statistics.vector(block)
            except FedPruneError as exc:
                raise ClientFailed(f"round {rs.round}: {exc}") from exc
            self.log(f"{self.cfg.client_id}: block {block + 1}/{self.lay.num_blocks} statistics ready")
        elif self.welcome.strategy == "iterative":
            masks = self.pruner.local_masks(block)
            vector = _votes(self.lay, masks, self.lay.block_slots(block))
            self.log(f"{self.cfg.client_id}: block {block + 1}/{self.lay.num_blocks} masks ready")
        else:
            vector = self.vector[rs.offset : rs.offset + rs.length]
        vector = self.hooks.round_vector(rs.round, vector)
        if self.sa is None:
            bits = LANE_BITS if self.statistics is not None else 1
            self._send_input(rs.round, _plain_chunks(rs.round, vector, self.welcome.chunk_elems, bits))
        else:
            self.pending = vector

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
        self.received.setdefault(fm.round, []).append(fm.data)
        if not fm.last:
            return
        offset, length = self.ranges[fm.round]
        bits = np.unpackbits(
            np.frombuffer(b"".join(self.received.pop(fm.round)), dtype=np.uint8), bitorder="little"
        )[:length].astype(bool)
        self.final[offset : offset + length] = bits
        _apply(self.lm.model, self.lay, self.final, offset, length)
        if self.pruner is not None or self.statistics is not None:
            block = next(s.block for s in self.lay.slots if s.offset == offset)
            (self.pruner or self.statistics).advance(block)

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
        cfg, lm, final = self.cfg, self.lm, self.final
        digest = hashlib.sha256(np.packbits(final, bitorder="little").tobytes()).hexdigest()
        if cfg.save_model:

            def fill(tmp: Path) -> None:
                lm.model.save_pretrained(tmp, safe_serialization=True)
                lm.tokenizer.save_pretrained(tmp)

            atomic_write_dir(cfg.save_model, fill)
        self.log(f"{cfg.client_id}: finished; final mask sha256 {digest[:16]}…, sparsity {final.mean():.3f}")
        if self.receipts:
            self.log(f"{cfg.client_id}: {len(self.receipts)} signed receipts kept in {self.receipts_path}")
        self.result = {"final_mask_sha256": digest, "sparsity": float(final.mean())}

    def on_abort(self, abort) -> None:
        raise ClientFailed(f"the server aborted the federation: {abort.reason}")


def _session(cfg, lm, lay, fp, windows, identity, inbox, outgoing, log, hooks) -> dict:
    session = _Session(cfg, lm, lay, fp, windows, identity, outgoing, log, hooks)
    deadline = cfg.connect_timeout_s + 600
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


def _votes(lay, masks, slots=None) -> np.ndarray:
    """The vote vector of ``slots`` (default: every slot): the local masks in layout order."""
    return lay.flatten(masks, slots).astype(np.uint8)


def _plain_chunks(rnd: int, vector: np.ndarray, chunk: int, bits: int = 1) -> Iterator[pb.VectorChunk]:
    """The plain upload, chunk by chunk: the mask bit-packed, or statistics in 64-bit lanes."""
    for start in range(0, len(vector), chunk):
        data = pack(vector[start : start + chunk], bits).tobytes()
        yield pb.VectorChunk(round=rnd, offset=start, data=data)


def _statistics_length(lay, block: int) -> int:
    from fedprune.statistics import BlockLayout

    return BlockLayout.from_slots(lay.block_slots(block)).length


def _apply(model, lay, final: np.ndarray, offset: int, length: int) -> None:
    """Prune the layers of ``[offset, offset + length)`` with the final mask."""
    weights = prunable_weights(model)
    for name, mask in lay.unflatten(final[offset : offset + length], offset).items():
        weights[name].masked_fill_(torch.from_numpy(mask).to(weights[name].device), 0)
