"""The one Wanda scorer (Sun et al. 2023) and the local per-row mask.

Importance ``S_ij = |W_ij| * ||X_j||_2``; within each output row the lowest
``int(cols * sparsity)`` scores are pruned (stable sort, as the reference), or
with N:M sparsity the n lowest of every m consecutive inputs.
"""

from __future__ import annotations

import torch

from .config import PruneConfig
from .errors import PruningConfigError


class InputNormStats:
    """Running mean over calibration sequences of the squared input norm per input channel.

    Matches the reference's ``scaler_row``: after N sequences it holds
    ``sum_tokens x_j^2 / N`` in float32, whatever the batch sizes were.
    """

    def __init__(self, columns: int, device: torch.device) -> None:
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        """Add a batch of layer inputs shaped (batch, tokens, columns) or (tokens, columns).

        ``sequences`` overrides how many calibration sequences the rows came from
        (an MoE expert's inputs are the routed subset of a batch's tokens).
        """
        batch = sequences if sequences is not None else inputs.shape[0] if inputs.dim() == 3 else 1
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sq_norm *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.sq_norm += flat.pow(2).sum(dim=0) / self.nsamples


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(mean squared input norm), broadcast over output rows (float32)."""
    return weight.abs().float() * sq_norm.sqrt().reshape(1, -1)


def local_mask(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Boolean mask (True = prune) with exactly the per-row (or per-N:M-group) count."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if config.nm is not None:
        n, m = config.nm
        if cols % m:
            raise PruningConfigError(f"N:M {n}:{m} needs input width divisible by {m}, got {cols}")
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    return smallest_per_row(scores, int(cols * config.sparsity))


def smallest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest scores of every row, ties going to the lower column index.

    The same set as the first k of a stable sort (the reference), found with a
    selection (kthvalue) instead of a full sort: about twice as fast.
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    room = k - below.sum(dim=1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=1) <= room))
