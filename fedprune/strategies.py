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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import block_matrices, blocks_path
from .config import PruneConfig
from .errors import PruningConfigError
from .models import decoder_blocks, layout, prunable_weights
from .propagation import BlockRunner
from .selection import LayerSalts, apply_mask, scale_retained, select_final_mask, uses_reference_fill
from .streaming import RESIDENT, BlockSource
from .wanda import local_mask, wanda_scores

Strategy = Literal["centralized", "one-shot", "iterative"]
STRATEGIES: tuple[str, ...] = ("centralized", "local-only", "one-shot", "iterative", "statistics")
MaskSet = Mapping[str, torch.Tensor]
Aggregate = Callable[[Sequence[MaskSet]], dict[str, torch.Tensor]]


def plain_sum(client_masks: Sequence[MaskSet]) -> dict[str, torch.Tensor]:
    """Vote counts in the clear: the element-wise sum of the clients' boolean masks."""
    counts: dict[str, torch.Tensor] = {}
    for masks in client_masks:
        add_votes(counts, masks)
    return counts


def add_votes(counts: dict[str, torch.Tensor], masks: MaskSet) -> None:
    """Add one client's boolean masks to the running vote counts (int16) in place."""
    for name, mask in masks.items():
        if name in counts:
            counts[name] += mask
        else:
            counts[name] = mask.to(torch.int16)


@dataclass
class PruneResult:
    """The final masks (True = pruned) applied to the model, with stage timings.

    ``final_masks`` is empty when the run was asked not to keep them (a streamed
    model: all masks of a large model do not fit in memory); ``pruned_counts``
    (name -> (pruned, total)) is always filled.
    """

    final_masks: dict[str, torch.Tensor]
    num_clients: int
    timings: dict[str, float] = field(default_factory=dict)
    pruned_counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Global and per-layer fraction of pruned prunable weights."""
        counts = self.pruned_counts or {
            n: (int(torch.count_nonzero(m)), m.numel()) for n, m in self.final_masks.items()
        }
        per_layer = {n: pruned / total for n, (pruned, total) in counts.items()}
        pruned = sum(p for p, _ in counts.values())
        total = sum(t for _, t in counts.values())
        return pruned / total, per_layer


class ClientPruner:
    """One party's side of FedPrLLM: its calibration activations and local Wanda masks.

    The model is shared and only read here: masks used for propagation are
    applied for the duration of one forward pass, so several simulated
    clients (or a network client) can use the same model object.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        config: PruneConfig,
        *,
        stat_windows: int | None = None,
    ) -> None:
        """``stat_windows``: count the statistics over this many windows, the missing
        ones as zero windows (``InputNormStats.pad_to``, the reference's one-shot divisor).
        """
        self.config = config
        self.stat_windows = stat_windows
        self.blocks = decoder_blocks(model)
        self.path = blocks_path(model)
        self.runner = BlockRunner(model, config.batch_size)
        self.hidden = self.runner.embed(windows)

    def local_masks(self, index: int) -> dict[str, torch.Tensor]:
        """Wanda masks of block ``index`` from this party's activations (full layer names)."""
        stats = self.runner.collect_stats(index, self.hidden, self.config.stats)
        if self.stat_windows is not None:
            for layer_stats in stats.values():
                layer_stats.pad_to(self.stat_windows)
        prefix = f"{self.path}.{index}."
        masks = {}
        for name, weight in block_matrices(self.blocks[index]).items():
            scores = wanda_scores(weight, stats[name].sq_norm)
            masks[prefix + name] = local_mask(scores, self.config)
        return masks

    def advance(self, index: int, masks: MaskSet | None = None) -> None:
        """Propagate through block ``index`` (with ``masks`` applied for this pass only)."""
        if index == len(self.blocks) - 1:
            return  # the last block's outputs are never needed
        prefix = f"{self.path}.{index}."
        short = {n[len(prefix) :]: m for n, m in (masks or {}).items()}
        self.hidden = self.runner.forward(index, self.hidden, short)


def local_block_masks(
    model: nn.Module,
    windows: torch.Tensor,
    config: PruneConfig,
    *,
    blocks: BlockSource = RESIDENT,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """A one-shot client's masks, block by block: ``(i, block i's masks)``.

    Wanda through the client's own pruned blocks: each block is loaded, its masks
    computed, the activations propagated through it with them applied, and the block
    released before its masks are yielded. The model's weights are left unchanged.
    """
    pruner = ClientPruner(model, windows, config)
    for i in range(len(pruner.blocks)):
        blocks.load(i)
        block_masks = pruner.local_masks(i)
        pruner.advance(i, block_masks)
        blocks.release(i)
        yield i, block_masks


def local_pruning_masks(
    model: nn.Module,
    windows: torch.Tensor,
    config: PruneConfig,
    *,
    progress: bool = False,
    on_block: Callable[[int], None] | None = None,
    blocks: BlockSource = RESIDENT,
) -> dict[str, torch.Tensor]:
    """All of a one-shot client's masks (see :func:`local_block_masks`).

    ``on_block(done)`` is called after each block; ``blocks`` loads and releases
    each block (a streamed model).
    """
    masks: dict[str, torch.Tensor] = {}
    steps = local_block_masks(model, windows, config, blocks=blocks)
    num_blocks = len(decoder_blocks(model))
    steps = tqdm(steps, total=num_blocks, desc="local pruning", unit="block", disable=not progress)
    for i, block_masks in steps:
        masks.update(block_masks)
        if on_block is not None:
            on_block(i + 1)
    return masks


def apply_vote_counts(
    model: nn.Module,
    counts: MaskSet,
    config: PruneConfig,
    num_clients: int,
    salts: LayerSalts,
) -> dict[str, torch.Tensor]:
    """The server's step for the layers in ``counts``: select, prune, optionally scale.

    ``salts`` is the run's selection state from ``layer_salts`` (each layer's
    index in the layout seeds its random ties; the reference tie-break draws
    from its one fill generator, so ``counts`` must come in layout order).
    Returns the final masks.
    """
    weights = prunable_weights(model)
    final = {}
    for name, layer_counts in counts.items():
        weight = weights[name]
        fill = salts.reference_fill(name, config.seed) if uses_reference_fill(config) else None
        final[name] = select_final_mask(layer_counts, config, weight=weight, salt=salts[name], fill=fill)
        apply_mask(weight, final[name])
        if config.weight_scaling:
            scale_retained(weight, layer_counts, num_clients)
    return final


def layer_salts(model: nn.Module) -> LayerSalts:
    """The selection state of one run over ``model`` (create one per run, select in order)."""
    return LayerSalts([slot.name for slot in layout(model).slots])


def prune(
    model: nn.Module,
    client_windows: Sequence[torch.Tensor],
    config: PruneConfig,
    strategy: Strategy,
    *,
    aggregate: Aggregate = plain_sum,
    progress: bool = True,
    nsamples: int | None = None,
    blocks: BlockSource = RESIDENT,
    keep_masks: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with one strategy; ``client_windows[c]`` is client c's data.

    Centralized pools all windows into one party. With ``stats="reference"``,
    centralized and one-shot parties divide their statistics by ``nsamples``
    (default: all clients' windows together), as the reference's zero-padded
    buffers do; iterative clients divide by their own count, as it does there.

    ``blocks`` loads each decoder block before its step and releases it (for a
    streamed model: writes it out pruned, then frees it) after; ``keep_masks``
    False keeps only per-layer pruned counts in the result.
    """
    if strategy not in ("centralized", "one-shot", "iterative"):
        raise PruningConfigError(
            f"prune() runs centralized, one-shot and iterative, not {strategy!r} "
            "(statistics: fedprune.statistics_run.prune_statistics)"
        )
    if strategy == "centralized":
        client_windows = [torch.cat(list(client_windows))]
    num_clients = len(client_windows)
    stat_windows = None
    if config.stats == "reference" and strategy != "iterative":
        stat_windows = nsamples if nsamples is not None else sum(len(w) for w in client_windows)
    salts = layer_salts(model)
    timings = {"calibration": 0.0, "aggregation": 0.0, "selection": 0.0}
    start = time.perf_counter()
    clients = [ClientPruner(model, windows, config, stat_windows=stat_windows) for windows in client_windows]
    final_masks: dict[str, torch.Tensor] = {}
    num_blocks = len(decoder_blocks(model))
    pruned_counts: dict[str, tuple[int, int]] = {}
    for i in tqdm(range(num_blocks), desc=f"{strategy} pruning", unit="block", disable=not progress):
        t0 = time.perf_counter()
        blocks.load(i)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - t0
        if strategy == "centralized":
            t0 = time.perf_counter()
            block_final = clients[0].local_masks(i)
            timings["calibration"] += time.perf_counter() - t0
            weights = prunable_weights(model)
            for name, mask in block_final.items():
                apply_mask(weights[name], mask)
        else:
            counts = _block_votes(clients, i, strategy, aggregate, timings)
            t0 = time.perf_counter()
            block_final = apply_vote_counts(model, counts, config, num_clients, salts)
            timings["selection"] += time.perf_counter() - t0
            del counts
        pruned_counts.update({n: (int(torch.count_nonzero(m)), m.numel()) for n, m in block_final.items()})
        if keep_masks:
            final_masks.update({n: m.cpu() for n, m in block_final.items()})
        del block_final
        if strategy != "one-shot":
            t0 = time.perf_counter()
            for client in clients:
                client.advance(i)
            timings["calibration"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        blocks.release(i)
        timings["release"] = timings.get("release", 0.0) + time.perf_counter() - t0
    timings["prune_total"] = time.perf_counter() - start
    return PruneResult(final_masks, num_clients, timings, pruned_counts)


def _block_votes(
    clients: Sequence[ClientPruner], index: int, strategy: str, aggregate: Aggregate, timings: dict
) -> dict[str, torch.Tensor]:
    """The vote counts of block ``index``; one-shot clients advance through their own masks.

    The in-process sum adds each client's masks as they come, so that one client's
    masks are held at a time (not m of them); any other ``aggregate`` (the secure
    sum) gets all clients' masks at once.
    """
    streaming = aggregate is plain_sum
    counts: dict[str, torch.Tensor] = {}
    local = []
    for client in clients:
        t0 = time.perf_counter()
        masks = client.local_masks(index)
        if strategy == "one-shot":
            client.advance(index, masks)
        t1 = time.perf_counter()
        timings["calibration"] += t1 - t0
        if streaming:
            add_votes(counts, masks)
            timings["aggregation"] += time.perf_counter() - t1
        else:
            local.append(masks)
        del masks
    if not streaming:
        t0 = time.perf_counter()
        counts = aggregate(local)
        timings["aggregation"] += time.perf_counter() - t0
    return counts
