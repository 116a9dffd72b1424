"""The one Wanda scorer (Sun et al. 2023) and the local per-row mask.

Importance ``S_ij = |W_ij| * ||X_j||_2``; within each output row the lowest
``int(cols * sparsity)`` scores are pruned (stable sort, as the reference), or
with N:M sparsity the n lowest of every m consecutive inputs.
"""

from __future__ import annotations

import torch

from .config import PruneConfig, StatsMode
from .errors import PruningConfigError, VoteCountError


class InputNormStats:
    """Running mean over calibration sequences of the squared input norm per input channel.

    Matches the reference's ``scaler_row`` (``WrappedGPT.add_batch``): after N
    sequences it holds ``sum_tokens x_j^2 / N`` in float32. Two accumulations:

    - ``batched`` (default): one update per batch, ``x.pow(2).sum`` over all its
      tokens; equal to the reference up to float rounding, whatever the batch sizes.
    - ``reference``: one update per window, in window order, with the reference's
      own operations (``scaler *= n/(n+1)``, then ``+= norm(x, p=2)**2 / (n+1)``),
      so the result is the reference's bit for bit given the same inputs.
    """

    def __init__(self, columns: int, device: torch.device, mode: StatsMode = "batched") -> None:
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.mode = mode

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        """Add a batch of layer inputs shaped (batch, tokens, columns) or (tokens, columns).

        ``sequences`` overrides how many calibration sequences the rows came from
        (an MoE expert's inputs are the routed subset of a batch's tokens; they are
        always accumulated batched).
        """
        if sequences is None:
            if inputs.dim() == 2:
                inputs = inputs.unsqueeze(0)
            if self.mode == "reference":
                for window in inputs:
                    self._add_window(window)
                return
        batch = sequences if sequences is not None else inputs.shape[0]
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sq_norm *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.sq_norm += flat.pow(2).sum(dim=0) / self.nsamples

    def _add_window(self, window: torch.Tensor) -> None:
        channels_first = window.reshape(-1, window.shape[-1]).t().float()
        self.sq_norm *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.sq_norm += torch.norm(channels_first, p=2, dim=1) ** 2 / self.nsamples

    def pad_to(self, total: int) -> None:
        """Count all-zero windows until ``total`` windows are counted.

        The reference's one-shot and local clients keep every client's
        activations in a buffer of ``nsamples`` windows, its own first and zeros
        after, and run all of them: the zeros add nothing (a LLaMA block without
        biases maps zeros to zeros) but count in the mean. The update per zero
        window is the reference's (its ``+= 0`` is exact and left out).
        """
        while self.nsamples < total:
            self.sq_norm *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(mean squared input norm), broadcast over output rows (float32)."""
    return weight.abs().float() * sq_norm.sqrt().reshape(1, -1)


def local_mask(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Boolean mask (True = prune) with exactly the per-row (or per-N:M-group) count."""
    rows, cols = scores.shape
    if config.nm is not None:
        n, m = config.nm
        if cols % m:
            raise PruningConfigError(f"N:M {n}:{m} needs input width divisible by {m}, got {cols}")
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        mask = torch.zeros_like(scores, dtype=torch.bool)
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
    room = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)
    return below.logical_or_(tied.logical_and_(tied.cumsum(dim=1, dtype=torch.int32) <= room))


def check_vote_counts(counts: torch.Tensor, config: PruneConfig, contributors: int, name: str = "") -> None:
    """Raise :class:`VoteCountError` unless ``counts`` could be a sum of honest local masks.

    Every honest mask from :func:`local_mask` prunes exactly ``int(cols * sparsity)`` weights
    of each row (N:M: exactly n of each group of m), so over ``contributors`` masks each
    count lies in [0, contributors] and each row (group) sums to exactly contributors times
    that number. Secure aggregation hides each input, so this is the only place where a
    client that votes more than once, votes negatively or skips votes can be caught.
    """
    where = f" in {name}" if name else ""
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > contributors):
        raise VoteCountError(
            f"vote counts{where} range over [{int(counts.min())}, {int(counts.max())}], "
            f"outside [0, {contributors}] for {contributors} contributors"
        )
    rows, cols = counts.shape
    if config.nm is not None:
        n, m = config.nm
        totals, per = counts.reshape(rows, cols // m, m).sum(dim=-1, dtype=torch.int64), n
        unit = f"group of {m}"
    else:
        totals, per = counts.sum(dim=1, dtype=torch.int64), int(cols * config.sparsity)
        unit = "row"
    bad = totals != contributors * per
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise VoteCountError(
            f"a {unit}{where} holds {int(totals.flatten()[first])} votes; {contributors} honest "
            f"masks give exactly {contributors * per}"
        )
