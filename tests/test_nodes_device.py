"""Masks computed on an accelerator reach numpy through the host (``.cpu()``).

No GPU is needed: ``OffHostTensor`` behaves like a CUDA tensor where it
matters (``.numpy()`` refuses it, ``.cpu()`` brings it home), and the client's
session is driven through its inbox and outbox queues, as the gRPC stream
would, in plain mode for both strategies.
"""

from __future__ import annotations

import queue
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import nodes.client as client_module
from fedprune.models import LoadedModel, fingerprint, layout
from fedprune.strategies import ClientPruner
from nodes.wire import federation_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


class OffHostTensor(torch.Tensor):
    """Stands in for a tensor on a GPU: numpy() refuses it until it is copied to the host."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an off-host tensor to numpy; copy it to the host first")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_off_host_tensor_models_a_gpu_tensor():
    t = torch.ones(4, dtype=torch.bool).as_subclass(OffHostTensor)
    with pytest.raises(TypeError):
        t.flatten().numpy()
    assert t.flatten().cpu().numpy().all()


def _off_host(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: mask.as_subclass(OffHostTensor) for name, mask in masks.items()}


def _welcome(lay, fp: bytes, strategy: str) -> pb.Welcome:
    return pb.Welcome(
        session_id=b"\x00" * 16,
        index=0,
        mode="plain",
        strategy=strategy,
        sparsity=0.5,
        comparison_group="layer",
        tie_break="random",
        seed=0,
        chunk_elems=1 << 12,
        fingerprint=fp,
        manifest=[
            pb.LayerSlot(name=s.name, block=s.block, rows=s.shape[0], cols=s.shape[1], offset=s.offset)
            for s in lay.slots
        ],
        deadline_s=60,
    )


@pytest.mark.parametrize("strategy", ["one-shot", "iterative"])
def test_client_sends_votes_computed_off_host(strategy, tiny_model, windows, monkeypatch):
    sent_masks: dict[str, torch.Tensor] = {}

    def remember(masks):
        sent_masks.update({n: m.as_subclass(torch.Tensor).clone() for n, m in masks.items()})
        return _off_host(masks)

    real_block = ClientPruner.local_masks  # one-shot and iterative clients both compute through it
    monkeypatch.setattr(ClientPruner, "local_masks", lambda self, i: remember(real_block(self, i)))

    lm = LoadedModel(model=tiny_model, tokenizer=None, spec="tiny")
    lay = layout(tiny_model)
    fp = bytes.fromhex(fingerprint(tiny_model))
    if strategy == "one-shot":
        rounds = [(0, lay.total)]
    else:
        rounds = []
        for block in range(lay.num_blocks):
            slots = lay.block_slots(block)
            rounds.append((slots[0].offset, sum(s.numel for s in slots)))
    inbox: queue.Queue = queue.Queue()
    outgoing: queue.Queue = queue.Queue()
    welcome = _welcome(lay, fp, strategy)
    inbox.put(pb.ServerMessage(challenge=pb.Challenge(session_id=welcome.session_id, nonce=bytes(32))))
    inbox.put(pb.ServerMessage(welcome=welcome))
    final = np.zeros(lay.total, dtype=bool)
    final[::3] = True  # any final mask: the client applies what it is sent
    for rnd, (offset, length) in enumerate(rounds):
        inbox.put(pb.ServerMessage(round_start=pb.RoundStart(round=rnd, offset=offset, length=length)))
        data = np.packbits(final[offset : offset + length], bitorder="little").tobytes()
        inbox.put(pb.ServerMessage(final_mask=pb.FinalMask(round=rnd, data=data, last=True)))
    inbox.put(pb.ServerMessage(finished=pb.Finished(report_json="{}")))

    cfg = client_module.ClientConfig(server="127.0.0.1:9", client_id="org-1", identity="", data=())
    identity = Ed25519PrivateKey.generate()
    hooks = client_module.ClientHooks()
    result = client_module._session(
        cfg, lm, lay, fp, windows, identity, inbox, outgoing, lambda _: None, hooks
    )

    expected = np.concatenate([sent_masks[s.name].flatten().numpy() for s in lay.slots])
    received = np.zeros(lay.total, dtype=bool)
    while not outgoing.empty():
        msg = outgoing.get()
        if msg.WhichOneof("body") == "chunk":
            offset = rounds[msg.chunk.round][0] + msg.chunk.offset
            bits = np.unpackbits(np.frombuffer(msg.chunk.data, dtype=np.uint8), bitorder="little")
            end = min(offset + len(bits), lay.total)
            received[offset:end] = bits[: end - offset].astype(bool)
    assert np.array_equal(received, expected)
    assert result["sparsity"] == pytest.approx(final.mean())


def test_no_tensor_reaches_numpy_without_the_host():
    """Every ``.numpy()`` in the shipped code follows a ``.cpu()`` or ``.to("cpu")``
    (in the same expression or on the lines just above)."""
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in files:
        if name.startswith("tests/"):
            continue
        lines = (ROOT / name).read_text().splitlines()
        for lineno, line in enumerate(lines, 1):
            for match in re.finditer(r"\.numpy\(\)", line):
                # the same expression, or the variable made on the lines just above
                context = "\n".join(lines[max(0, lineno - 4) : lineno - 1]) + line[: match.start()]
                if not re.search(r"\.cpu\(\)|\.to\(\"cpu\"\)", context):
                    offenders.append(f"{name}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_final_mask_for_a_round_never_started_is_refused(tiny_model, windows):
    """A lying server sends a final mask for a round it never started: a typed error, not a crash."""
    lm = LoadedModel(model=tiny_model, tokenizer=None, spec="tiny")
    lay = layout(tiny_model)
    fp = bytes.fromhex(fingerprint(tiny_model))
    inbox: queue.Queue = queue.Queue()
    welcome = _welcome(lay, fp, "one-shot")
    inbox.put(pb.ServerMessage(challenge=pb.Challenge(session_id=welcome.session_id, nonce=bytes(32))))
    inbox.put(pb.ServerMessage(welcome=welcome))
    inbox.put(pb.ServerMessage(final_mask=pb.FinalMask(round=7, data=b"\xff", last=True)))
    cfg = client_module.ClientConfig(server="127.0.0.1:9", client_id="org-1", identity="", data=())
    with pytest.raises(client_module.ClientFailed, match="round 7, which it never started"):
        client_module._session(
            cfg, lm, lay, fp, windows, Ed25519PrivateKey.generate(), inbox, queue.Queue(),
            lambda _: None, client_module.ClientHooks(),
        )  # fmt: skip
