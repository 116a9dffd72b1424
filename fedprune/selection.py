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


# On the CPU keys are computed in pieces of 2^15: cache-sized (~7x faster than whole-tensor
# ops) and at most torch's intra-op grain size, so that each op runs on one thread. Split
# across threads, each of the ~600 small ops of a large layer waits at a barrier for the
# slowest thread, which on a loaded machine (threads descheduled) made keying 10-100x slower.
_CHUNK = 1 << 15


def tie_keys(seed: int, salt: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Pseudo-random tie keys in [0, 2^32) for the weights at ``flat_index`` of layer ``salt``.

    Key ``i`` is the high 32 bits of splitmix64 at counter ``base + (i + 1) * golden``,
    ``base`` derived from (seed, salt): a counter-based generator, so a key depends
    on nothing but (seed, salt, i), not on which other weights are keyed. Computed
    with int64 wrap-around arithmetic, which is the same on every device (CPU, CUDA).
    """
    return _hash_bits(seed, salt, flat_index, 32, torch.int64)


_BUCKET_BITS = 16  # the radix select's buckets: the keys' top 16 bits


def _tie_buckets(seed: int, salt: int, flat_index: torch.Tensor) -> torch.Tensor:
    """``tie_keys(...) >> 16`` as int32: the radix bucket of each key, without the key."""
    return _hash_bits(seed, salt, flat_index, 32 + _BUCKET_BITS, torch.int32)


def _hash_bits(seed: int, salt: int, flat_index: torch.Tensor, drop: int, dtype: torch.dtype) -> torch.Tensor:
    """The top ``64 - drop`` bits of the tie hash of every index, as ``dtype``."""
    base = _signed(_splitmix64(_splitmix64(seed) ^ (salt & _MASK64)))
    flat_index = flat_index.to(torch.int64)
    out = torch.empty(flat_index.shape, dtype=dtype, device=flat_index.device)
    chunk = _CHUNK if flat_index.device.type == "cpu" else max(1, len(flat_index))
    size = min(chunk, len(flat_index))
    z_buf, t_buf = (torch.empty(size, dtype=torch.int64, device=flat_index.device) for _ in range(2))
    for start in range(0, len(flat_index), chunk):
        index = flat_index[start : start + chunk]
        z, t = z_buf[: len(index)], t_buf[: len(index)]
        torch.mul(index, _signed(_GOLDEN), out=z).add_(_signed(base + _GOLDEN))  # counter (i+1)*golden
        for shift, mix in ((30, _MIX1), (27, _MIX2)):
            _xor_shifted(z, t, shift)
            z.mul_(_signed(mix))
        if drop < 33:  # the last step, z ^= z >>> 31, changes none of the top 33 bits
            _xor_shifted(z, t, 31)
        torch.bitwise_right_shift(z, drop, out=t)  # the top bits, as a non-negative int64
        out[start : start + chunk] = t.bitwise_and_((1 << (64 - drop)) - 1)
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

    Per group, every weight above the threshold count (the k-th highest, from a
    histogram of the counts, or for the layer a sample's, proven by the counts)
    is pruned; the remaining slots go to the weights
    tied at the threshold in tie-break order. Only those tied weights are ever
    keyed, and the ones to take are found by a radix select on their keys, not
    a sort. Everything works on the layer in its own (row-major) layout, in
    integer arithmetic: linear time, the same result on every device.
    """
    shape = tuple(vote_counts.shape)
    counts = vote_counts if vote_counts.dtype in (torch.int16, torch.int32) else vote_counts.to(torch.int32)
    if uses_reference_fill(config):
        if fill is None:
            raise PruningConfigError(
                "the reference tie-break in the layer group needs the run's fill generator"
            )
        k = int(counts.numel() * config.sparsity)
        return _reference_fill(counts.reshape(-1), k, fill).reshape(shape)
    if config.tie_break == "magnitude" and weight is None:
        raise PruningConfigError("the magnitude tie-break needs the layer's weights")
    view, dim, k = _member_view(counts, config)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool, device=counts.device)
    if dim is None:
        room, mask, index = _split_layer(view, k)  # index: the tied weights, row-major
        if config.tie_break in ("index", "reference"):  # lowest index first
            mask[index[:room]] = True
            return mask.reshape(shape)
        if config.tie_break == "random":
            take = _first_by_bucket(index, room, config.seed, salt)
        else:
            take = _first_in_groups(_tie_key(config, index, weight, salt), None, torch.tensor([room]))
    else:
        threshold, room = _thresholds(view, dim, k)
        mask, tied = view > threshold, view == threshold
        if config.tie_break in ("index", "reference"):
            mask |= tied & (tied.cumsum(dim=dim, dtype=torch.int32) <= room.reshape(threshold.shape))
            return mask.reshape(shape)
        index = tied.reshape(-1).nonzero().squeeze(1)  # row-major flat index
        del tied
        key = _tie_key(config, index, weight, salt)
        take = _first_in_groups(key, _group_of(index, shape, config), room)
    mask.reshape(-1).scatter_(0, index, take)  # the tied weights (not pruned yet) get ``take``
    return mask.reshape(shape)


def _member_view(counts: torch.Tensor, config: PruneConfig) -> tuple[torch.Tensor, int | None, int]:
    """The layer's counts in its own layout, shaped so that each comparison group lies along
    one dimension (None: the whole flat layer), and the per-group prune count."""
    rows, cols = counts.shape
    if config.nm is not None:
        n, m = config.nm
        if cols % m:
            raise PruningConfigError(f"N:M {n}:{m} needs input width divisible by {m}, got {cols}")
        return counts.reshape(rows, cols // m, m), 2, n
    if config.comparison_group == "layer":
        return counts.reshape(-1), None, int(counts.numel() * config.sparsity)
    if config.comparison_group == "row":
        return counts, 1, int(cols * config.sparsity)
    return counts, 0, int(rows * config.sparsity)


def _group_of(index: torch.Tensor, shape: tuple[int, ...], config: PruneConfig) -> torch.Tensor:
    """The comparison group (N:M group, row or column) of each flat index; the layer
    group is one group (``_split_layer``)."""
    if config.nm is not None:
        return torch.div(index, config.nm[1], rounding_mode="floor")
    if config.comparison_group == "row":
        return torch.div(index, shape[1], rounding_mode="floor")
    return torch.remainder(index, shape[1])


_HIST_CELLS = 1 << 24  # per-group count histograms up to this size; kthvalue beyond
_HIST_CHUNK = 1 << 20  # counts binned this many at a time (bounded temporaries)


_SAMPLE = 1 << 16  # counts sampled to guess the layer's threshold


def _split_layer(counts: torch.Tensor, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The layer group's split of the flat layer ``counts`` at its threshold (its k-th
    highest count): the room (how many of the tied are pruned), the counts above the
    threshold (boolean) and the flat index of those at it.

    The threshold is guessed from a strided sample's histogram and proven by the
    comparisons that are needed anyway: it is right exactly when fewer than k counts
    exceed it and at least k reach it. Otherwise (the k-th count sits at the edge of
    two values) it is read from the full histogram. Either way the exact threshold:
    the guess only saves the full histogram, a layer's slowest pass on the CPU.
    """
    if len(counts) >= 4 * _SAMPLE:
        sample = counts[:: len(counts) // _SAMPLE]
        guess = _threshold(sample, max(1, round(k * len(sample) / len(counts))))
        room, above, index = _split_at(counts, guess, k)
        if 0 <= room <= len(index):
            return room, above, index
        del above, index
    return _split_at(counts, _threshold(counts, k), k)


def _split_at(counts: torch.Tensor, threshold: int, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """k minus the counts above ``threshold``, those counts (boolean), and the flat index of
    the counts at it. One boolean buffer serves both comparisons: each fresh layer-sized
    buffer costs page faults (large blocks are fresh mappings, ``fedprune.memory``)."""
    flags = counts == threshold
    index = flags.nonzero().squeeze(1)
    torch.gt(counts, threshold, out=flags)
    return k - int(torch.count_nonzero(flags)), flags, index


def _thresholds(view: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row, column or N:M group's threshold (its k-th highest count along ``dim``),
    shaped to broadcast against ``view``, and its room: how many of its weights tied
    at the threshold are pruned (the layer group: ``_split_layer``).

    From histograms of the counts (few distinct values: 0..m); a selection
    (``kthvalue``) where the histograms would be too large (many small N:M
    groups, very many clients).
    """
    values = int(view.max()) + 1 if view.numel() else 1
    groups = view.numel() // view.shape[dim]
    if dim == 2 or groups * values > _HIST_CELLS:
        threshold = torch.kthvalue(view, view.shape[dim] - k + 1, dim=dim, keepdim=True).values
        room = k - (view > threshold).sum(dim=dim, dtype=torch.int64).reshape(-1)
        return threshold, room
    hist = _group_histograms(view, dim, values)
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[g, v]: counts >= v in group g
    threshold = (at_least >= k).sum(dim=1) - 1
    at_least = torch.cat([at_least, torch.zeros_like(at_least[:, :1])], dim=1)
    room = k - at_least.gather(1, (threshold + 1).unsqueeze(1)).squeeze(1)
    shape = (-1, 1) if dim == 1 else (1, -1)
    return threshold.to(view.dtype).reshape(shape), room


def _group_histograms(counts: torch.Tensor, dim: int, values: int) -> torch.Tensor:
    """(groups, values) histograms of the counts of every row (``dim`` 1) or column (0)."""
    rows, cols = counts.shape
    step = max(1, _HIST_CHUNK // max(1, cols))
    dev = counts.device
    if dim == 1:
        hist = torch.empty(rows, values, dtype=torch.int64, device=dev)
        for r0 in range(0, rows, step):
            part = counts[r0 : r0 + step]
            offset = torch.arange(len(part), dtype=torch.int32, device=dev).mul_(values).unsqueeze(1)
            cells = (part + offset).reshape(-1)
            hist[r0 : r0 + len(part)] = torch.bincount(cells, minlength=len(part) * values).reshape(
                -1, values
            )
        return hist
    hist = torch.zeros(cols * values, dtype=torch.int64, device=dev)
    offset = torch.arange(cols, dtype=torch.int32, device=dev).mul_(values).unsqueeze(0)
    for r0 in range(0, rows, step):
        hist += torch.bincount((counts[r0 : r0 + step] + offset).reshape(-1), minlength=cols * values)
    return hist.reshape(cols, values)


def _tie_key(
    config: PruneConfig, flat_index: torch.Tensor, weight: torch.Tensor | None, salt: int
) -> torch.Tensor:
    """The secondary key (int64 in [0, 2^32), smaller is pruned first) of the tied
    weights at ``flat_index``: the hash of the index, or the magnitude's float32 bit
    pattern (for floats >= 0, ordered as the values are)."""
    if config.tie_break == "magnitude":
        assert weight is not None
        picked = weight.detach().reshape(-1)[flat_index.to(weight.device)]
        bits = picked.abs().float().view(torch.int32)
        return bits.to(device=flat_index.device, dtype=torch.int64)
    return tie_keys(config.seed, salt, flat_index)


def uses_reference_fill(config: PruneConfig) -> bool:
    """Whether selection draws from the run's fill generator (reference tie-break, layer group)."""
    return config.tie_break == "reference" and config.nm is None and config.comparison_group == "layer"


_MAX_BINS = 1 << 20  # histogram cells of the radix select (8 MiB of int64 counts)


def _first_in_groups(key: torch.Tensor, group: torch.Tensor | None, room: torch.Tensor) -> torch.Tensor:
    """Which entries come first by (group, key, position), ``room[g]`` of each group ``g``.

    ``key`` holds integers in [0, 2^32); ``group`` (None: all in group 0) lists
    each group's entries in index order. A radix select, linear time: one
    histogram of the cells (group, top bits of the key) gives every group's edge
    bucket, where its count reaches its room; entries in lower buckets are
    taken, and only the edge buckets' entries (a few per group) are sorted.
    """
    groups = len(room)
    room = room.to(device=key.device, dtype=torch.int64)
    per_group = max(1, len(key) // groups)
    bits = max(0, min(16, per_group.bit_length(), (_MAX_BINS // groups).bit_length() - 1))
    cell = key >> (32 - bits)
    if group is not None:
        cell.add_(group, alpha=1 << bits)  # group * 2^bits + bucket
    hist = torch.bincount(cell, minlength=groups << bits).reshape(groups, 1 << bits)
    seen = hist.cumsum(dim=1)  # seen[g, b]: entries of group g in buckets <= b
    edge = torch.searchsorted(seen, room.unsqueeze(1))  # (groups, 1): first bucket reaching room
    before = torch.where(edge > 0, seen.gather(1, (edge - 1).clamp_(min=0)), 0).squeeze(1)
    # Per cell: 2 below its group's edge bucket (taken), 1 at it (sorted), 0 above.
    bucket = torch.arange(1 << bits, device=key.device)
    verdict = ((bucket < edge).to(torch.int8) * 2 + (bucket == edge)).reshape(-1)
    of_entry = verdict[cell]
    del cell
    take = of_entry == 2
    at = (of_entry == 1).nonzero().squeeze(1)  # the edge buckets' entries, by position
    del of_entry
    if len(at):
        at_group = torch.zeros_like(at) if group is None else group[at]
        at = at[torch.sort(key[at] + (at_group << 32), stable=True).indices]
        at_group = torch.zeros_like(at) if group is None else group[at]
        first = torch.searchsorted(at_group, torch.arange(groups, device=at.device))
        rank = torch.arange(len(at), device=at.device) - first[at_group]
        take[at[rank < (room - before)[at_group]]] = True
    return take


def _first_by_bucket(index: torch.Tensor, room: int, seed: int, salt: int) -> torch.Tensor:
    """``_first_in_groups`` for one group keyed by ``tie_keys`` (the layer group's random
    tie-break), from the keys' buckets alone: the edge bucket is one number, so each
    entry is judged by comparing its bucket with it, and only the edge bucket's few
    entries are keyed in full and sorted."""
    bucket = _tie_buckets(seed, salt, index)
    seen = torch.bincount(bucket, minlength=1 << _BUCKET_BITS).cumsum(0)
    edge = int(torch.searchsorted(seen, torch.tensor([room], device=seen.device)))
    left = room - (int(seen[edge - 1]) if edge else 0)
    take = bucket < edge
    at = (bucket == edge).nonzero().squeeze(1)
    del bucket
    at = at[torch.sort(tie_keys(seed, salt, index[at]), stable=True).indices]  # ``at`` ascends
    take[at[:left]] = True
    return take


def _threshold(counts: torch.Tensor, rank: int) -> int:
    """The ``rank``-th highest count (1-based), from a histogram."""
    at_least = torch.bincount(counts.reshape(-1)).flip(0).cumsum(0).flip(0)  # at_least[v] = #(count >= v)
    return int((at_least >= rank).sum()) - 1


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


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place (as +0.0, kept weights bit for bit).

    By multiplying the weights' bit patterns with the kept mask: several times
    faster on the CPU than ``masked_fill_``, which is the pruning of a large layer's
    slowest step. The kept mask is ``mask`` itself, flipped for the call and flipped
    back, so ``mask`` must not be read by another thread meanwhile.
    """
    bits = weight.view(_SAME_SIZE_INT[weight.element_size()]) if weight.is_floating_point() else weight
    if mask.device != weight.device or mask.dtype != torch.bool:
        bits.mul_(mask.to(device=weight.device, dtype=torch.bool).logical_not_())
        return
    mask.logical_not_()  # flipped in place and back: no layer-sized temporary (page faults)
    try:
        bits.mul_(mask)
    finally:
        mask.logical_not_()


def scale_retained(weight: torch.Tensor, vote_counts: torch.Tensor, num_clients: int) -> None:
    """Optional weight scaling: multiply every weight by (m - M) / m in place (FedPrLLM step 4)."""
    factor = (num_clients - vote_counts.float()) / num_clients
    weight.mul_(factor.to(device=weight.device, dtype=weight.dtype))
