"""The one server-side selector: from vote counts to the final mask (FedPrLLM steps 3-4).

The server knows only ``vote_counts`` (0..m clients voted to prune each weight).
Within each comparison group it prunes exactly ``k`` weights, those with the
most votes; equal counts are ordered by a seeded random key (``random``, the
reference's behaviour) or by weight magnitude (``magnitude``: smaller |W| is
pruned first). Remaining ties fall back to index order, so the result is
deterministic for a given seed.
"""

from __future__ import annotations

import torch

from .config import PruneConfig
from .errors import PruningConfigError


def _groups(t: torch.Tensor, config: PruneConfig) -> tuple[torch.Tensor, int]:
    """View a (rows, cols) tensor as (groups, members) and return the per-group prune count."""
    rows, cols = t.shape
    if config.nm is not None:
        n, m = config.nm
        if cols % m:
            raise PruningConfigError(f"N:M {n}:{m} needs input width divisible by {m}, got {cols}")
        return t.reshape(-1, m), n
    if config.comparison_group == "layer":
        return t.reshape(1, -1), int(t.numel() * config.sparsity)
    if config.comparison_group == "row":
        return t, int(cols * config.sparsity)
    return t.t(), int(rows * config.sparsity)


def _ungroup(g: torch.Tensor, shape: tuple[int, int], config: PruneConfig) -> torch.Tensor:
    if config.nm is None and config.comparison_group == "column":
        return g.t().contiguous()
    return g.reshape(shape)


def tie_generator(config: PruneConfig, salt: int, device: torch.device) -> torch.Generator:
    """A generator for one layer's random tie keys, seeded by (seed, salt) alone."""
    gen = torch.Generator(device=device)
    gen.manual_seed((config.seed * 1_000_003 + salt) % (2**63))
    return gen


def select_final_mask(
    vote_counts: torch.Tensor,
    config: PruneConfig,
    *,
    weight: torch.Tensor | None = None,
    salt: int = 0,
) -> torch.Tensor:
    """Boolean final mask (True = prune): the k most-voted weights of every group.

    ``salt`` distinguishes layers (use the layer's index in the layout) so that
    every party that selects from the same counts gets the same mask.
    """
    shape = tuple(vote_counts.shape)
    counts = vote_counts.to(torch.int32)
    if config.tie_break == "magnitude":
        if weight is None:
            raise PruningConfigError("the magnitude tie-break needs the layer's weights")
        tie_key = weight.detach().abs().float().to(counts.device)
    else:
        gen = tie_generator(config, salt, torch.device("cpu"))
        tie_key = torch.rand(shape, generator=gen, dtype=torch.float64).to(counts.device)
    grouped_counts, k = _groups(counts, config)
    grouped_keys, _ = _groups(tie_key, config)
    if grouped_counts.shape[0] == 1:
        grouped_mask = _select_one_group(grouped_counts[0], grouped_keys[0], k).unsqueeze(0)
    else:
        # Lexicographic order: most votes first, then the smallest tie key (two stable sorts).
        by_key = torch.sort(grouped_keys, dim=1, stable=True).indices
        by_votes = torch.sort(-grouped_counts.gather(1, by_key), dim=1, stable=True).indices
        order = by_key.gather(1, by_votes)
        grouped_mask = torch.zeros(grouped_counts.shape, dtype=torch.bool, device=counts.device)
        grouped_mask.scatter_(1, order[:, :k], True)
    return _ungroup(grouped_mask, shape, config)


def _select_one_group(counts: torch.Tensor, tie_key: torch.Tensor, k: int) -> torch.Tensor:
    """The same order as the two stable sorts, without sorting the whole group.

    Everything above the threshold count is pruned; only the weights tied at the
    threshold are sorted by tie key (stable, so equal keys go by index).
    """
    mask = torch.zeros_like(counts, dtype=torch.bool)
    if k == 0:
        return mask
    hist = torch.bincount(counts, minlength=int(counts.max()) + 1)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[v] = #(count >= v)
    threshold = int((at_least >= k).nonzero().max())
    mask = counts > threshold
    remaining = k - int(mask.sum())
    tied = (counts == threshold).nonzero().squeeze(1)
    chosen = tied[torch.sort(tie_key[tied], stable=True).indices[:remaining]]
    mask[chosen] = True
    return mask


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place."""
    weight.masked_fill_(mask.to(weight.device), 0)


def scale_retained(weight: torch.Tensor, vote_counts: torch.Tensor, num_clients: int) -> None:
    """Optional weight scaling: multiply every weight by (m - M) / m in place (FedPrLLM step 4)."""
    factor = (num_clients - vote_counts.float()) / num_clients
    weight.mul_(factor.to(device=weight.device, dtype=weight.dtype))
