"""The client process: private data stays here; only (masked) votes leave.

It loads the model, proves it is the server's (fingerprint), computes its
Wanda masks with fedprune, runs the secagg client over the gRPC stream,
applies the final mask it receives, and can save its pruned model.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from fedprune.config import PruneConfig
from fedprune.data import load_text, sample_windows, tokenize
from fedprune.models import fingerprint, layout, load_model, prunable_weights
from fedprune.strategies import ClientPruner, local_pruning_masks
from secagg import ClientSession, SessionConfig
from secagg.keys import sign
from secagg.messages import KeyDirectory

from .files import atomic_write_dir
from .identity import load_identity
from .server import PROTOCOL_VERSION, hello_message
from .wire import convert
from .wire import federation_pb2 as pb
from .wire import federation_pb2_grpc as pb_grpc

_EOF = object()


class ClientFailed(Exception):
    """The federation failed from this client's point of view (one line for the user)."""


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


def run_client(cfg: ClientConfig, log=print) -> dict:
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
    nonce = os.urandom(16)
    outgoing.put(
        pb.ClientMessage(
            hello=pb.Hello(
                client_id=cfg.client_id,
                fingerprint=fp,
                protocol_version=PROTOCOL_VERSION,
                nonce=nonce,
                signature=sign(identity, hello_message(cfg.client_id, fp, nonce)),
            )
        )
    )
    try:
        return _session(cfg, lm, lay, fp, windows, identity, inbox, outgoing, log)
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


def _session(cfg, lm, lay, fp, windows, identity, inbox, outgoing, log) -> dict:
    fault = os.environ.get("FEDPRUNE_FAULT", "")  # test instrumentation for fault injection
    deadline = cfg.connect_timeout_s + 600
    welcome = None
    sa: ClientSession | None = None
    prune_cfg = pruner = vector = None
    final = np.zeros(lay.total, dtype=bool)
    received: dict[int, list[bytes]] = {}
    rnd_range: dict[int, tuple[int, int]] = {}
    send = lambda **body: outgoing.put(pb.ClientMessage(**body))  # noqa: E731
    while True:
        msg = _next(inbox, deadline)
        kind = msg.WhichOneof("body")
        if kind == "welcome":
            welcome = msg.welcome
            deadline = welcome.deadline_s + 60
            if welcome.fingerprint != fp:
                raise ClientFailed("the server's model fingerprint differs from ours; refusing to continue")
            manifest = [(s.name, (s.rows, s.cols), s.offset) for s in welcome.manifest]
            if manifest != [(s.name, s.shape, s.offset) for s in lay.slots]:
                raise ClientFailed("the server's layout manifest differs from our model's layout")
            if welcome.weight_scaling:
                raise ClientFailed("weight scaling cannot be applied from a broadcast mask")
            prune_cfg = PruneConfig(
                sparsity=welcome.sparsity,
                comparison_group=welcome.comparison_group,
                tie_break=welcome.tie_break,
                nm=(welcome.nm_n, welcome.nm_m) if welcome.nm_m else None,
                seed=welcome.seed,
                batch_size=cfg.batch_size,
            )
            if welcome.mode == "secure":
                roster = {e.index: e.identity_public for e in welcome.roster}
                sa_cfg = SessionConfig(
                    session_id=welcome.session_id,
                    clients=tuple(sorted(roster)),
                    threshold=welcome.threshold,
                    vector_length=lay.total,
                    lane_bits=welcome.lane_bits,
                    chunk_elems=welcome.chunk_elems,
                    neighbours=welcome.neighbours or None,
                )
                sa = ClientSession(sa_cfg, welcome.index, identity, roster)
                send(key_advert=convert.advert_to_pb(sa.advertise()))
            log(f"{cfg.client_id}: joined as #{welcome.index} ({welcome.mode}, {welcome.strategy})")
            t0 = time.perf_counter()
            if welcome.strategy == "one-shot":
                masks = local_pruning_masks(lm.model, windows, prune_cfg)
                vector = np.concatenate([masks[s.name].cpu().flatten().numpy() for s in lay.slots])
                vector = vector.astype(np.uint8)
            else:
                pruner = ClientPruner(lm.model, windows, prune_cfg)
            log(f"{cfg.client_id}: local masks ready in {time.perf_counter() - t0:.1f} s")
        elif kind == "key_directory":
            adverts = tuple(convert.advert_from_pb(a, welcome.session_id) for a in msg.key_directory.adverts)
            sa.receive_keys(KeyDirectory(welcome.session_id, adverts))
        elif kind == "round_start":
            rs = msg.round_start
            rnd_range[rs.round] = (rs.offset, rs.length)
            if welcome.strategy == "iterative":
                block = next(s.block for s in lay.slots if s.offset == rs.offset)
                masks = pruner.local_masks(block)
                vector = np.concatenate(
                    [masks[s.name].flatten().cpu().numpy() for s in lay.block_slots(block)]
                ).astype(np.uint8)
            round_vector = (
                vector if welcome.strategy == "iterative" else vector[rs.offset : rs.offset + rs.length]
            )
            if sa is not None:
                send(encrypted_shares=convert.shares_to_pb(sa.share_keys(rs.round, rs.length)))
                pending = round_vector
            else:
                _send_plain(send, rs.round, round_vector, welcome.chunk_elems, fault)
        elif kind == "share_bundle":
            sa.receive_shares(convert.bundle_from_pb(msg.share_bundle, welcome.session_id, welcome.index))
            if fault == "exit-before-input":
                os._exit(3)
            if fault == "stall-before-input":
                time.sleep(3600)  # hold the round open (the test kills us)
            if fault == "bad-chunk":
                send(chunk=pb.VectorChunk(round=sa.round, offset=3, data=b"\x00"))
            for chunk in sa.masked_chunks(pending):
                send(chunk=pb.VectorChunk(round=chunk.round, offset=chunk.offset, data=chunk.data))
                if fault == "bad-chunk":
                    send(chunk=pb.VectorChunk(round=chunk.round, offset=chunk.offset, data=chunk.data))
                    fault = ""
            send(round_done=pb.RoundDone(round=sa.round))
            if fault == "exit-after-input":
                time.sleep(1.0)  # let the stream flush, then vanish
                os._exit(3)
        elif kind == "survivor_list":
            sig = sa.sign_survivors(convert.survivors_from_pb(msg.survivor_list, welcome.session_id))
            send(survivor_signature=pb.SurvivorSignature(round=sig.round, signature=sig.signature))
        elif kind == "unmask_request":
            shares = sa.unmask(convert.request_from_pb(msg.unmask_request, welcome.session_id))
            send(unmask_shares=convert.unmask_to_pb(shares))
        elif kind == "final_mask":
            fm = msg.final_mask
            received.setdefault(fm.round, []).append(fm.data)
            if fm.last:
                offset, length = rnd_range[fm.round]
                bits = np.unpackbits(
                    np.frombuffer(b"".join(received.pop(fm.round)), dtype=np.uint8), bitorder="little"
                )[:length].astype(bool)
                final[offset : offset + length] = bits
                _apply(lm.model, lay, final, offset, length)
                if pruner is not None:
                    block = next(s.block for s in lay.slots if s.offset == offset)
                    pruner.advance(block)
        elif kind == "finished":
            digest = hashlib.sha256(np.packbits(final, bitorder="little").tobytes()).hexdigest()
            if cfg.save_model:

                def fill(tmp: Path) -> None:
                    lm.model.save_pretrained(tmp, safe_serialization=True)
                    lm.tokenizer.save_pretrained(tmp)

                atomic_write_dir(cfg.save_model, fill)
            log(f"{cfg.client_id}: finished; final mask sha256 {digest[:16]}…, sparsity {final.mean():.3f}")
            return {"final_mask_sha256": digest, "sparsity": float(final.mean())}
        elif kind == "abort":
            raise ClientFailed(f"the server aborted the federation: {msg.abort.reason}")


def _send_plain(send, rnd: int, vector: np.ndarray, chunk: int, fault: str) -> None:
    for start in range(0, len(vector), chunk):
        data = np.packbits(vector[start : start + chunk], bitorder="little").tobytes()
        send(chunk=pb.VectorChunk(round=rnd, offset=start, data=data))
    send(round_done=pb.RoundDone(round=rnd))


def _apply(model, lay, final: np.ndarray, offset: int, length: int) -> None:
    weights = prunable_weights(model)
    for slot in lay.slots:
        if offset <= slot.offset < offset + length:
            mask = torch.from_numpy(final[slot.offset : slot.offset + slot.numel].reshape(slot.shape))
            weights[slot.name].masked_fill_(mask.to(weights[slot.name].device), 0)
