"""Bytes on the wire per client, by strategy and mode, for any model layout.

Counts the payload each client uploads per round (what it sends for the sum:
bit-packed votes in plain mode, masked lanes in secure mode, 64-bit fixed-point
statistics for the ``statistics`` strategy) and the final masks it downloads
(bit-packed, the same for every strategy). Secure rounds also cost a key round
per aggregation (a signed advertisement and sealed Shamir shares to each
neighbour): ``key_bytes_per_round`` measures it with the in-process protocol.
Protobuf framing and TLS are not counted.

Works from a ``fedprune.models.Layout`` (a loaded model) or from shapes alone
(``llama_layout``: a 7B model need not be loaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

import secagg
from fedprune.models import LayerSlot, Layout
from secagg.ring import lane_bits_for, packed_nbytes

STATISTICS_LANE_BYTES = 8  # one uint64 per input channel, plus one for the token count


def llama_layout(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None
) -> Layout:
    """The prunable layout of a LLaMA-shaped model (q, k, v, o, gate, up, down per block)."""
    head_dim = hidden // heads
    kv = (kv_heads or heads) * head_dim
    shapes = [
        ("self_attn.q_proj", (hidden, hidden)),
        ("self_attn.k_proj", (kv, hidden)),
        ("self_attn.v_proj", (kv, hidden)),
        ("self_attn.o_proj", (hidden, hidden)),
        ("mlp.gate_proj", (intermediate, hidden)),
        ("mlp.up_proj", (intermediate, hidden)),
        ("mlp.down_proj", (hidden, intermediate)),
    ]
    slots, offset = [], 0
    for b in range(layers):
        for name, shape in shapes:
            slots.append(LayerSlot(f"model.layers.{b}.{name}", b, shape, offset))
            offset += shape[0] * shape[1]
    return Layout(tuple(slots))


def _blocks(slots: Sequence[LayerSlot]) -> list[list[LayerSlot]]:
    blocks: dict[int, list[LayerSlot]] = {}
    for s in slots:
        blocks.setdefault(s.block, []).append(s)
    return [blocks[b] for b in sorted(blocks)]


@lru_cache(maxsize=16)
def key_bytes_per_round(num_clients: int, neighbours: int | None = None) -> int:
    """Key-round bytes one client uploads per secure round (advertisement and sealed shares).

    Measured with one in-process round of ``num_clients`` over a 128-element vector
    (the same for every client; the masked input itself is subtracted).
    """
    vectors = [np.zeros(128, dtype=np.uint8) for _ in range(num_clients)]
    result = secagg.simulate(vectors, neighbours=neighbours, chunk_elems=128)
    payload = packed_nbytes(128, lane_bits_for(num_clients))
    return max(result.bytes_received.values()) - payload


def traffic(
    layout: Layout,
    strategy: str,
    secure: bool,
    num_clients: int,
    *,
    neighbours: int | None = None,
    measure_keys: bool = True,
) -> dict:
    """Per-client and total bytes of one pruning run.

    ``strategy``: ``one-shot`` (one round with every vote), ``iterative`` (votes, one
    round per block) or ``statistics`` (per block, sum of in_features + 1 uint64).
    Secure votes use the smallest lane of 1, 2, 4, 8, 16 bits with 2^b > m; plain
    votes one bit. ``measure_keys`` adds the measured key round of each secure round.
    """
    blocks = _blocks(layout.slots)
    block_weights = [sum(s.numel for s in b) for b in blocks]
    vote_bits = lane_bits_for(num_clients) if secure else 1
    if strategy == "one-shot":
        per_round = [packed_nbytes(sum(block_weights), vote_bits)]
    elif strategy == "iterative":
        per_round = [packed_nbytes(w, vote_bits) for w in block_weights]
    elif strategy == "statistics":
        per_round = [STATISTICS_LANE_BYTES * (sum(s.shape[1] for s in b) + 1) for b in blocks]
    else:
        raise ValueError(f"no traffic model for strategy {strategy!r}")
    upload = sum(per_round)
    keys = len(per_round) * key_bytes_per_round(num_clients, neighbours) if secure and measure_keys else 0
    download = sum(packed_nbytes(w, 1) for w in block_weights)  # the final masks, bit-packed
    return {
        "strategy": strategy,
        "mode": "secure" if secure else "plain",
        "clients": num_clients,
        "rounds": len(per_round),
        "lane_bits": 64 if strategy == "statistics" else vote_bits,
        "upload_per_client_per_round_max": max(per_round),
        "upload_per_client": upload,
        "key_bytes_per_client": keys,
        "download_per_client": download,
        "upload_total": num_clients * (upload + keys),
    }


def traffic_table(layout: Layout, num_clients: int, *, measure_keys: bool = True) -> list[dict]:
    """One-shot voting, iterative voting and statistics, plain and secure."""
    return [
        traffic(layout, strategy, secure, num_clients, measure_keys=measure_keys)
        for strategy in ("one-shot", "iterative", "statistics")
        for secure in (False, True)
    ]


def markdown(rows: Sequence[dict]) -> str:
    header = (
        "| strategy | mode | rounds | per client per round (max) | per client | key rounds "
        "| total (m clients) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["strategy"], r["mode"], str(r["rounds"])] + [
            human_bytes(r[k])
            for k in (
                "upload_per_client_per_round_max",
                "upload_per_client",
                "key_bytes_per_client",
                "upload_total",
            )
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
