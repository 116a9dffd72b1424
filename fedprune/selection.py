"""The one server-side selector: from vote counts to the final mask (FedPrLLM steps 3-4).

The server knows only ``vote_counts`` (0..m clients voted to prune each weight).
Within each comparison group it prunes exactly ``k`` weights, those with the
most votes. Equal counts are ordered by the tie-break:

- ``random``: a seeded pseudo-random key for each weight tied at the group's
  threshold (and only those), a counter-based hash of (seed, layer index, flat
  index) in integer arithmetic (``tie_keys``), so any party selects any layer on
  its own and gets the same mask on CPU and GPU;
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


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix64(z: int) -> int:
    """splitmix64's finalizer on a Python int (mod 2^64): the reference for ``tie_keys``."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


_CHUNK = 1 << 16  # keys are computed in cache-sized pieces: ~7x faster than whole-tensor ops


def tie_keys(seed: int, salt: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Pseudo-random tie keys in [0, 2^32) for the weights at ``flat_index`` of layer ``salt``.

    Key ``i`` is the high 32 bits of splitmix64 at counter ``base + (i + 1) * golden``,
    ``base`` derived from (seed, salt): a counter-based generator, so a key depends
    on nothing but (seed, salt, i), not on which other weights are keyed. Computed
    with int64 wrap-around arithmetic, which is the same on every device (CPU, CUDA).
    """
    base = _signed(_splitmix64(_splitmix64(seed) ^ (salt & _MASK64)))
    flat_index = flat_index.to(torch.int64)
    out = torch.empty_like(flat_index)
    tmp = torch.empty(min(_CHUNK, len(flat_index)), dtype=torch.int64, device=flat_index.device)
    for start in range(0, len(flat_index), _CHUNK):
        z = out[start : start + _CHUNK]
        t = tmp[: len(z)]
        torch.add(flat_index[start : start + _CHUNK], 1, out=z)
        z.mul_(_signed(_GOLDEN)).add_(base)
        for shift, mix in ((30, _MIX1), (27, _MIX2)):
            _xor_shifted(z, t, shift)
            z.mul_(_signed(mix))
        _xor_shifted(z, t, 31)
        torch.bitwise_right_shift(z, 32, out=t)  # the high half, as a non-negative int64
        z.copy_(t.bitwise_and_(0xFFFFFFFF))
    return out


def _xor_shifted(z: torch.Tensor, tmp: torch.Tensor, bits: int) -> None:
    """``z ^= z >>> bits`` in place (logical shift: torch's ``>>`` on int64 copies the sign)."""
    torch.bitwise_right_shift(z, bits, out=tmp)
    z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - bits)) - 1))


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

    Per group, every weight above the threshold count (the k-th highest) is
    pruned; the remaining slots go to the weights tied at the threshold in
    tie-break order. Only those tied weights are ever keyed or sorted.
    """
    shape = tuple(vote_counts.shape)
    counts = vote_counts.to(torch.int32)
    grouped, k = _groups(counts, config)
    if uses_reference_fill(config):
        if fill is None:
            raise PruningConfigError(
                "the reference tie-break in the layer group needs the run's fill generator"
            )
        return _ungroup(_reference_fill(grouped[0], k, fill).unsqueeze(0), shape, config)
    if config.tie_break == "magnitude" and weight is None:
        raise PruningConfigError("the magnitude tie-break needs the layer's weights")
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool, device=counts.device)
    if grouped.shape[0] == 1:
        return _select_layer(grouped[0], k, config, weight, salt).reshape(shape)
    return _ungroup(_select_groups(grouped, k, shape, config, weight, salt), shape, config)


def _select_layer(
    counts: torch.Tensor, k: int, config: PruneConfig, weight: torch.Tensor | None, salt: int
) -> torch.Tensor:
    """One group (the whole layer, flat): the fast path, linear time."""
    threshold, above = _threshold_and_above(counts, k)
    mask = counts > threshold
    room = k - above  # slots left for the weights tied at the threshold
    tied = counts == threshold
    if config.tie_break in ("index", "reference"):
        return mask | (tied & (tied.cumsum(0) <= room))
    index = tied.nonzero().squeeze(1)  # flat index == position in the group
    mask[index[_smallest(_tie_key(config, index, weight, salt), room)]] = True
    return mask


def _select_groups(
    grouped: torch.Tensor,
    k: int,
    shape: tuple[int, ...],
    config: PruneConfig,
    weight: torch.Tensor | None,
    salt: int,
) -> torch.Tensor:
    """Many groups (rows, columns, N:M blocks) as a (groups, members) view."""
    threshold = -torch.kthvalue(-grouped, k, dim=1, keepdim=True).values
    mask = grouped > threshold
    room = k - mask.sum(dim=1, keepdim=True)
    tied = grouped == threshold
    if config.tie_break in ("index", "reference"):
        # Lowest index first: the first ``room`` tied weights of every group.
        return mask | (tied & (tied.cumsum(dim=1) <= room))
    group, member = tied.nonzero(as_tuple=True)  # row-major: index order within each group
    key = _tie_key(config, _flat_index(group, member, shape, config), weight, salt)
    if config.tie_break == "magnitude":  # ranks, so that the key fits below 2^32
        key = torch.sort(torch.sort(key, stable=True).indices, stable=True).indices
    # Order by (group, key, index): one stable sort of a composite key (tie keys < 2^32).
    order = torch.sort(group * (1 << 32) + key, stable=True).indices
    group, member = group[order], member[order]
    starts = torch.searchsorted(group, torch.arange(grouped.shape[0], device=group.device))
    rank = torch.arange(len(group), device=group.device) - starts[group]
    take = rank < room.squeeze(1)[group]
    mask[group[take], member[take]] = True
    return mask


def _tie_key(
    config: PruneConfig, flat_index: torch.Tensor, weight: torch.Tensor | None, salt: int
) -> torch.Tensor:
    """The secondary key of the tied weights at ``flat_index`` (smaller is pruned first)."""
    if config.tie_break == "magnitude":
        assert weight is not None
        picked = weight.detach().reshape(-1)[flat_index.to(weight.device)]
        return picked.abs().float().to(flat_index.device)
    return tie_keys(config.seed, salt, flat_index)


def uses_reference_fill(config: PruneConfig) -> bool:
    """Whether selection draws from the run's fill generator (reference tie-break, layer group)."""
    return config.tie_break == "reference" and config.nm is None and config.comparison_group == "layer"


def _flat_index(
    group: torch.Tensor, member: torch.Tensor, shape: tuple[int, ...], config: PruneConfig
) -> torch.Tensor:
    """Row-major index in the (rows, cols) layer of grouped positions (group, member)."""
    if config.nm is None and config.comparison_group == "column":
        return member.to(torch.int64) * shape[1] + group
    members = shape[1] if config.nm is None and config.comparison_group == "row" else None
    if members is None:
        members = config.nm[1] if config.nm is not None else shape[0] * shape[1]
    return group.to(torch.int64) * members + member


def _smallest(key: torch.Tensor, room: int) -> torch.Tensor:
    """Which ``room`` entries of ``key`` come first by (key, index), found without a full sort.

    Integer keys (< 2^32) go through a histogram of their top 16 bits: every
    bucket below the one where the count reaches ``room`` is taken, and only that
    bucket is sorted. Float keys (magnitudes) use ``kthvalue``.
    """
    if room >= len(key):
        return torch.ones_like(key, dtype=torch.bool)
    if room <= 0:
        return torch.zeros_like(key, dtype=torch.bool)
    if key.dtype == torch.int64:
        bucket = key >> 16
        before = torch.bincount(bucket, minlength=1 << 16).cumsum(0)  # entries in buckets <= b
        edge = int(torch.searchsorted(before, room))  # first bucket where the count reaches room
        take = bucket < edge
        left = room - (int(before[edge - 1]) if edge else 0)
        inside = (bucket == edge).nonzero().squeeze(1)
        take[inside[torch.sort(key[inside], stable=True).indices[:left]]] = True
        return take
    kth = torch.kthvalue(key, room).values
    below = key < kth
    at = key == kth
    return below | (at & (at.cumsum(0) <= room - below.sum()))


def _threshold_and_above(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The ``rank``-th highest count (1-based) and how many counts exceed it, from a histogram."""
    hist = torch.bincount(counts, minlength=int(counts.max()) + 2)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[v] = #(count >= v)
    threshold = int((at_least >= rank).nonzero().max())
    return threshold, int(at_least[threshold + 1])


def _threshold(counts: torch.Tensor, rank: int) -> int:
    """The ``rank``-th highest count (1-based)."""
    return _threshold_and_above(counts, rank)[0]


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
