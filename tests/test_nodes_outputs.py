"""The server's outputs from a federation driven in process (no gRPC): the coordinator
and two client sessions exchange their messages through queues, as their streams would.

The pruned model the server writes block by block must load with transformers and hold
exactly the weights of the in-process pruning (``fedprune.strategies.prune``) on the same
windows; final-mask.bin must be that run's final mask, bit-packed.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import nodes.client as client_module
from fedprune.config import prune_config
from fedprune.models import layout, load_model
from fedprune.strategies import prune
from nodes.config import ServerConfig
from nodes.coordinator import Coordinator, Link
from nodes.masks import PackedMask
from nodes.wire import federation_pb2 as pb
from secagg.keys import raw_public

from .conftest import save_tiny_model_dir

CLIENTS = ("a", "b")


def _client(coordinator, cid, identity, model_dir, windows, results, save_model=""):
    """One client session on queues: the server's messages in, its answers to the coordinator."""
    link = coordinator.links[cid]
    inbox: queue.Queue = queue.Queue()
    outgoing: queue.Queue = queue.Queue()
    inbox.put(pb.ServerMessage(challenge=pb.Challenge(session_id=coordinator.session_id, nonce=bytes(32))))

    def downstream():
        while (msg := link.outbox.get()) is not None:
            inbox.put(msg)

    def upstream():
        while (msg := outgoing.get()) is not client_module._EOF:
            if msg.WhichOneof("body") != "hello_proof":  # admission is not under test here
                coordinator.events.put((cid, msg))

    cfg = client_module.ClientConfig(
        server="-", client_id=cid, identity="", data=(), model=str(model_dir), save_model=save_model
    )
    lm = client_module.load_node_model(cfg.model, cfg.dtype, cfg.device, print)
    lay = layout(lm.model)
    fp = client_module.model_fingerprint(lm)

    def run():
        try:
            results[cid] = client_module._session(
                cfg,
                lm,
                lay,
                fp,
                windows,
                identity,
                inbox,
                outgoing,
                lambda _: None,
                client_module.ClientHooks(),
            )
        finally:
            outgoing.put(client_module._EOF)

    for target in (downstream, upstream, run):
        threading.Thread(target=target, daemon=True).start()


@pytest.mark.parametrize(("mode", "strategy"), [("plain", "one-shot"), ("secure", "iterative")])
def test_pruned_model_loads_and_equals_the_in_process_pruning(tmp_path, mode, strategy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny_model_dir(tmp_path / "model")
    identities = {c: Ed25519PrivateKey.generate() for c in CLIENTS}
    gen = torch.Generator().manual_seed(3)
    windows = {c: torch.randint(0, 256, (4, 32), generator=gen) for c in CLIENTS}
    cfg = ServerConfig(
        model=str(model_dir),
        mode=mode,
        strategy=strategy,
        tie_break="magnitude",  # the server needs each block's weights to select
        roster={c: raw_public(k.public_key()).hex() for c, k in identities.items()},
        insecure=True,
        audit_dir=str(tmp_path / "audit"),
        output_dir=str(tmp_path / "out"),
        chunk_elems=1 << 12,
        round_deadline_s=60.0,
    )
    coordinator = Coordinator(cfg, log=lambda _: None)
    results: dict = {}
    for cid in CLIENTS:
        coordinator.links[cid] = Link(cid)
    for cid in CLIENTS:
        save = str(tmp_path / "a-model") if cid == "a" else ""  # a client keeps its pruned copy too
        _client(coordinator, cid, identities[cid], model_dir, windows[cid], results, save)
    try:
        report = coordinator.federate()
    finally:
        coordinator.hang_up()
        coordinator.close()

    expected = load_model(str(model_dir))
    run = prune(
        expected.model,
        [windows[c] for c in CLIENTS],
        prune_config(sparsity=0.5, tie_break="magnitude"),
        strategy,
        progress=False,
    )
    lay = layout(expected.model)
    mask = PackedMask(lay.total)
    for slot in lay.slots:
        mask.set(slot.offset, run.final_masks[slot.name].numpy())
    out = tmp_path / "out"
    assert (out / "final-mask.bin").read_bytes() == mask.bytes.tobytes()
    assert report["final_mask_sha256"] == mask.sha256() == results["a"]["final_mask_sha256"]
    assert report["sparsity"] == pytest.approx(0.5)
    for written in (out / "pruned-model", tmp_path / "a-model"):
        assert AutoTokenizer.from_pretrained(written)("ab")["input_ids"]
        got = AutoModelForCausalLM.from_pretrained(written).state_dict()
        for name, tensor in expected.model.state_dict().items():
            assert torch.equal(got[name], tensor), (written.name, name)
    staging = [p.name for d in (out, tmp_path) for p in d.iterdir() if p.name.startswith(".")]
    assert not staging  # nothing half-written left behind
    assert np.isclose(float((got["model.layers.0.mlp.up_proj.weight"] == 0).float().mean()), 0.5)
