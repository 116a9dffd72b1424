"""The one server-side selector: from vote counts to the final mask (FedPrLLM steps 3-4).

The server knows only ``vote_counts`` (0..m clients voted to prune each weight).
Within each comparison group it prunes exactly ``k`` weights, those with the
most votes. Equal counts are ordered by the tie-break:

- ``random``: a seeded random key per weight, drawn from a generator seeded by
  (seed, layer index) alone, so any party can select any layer on its own;
- ``magnitude``: smaller |W| is pruned first;
- ``index``: the lowest index first (row-major within the group), which is
  what the reference's stable sort does for row and column groups;
- ``reference``: the reference code (Pengxin-Guo/FedPrLLM) tie for tie:
  ``index`` for row and column groups (and N:M groups); for the layer group,
  its threshold-and-fill: everything above the count at sorted position ``k``
  is pruned and the remaining slots are filled with ``torch.randperm`` over the
  weights tied at that count, drawn from ONE generator seeded once with the
  seed (the reference's ``torch.manual_seed``), layer after layer in layout
  order. That generator lives in the run's ``LayerSalts``, so the layers of a
  run must be selected in order, each once.

Remaining ties of ``random``/``magnitude`` fall back to index order, so every
result is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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


class LayerSalts(Mapping[str, int]):
    """The selection state of one run: each layer's salt (its index in the layout) and,
    for the ``reference`` tie-break, the one fill generator shared by all layers.

    The reference seeds torch's global generator once and draws one ``randperm``
    per layer, in order; ``reference_fill`` hands out that generator and checks
    that layers come in layout order, each once (any other order would silently
    shift every later layer's draw).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._index = {name: i for i, name in enumerate(names)}
        self._fill: torch.Generator | None = None
        self._fill_seed = 0
        self._next = 0

    def __getitem__(self, name: str) -> int:
        return self._index[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def reference_fill(self, name: str, seed: int) -> torch.Generator:
        """The run's fill generator, positioned for layer ``name`` (the next one in order)."""
        if self._fill is None:
            self._fill = torch.Generator(device="cpu")
            self._fill.manual_seed(seed)
            self._fill_seed = seed
        if seed != self._fill_seed or self._index[name] != self._next:
            raise PruningConfigError(
                f"the reference tie-break selects layers in layout order with one seed; "
                f"got {name!r} (index {self._index[name]}) where index {self._next} was next"
            )
        self._next += 1
        return self._fill


def select_final_mask(
    vote_counts: torch.Tensor,
    config: PruneConfig,
    *,
    weight: torch.Tensor | None = None,
    salt: int = 0,
    fill: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean final mask (True = prune): the k most-voted weights of every group.

    ``salt`` distinguishes layers (use the layer's index in the layout) so that
    every party that selects from the same counts gets the same mask. ``fill``
    is the run's reference fill generator (``LayerSalts.reference_fill``),
    needed only by the ``reference`` tie-break in the layer group.
    """
    shape = tuple(vote_counts.shape)
    counts = vote_counts.to(torch.int32)
    grouped_counts, k = _groups(counts, config)
    if uses_reference_fill(config):
        if fill is None:
            raise PruningConfigError(
                "the reference tie-break in the layer group needs the run's fill generator"
            )
        return _ungroup(_reference_fill(grouped_counts[0], k, fill).unsqueeze(0), shape, config)
    tie_key = _tie_key(counts, config, weight, salt)
    grouped_keys = None if tie_key is None else _groups(tie_key, config)[0]
    if grouped_counts.shape[0] == 1:
        keys = None if grouped_keys is None else grouped_keys[0]
        grouped_mask = _select_one_group(grouped_counts[0], keys, k).unsqueeze(0)
    else:
        # Lexicographic order: most votes first, then the smallest tie key, then the
        # lowest index (stable sorts; without a key, one stable sort is index order).
        if grouped_keys is None:
            order = torch.sort(-grouped_counts, dim=1, stable=True).indices
        else:
            by_key = torch.sort(grouped_keys, dim=1, stable=True).indices
            by_votes = torch.sort(-grouped_counts.gather(1, by_key), dim=1, stable=True).indices
            order = by_key.gather(1, by_votes)
        grouped_mask = torch.zeros(grouped_counts.shape, dtype=torch.bool, device=counts.device)
        grouped_mask.scatter_(1, order[:, :k], True)
    return _ungroup(grouped_mask, shape, config)


def uses_reference_fill(config: PruneConfig) -> bool:
    """Whether selection draws from the run's fill generator (reference tie-break, layer group)."""
    return config.tie_break == "reference" and config.nm is None and config.comparison_group == "layer"


def _tie_key(
    counts: torch.Tensor, config: PruneConfig, weight: torch.Tensor | None, salt: int
) -> torch.Tensor | None:
    """Per-weight secondary key (smaller is pruned first); None means index order."""
    if config.tie_break == "magnitude":
        if weight is None:
            raise PruningConfigError("the magnitude tie-break needs the layer's weights")
        return weight.detach().abs().float().to(counts.device)
    if config.tie_break == "random":
        gen = tie_generator(config, salt, torch.device("cpu"))
        return torch.rand(counts.shape, generator=gen, dtype=torch.float64).to(counts.device)
    return None


def _threshold(counts: torch.Tensor, rank: int) -> int:
    """The ``rank``-th highest count (1-based), from a histogram instead of a sort."""
    hist = torch.bincount(counts, minlength=int(counts.max()) + 1)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[v] = #(count >= v)
    return int((at_least >= rank).nonzero().max())


def _select_one_group(counts: torch.Tensor, tie_key: torch.Tensor | None, k: int) -> torch.Tensor:
    """The same order as the stable sorts, without sorting the whole group.

    Everything above the threshold count is pruned; only the weights tied at the
    threshold are ordered, by tie key (stable, so equal keys go by index) or by index.
    """
    mask = torch.zeros_like(counts, dtype=torch.bool)
    if k == 0:
        return mask
    threshold = _threshold(counts, k)
    mask = counts > threshold
    remaining = k - int(mask.sum())
    tied = (counts == threshold).nonzero().squeeze(1)
    if tie_key is not None:
        tied = tied[torch.sort(tie_key[tied], stable=True).indices]
    mask[tied[:remaining]] = True
    return mask


def _reference_fill(counts: torch.Tensor, k: int, fill: torch.Generator) -> torch.Tensor:
    """The reference's layer selection (``prune_fedprllm_layer``), step for step.

    Its threshold is the count at position ``k`` of the descending order (the
    (k+1)-th highest, not the k-th): weights above it are pruned, and the rest
    of the k slots go to a ``randperm`` over the weights at that count, in
    row-major order. The permutation is drawn even when no slot is left, as
    the reference does, so that every later layer sees the same generator state.
    """
    threshold = _threshold(counts, k + 1)
    mask = counts > threshold
    remaining = k - int(mask.sum())
    tied = (counts == threshold).nonzero().squeeze(1)
    perm = torch.randperm(len(tied), generator=fill).to(tied.device)
    mask[tied[perm[:remaining]]] = True
    return mask


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place."""
    weight.masked_fill_(mask.to(weight.device), 0)


def scale_retained(weight: torch.Tensor, vote_counts: torch.Tensor, num_clients: int) -> None:
    """Optional weight scaling: multiply every weight by (m - M) / m in place (FedPrLLM step 4)."""
    factor = (num_clients - vote_counts.float()) / num_clients
    weight.mul_(factor.to(device=weight.device, dtype=weight.dtype))
