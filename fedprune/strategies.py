"""Strategies: centralized Wanda, one-shot and iterative FedPrLLM (and local-only, via
centralized on one client's windows).

All of them share one loop over decoder blocks. Per block every client
collects Wanda statistics on its own activations and computes its local mask;
what differs is what the server selects and what the clients propagate:

- centralized: one party with the pooled windows; its local mask is final.
- one-shot: each client propagates through its *own* locally pruned block;
  the server selects from the vote counts (results do not depend on when
  the server sees them, so the simulation aggregates block by block).
- iterative: the server selects per block and clients propagate through the
  server-pruned block before computing the next block's masks.

The seam for secure aggregation is ``aggregate``: a function from the
clients' masks to the vote counts. The default is the in-process sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .models import block_linears, decoder_blocks, layout
from .propagation import BlockRunner
from .selection import apply_mask, scale_retained, select_final_mask
from .wanda import local_mask, wanda_scores

Strategy = Literal["centralized", "one-shot", "iterative"]
STRATEGIES: tuple[str, ...] = ("centralized", "local-only", "one-shot", "iterative")
MaskSet = Mapping[str, torch.Tensor]
Aggregate = Callable[[Sequence[MaskSet]], dict[str, torch.Tensor]]


def plain_sum(client_masks: Sequence[MaskSet]) -> dict[str, torch.Tensor]:
    """Vote counts in the clear: the element-wise sum of the clients' boolean masks."""
    counts: dict[str, torch.Tensor] = {}
    for masks in client_masks:
        for name, mask in masks.items():
            if name in counts:
                counts[name] += mask
            else:
                counts[name] = mask.to(torch.int16)
    return counts


@dataclass
class PruneResult:
    """The final masks (True = pruned) applied to the model, with stage timings."""

    final_masks: dict[str, torch.Tensor]
    num_clients: int
    timings: dict[str, float] = field(default_factory=dict)

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Global and per-layer fraction of pruned prunable weights."""
        per_layer = {n: m.float().mean().item() for n, m in self.final_masks.items()}
        pruned = sum(int(m.sum()) for m in self.final_masks.values())
        total = sum(m.numel() for m in self.final_masks.values())
        return pruned / total, per_layer


def prune(
    model: nn.Module,
    client_windows: Sequence[torch.Tensor],
    config: PruneConfig,
    strategy: Strategy,
    *,
    aggregate: Aggregate = plain_sum,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with one strategy; ``client_windows[c]`` is client c's data.

    Centralized pools all windows into one party.
    """
    if strategy == "centralized":
        client_windows = [torch.cat(list(client_windows))]
    num_clients = len(client_windows)
    salts = {slot.name: index for index, slot in enumerate(layout(model).slots)}
    runner = BlockRunner(model, config.batch_size)
    timings = {"calibration": 0.0, "aggregation": 0.0, "selection": 0.0}
    start = time.perf_counter()
    hidden = [runner.embed(windows) for windows in client_windows]
    blocks = decoder_blocks(model)
    final_masks: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(blocks)), desc=f"{strategy} pruning", unit="block", disable=not progress):
        linears = block_linears(blocks[i])
        prefix = f"model.layers.{i}."
        t0 = time.perf_counter()
        local = []
        for h in hidden:
            stats = runner.collect_stats(i, h)
            local.append(
                {
                    n: local_mask(wanda_scores(linears[n].weight.data, s.sq_norm), config)
                    for n, s in stats.items()
                }
            )
        last = i == len(blocks) - 1  # the last block's outputs are never needed
        if strategy == "one-shot" and not last:
            hidden = [runner.forward(i, h, masks) for h, masks in zip(hidden, local, strict=True)]
        timings["calibration"] += time.perf_counter() - t0
        if strategy == "centralized":
            block_final, counts = local[0], None
        else:
            t0 = time.perf_counter()
            counts = aggregate([{prefix + n: m for n, m in masks.items()} for masks in local])
            timings["aggregation"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            block_final = {
                n: select_final_mask(
                    counts[prefix + n], config, weight=mod.weight.data, salt=salts[prefix + n]
                )
                for n, mod in linears.items()
            }
            timings["selection"] += time.perf_counter() - t0
        for n, mod in linears.items():
            apply_mask(mod.weight.data, block_final[n])
            if config.weight_scaling and counts is not None:
                scale_retained(mod.weight.data, counts[prefix + n], num_clients)
            final_masks[prefix + n] = block_final[n].cpu()
        if strategy != "one-shot" and not last:
            t0 = time.perf_counter()
            hidden = [runner.forward(i, h) for h in hidden]
            timings["calibration"] += time.perf_counter() - t0
    timings["prune_total"] = time.perf_counter() - start
    return PruneResult(final_masks=final_masks, num_clients=num_clients, timings=timings)
