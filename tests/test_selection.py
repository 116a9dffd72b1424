"""Server-side selection from vote counts: exact k per group, tie rules, determinism."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.config import PruneConfig
from fedprune.errors import PruningConfigError
from fedprune.selection import LayerSalts, apply_mask, scale_retained, select_final_mask, tie_keys


def _counts(rows, cols, clients, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, clients + 1, (rows, cols), generator=gen, dtype=torch.int16)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 24),
    clients=st.integers(1, 20),
    sparsity=st.floats(0.01, 0.99),
    group=st.sampled_from(["layer", "row", "column"]),
    tie_break=st.sampled_from(["random", "magnitude", "index", "reference"]),
    seed=st.integers(0, 1000),
)
def test_prunes_exactly_k_per_group(rows, cols, clients, sparsity, group, tie_break, seed):
    counts = _counts(rows, cols, clients, seed)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    cfg = PruneConfig(sparsity, comparison_group=group, tie_break=tie_break, seed=seed)
    fill = LayerSalts(["w"]).reference_fill("w", seed)
    mask = select_final_mask(counts, cfg, weight=weight, salt=seed, fill=fill)
    if group == "layer":
        assert int(mask.sum()) == int(rows * cols * sparsity)
    elif group == "row":
        assert (mask.sum(dim=1) == int(cols * sparsity)).all()
    else:
        assert (mask.sum(dim=0) == int(rows * sparsity)).all()
    # Most votes first: no kept weight has more votes than a pruned one in its group.
    c = counts.int()
    if group == "layer" and mask.any() and (~mask).any():
        assert c[mask].min() >= c[~mask].max()
    if group == "row":
        for r in range(rows):
            if mask[r].any() and (~mask[r]).any():
                assert c[r][mask[r]].min() >= c[r][~mask[r]].max()


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_magnitude_tie_break_prunes_smaller_weights_among_equal_votes(group):
    counts = _counts(32, 48, 3, 7)
    weight = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    mask = select_final_mask(
        counts, PruneConfig(0.5, comparison_group=group, tie_break="magnitude"), weight=weight
    )
    view = {"layer": lambda t: t.reshape(1, -1), "row": lambda t: t, "column": lambda t: t.t()}[group]
    cg, wg, mg = view(counts.int()), view(weight.abs()), view(mask)
    for g in range(cg.shape[0]):
        for votes in cg[g].unique():
            same = cg[g] == votes
            pruned, kept = wg[g][same & mg[g]], wg[g][same & ~mg[g]]
            if len(pruned) and len(kept):
                assert pruned.max() <= kept.min()


def test_layer_fast_path_matches_full_lexicographic_sort():
    counts = _counts(40, 30, 4, 11)
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    mask = select_final_mask(counts, PruneConfig(0.37, tie_break="magnitude"), weight=weight)
    order = np.lexsort((weight.abs().flatten().numpy(), -counts.flatten().numpy()))
    expected = np.zeros(1200, dtype=bool)
    expected[order[: int(1200 * 0.37)]] = True
    assert np.array_equal(mask.flatten().numpy(), expected)


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_random_ties_are_deterministic_under_a_seed(group):
    counts = torch.ones(64, 64, dtype=torch.int16)  # all tied
    a = select_final_mask(counts, PruneConfig(0.5, comparison_group=group, seed=1), salt=2)
    b = select_final_mask(counts, PruneConfig(0.5, comparison_group=group, seed=1), salt=2)
    c = select_final_mask(counts, PruneConfig(0.5, comparison_group=group, seed=2), salt=2)
    d = select_final_mask(counts, PruneConfig(0.5, comparison_group=group, seed=1), salt=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_nm_selection_prunes_n_of_every_m():
    counts = _counts(16, 32, 5, 2)
    mask = select_final_mask(counts, PruneConfig(0.5, nm=(2, 4)))
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()


def test_magnitude_needs_weights():
    with pytest.raises(PruningConfigError):
        select_final_mask(torch.zeros(2, 2, dtype=torch.int16), PruneConfig(0.5, tie_break="magnitude"))


def test_weight_scaling_formula():
    weight = torch.full((2, 3), 2.0)
    counts = torch.tensor([[0, 1, 2], [3, 4, 0]])
    scale_retained(weight, counts, num_clients=4)
    assert torch.allclose(weight, 2.0 * (4 - counts.float()) / 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.0},
        {"sparsity": 1.0},
        {"sparsity": 0.5, "nm": (2, 8)},
        {"sparsity": 0.5, "comparison_group": "block"},
        {"sparsity": 0.5, "tie_break": "coin"},
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(PruningConfigError):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("tie_break", ["index", "reference"])
@pytest.mark.parametrize("group", ["row", "column"])
def test_index_tie_break_is_the_references_stable_sort(group, tie_break):
    counts = _counts(40, 56, 4, 11)
    mask = select_final_mask(counts, PruneConfig(0.6, comparison_group=group, tie_break=tie_break))
    metric = -counts.float()  # the reference: stable sort of -votes, the first k pruned
    expected = torch.zeros_like(mask)
    if group == "row":
        expected.scatter_(1, torch.sort(metric, dim=-1, stable=True).indices[:, : int(56 * 0.6)], True)
    else:
        expected.scatter_(0, torch.sort(metric, dim=0, stable=True).indices[: int(40 * 0.6), :], True)
    assert torch.equal(mask, expected)


def test_index_tie_break_in_the_layer_group_takes_the_lowest_flat_index():
    counts = _counts(30, 20, 3, 5)
    mask = select_final_mask(counts, PruneConfig(0.45, tie_break="index"))
    order = torch.sort(-counts.flatten().int(), stable=True).indices[: int(600 * 0.45)]
    assert torch.equal(mask.flatten(), torch.zeros(600, dtype=torch.bool).index_fill_(0, order, True))


def test_reference_layer_fill_replays_the_global_randperm_sequence():
    """Layers in order draw from one generator exactly as the reference's torch.randperm."""
    layers = [_counts(24, 32, 5, s) for s in range(4)] + [torch.full((8, 8), 2, dtype=torch.int16)]
    cfg = PruneConfig(0.5, tie_break="reference", seed=3)
    salts = LayerSalts([f"l{i}" for i in range(len(layers))])
    ours = [select_final_mask(c, cfg, fill=salts.reference_fill(f"l{i}", 3)) for i, c in enumerate(layers)]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for counts, mask in zip(layers, ours, strict=True):
            metric = -counts  # prune_fedprllm_layer, step for step
            thresh = torch.sort(metric.flatten())[0][int(metric.numel() * 0.5)]
            expected = metric < thresh
            num_to_select = int(metric.numel() * 0.5) - expected.sum().item()
            indices = (metric == thresh).nonzero(as_tuple=False)
            chosen = indices[torch.randperm(indices.size(0))[:num_to_select]]
            expected[chosen[:, 0], chosen[:, 1]] = True
            assert torch.equal(mask, expected)


def test_reference_fill_refuses_layers_out_of_order():
    salts = LayerSalts(["a", "b"])
    with pytest.raises(PruningConfigError, match="layout order"):
        salts.reference_fill("b", 0)
    with pytest.raises(PruningConfigError, match="fill generator"):
        select_final_mask(_counts(4, 4, 2, 0), PruneConfig(0.5, tie_break="reference"))


def test_unknown_stats_mode_is_a_config_error():
    with pytest.raises(PruningConfigError, match="statistics mode"):
        PruneConfig(0.5, stats="fast")  # type: ignore[arg-type]


def _reference_splitmix_keys(seed: int, salt: int, index: list[int]) -> list[int]:
    """The tie-key definition in plain Python integers (mod 2^64)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    base = mix(mix(seed) ^ salt)
    return [mix(base + (i + 1) * 0x9E3779B97F4A7C15) >> 32 for i in index]


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
def test_tie_keys_are_the_counter_hash_on_every_device(device):
    """Known answers from the plain-integer definition, for small, chunk-crossing and huge indices."""
    index = [0, 1, 2, 65535, 65536, 65537, 2**31 + 5, 2**40 + 3] + list(range(70_000, 200_000, 997))
    got = tie_keys(7, 123, torch.tensor(index, device=device))
    assert got.device.type == device
    assert got.cpu().tolist() == _reference_splitmix_keys(7, 123, index)
    assert torch.equal(got, tie_keys(7, 123, torch.tensor(index, device=device)))
    # A key depends on (seed, salt, index) only, not on which other weights are keyed.
    assert torch.equal(tie_keys(7, 123, torch.tensor(index[5:9], device=device)), got[5:9])


def test_tie_keys_hashed_in_chunks_are_the_same_keys_and_buckets(monkeypatch):
    """On the CPU indices are hashed in cache-sized chunks: the keys, their radix buckets
    (the keys' top 16 bits, computed without the last mixing step) and the masks are
    those of the plain definition."""
    import fedprune.selection as selection

    index = list(range(3, 3000, 7)) + [2**33 + 1]
    expected = _reference_splitmix_keys(11, 4, index)
    counts = _counts(40, 50, 2, 17)
    cfg = PruneConfig(0.5, seed=11)
    whole = select_final_mask(counts, cfg, salt=4)
    monkeypatch.setattr(selection, "_CHUNK", 24)
    assert tie_keys(11, 4, torch.tensor(index)).tolist() == expected
    assert selection._tie_buckets(11, 4, torch.tensor(index)).tolist() == [k >> 16 for k in expected]
    assert torch.equal(select_final_mask(counts, cfg, salt=4), whole)


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_random_tie_break_orders_by_votes_then_hash_key_then_index(group):
    """The mask is the first k of (most votes, smallest hash key of the flat index, lowest index)."""
    rows, cols, seed, salt = 24, 40, 5, 9
    counts = _counts(rows, cols, 3, 13)
    mask = select_final_mask(counts, PruneConfig(0.4, comparison_group=group, seed=seed), salt=salt)
    keys = tie_keys(seed, salt, torch.arange(rows * cols)).reshape(rows, cols).numpy()
    votes = counts.int().numpy()
    view = {"layer": lambda a: a.reshape(1, -1), "row": lambda a: a, "column": lambda a: a.T}[group]
    expected = np.zeros_like(view(votes), dtype=bool)
    k = int(expected.shape[1] * 0.4)
    for g, (v, key) in enumerate(zip(view(votes), view(keys), strict=True)):
        expected[g, np.lexsort((key, -v))[:k]] = True  # lexsort is stable: index breaks key ties
    assert np.array_equal(view(mask.numpy()), expected)


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_without_ties_every_tie_break_is_the_plain_sort(group):
    """Distinct counts leave nothing to key: random and magnitude equal a sort by votes."""
    counts = torch.randperm(30 * 20, generator=torch.Generator().manual_seed(2)).reshape(30, 20)
    weight = torch.randn(30, 20)
    index = select_final_mask(counts, PruneConfig(0.3, comparison_group=group, tie_break="index"))
    for tie_break in ("random", "magnitude"):
        cfg = PruneConfig(0.3, comparison_group=group, tie_break=tie_break, seed=4)
        assert torch.equal(select_final_mask(counts, cfg, weight=weight, salt=1), index)


@pytest.mark.parametrize("tie_break", ["random", "magnitude"])
def test_nm_groups_with_keyed_ties_prune_exactly_n(tie_break):
    counts = _counts(16, 32, 2, 6)
    weight = torch.randn(16, 32)
    mask = select_final_mask(counts, PruneConfig(0.5, nm=(2, 4), tie_break=tie_break), weight=weight, salt=3)
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("tie_break", ["random", "magnitude"])
@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_radix_select_of_massive_ties_is_the_full_lexicographic_sort(group, tie_break):
    """Two clients tie a large share of a layer: many keys per radix bucket, per group."""
    rows, cols, seed, salt = 96, 320, 3, 11
    counts = _counts(rows, cols, 2, 21)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    cfg = PruneConfig(0.5, comparison_group=group, tie_break=tie_break, seed=seed)
    mask = select_final_mask(counts, cfg, weight=weight, salt=salt)
    if tie_break == "random":
        keys = tie_keys(seed, salt, torch.arange(rows * cols)).reshape(rows, cols).numpy()
    else:
        keys = weight.abs().float().numpy()
    view = {"layer": lambda a: a.reshape(1, -1), "row": lambda a: a, "column": lambda a: a.T}[group]
    expected = np.zeros_like(view(counts.numpy()), dtype=bool)
    k = int(expected.shape[1] * 0.5)
    for g, (v, key) in enumerate(zip(view(counts.int().numpy()), view(keys), strict=True)):
        expected[g, np.lexsort((key, -v))[:k]] = True
    assert np.array_equal(view(mask.numpy()), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_apply_mask_zeroes_exactly_the_pruned_weights_and_keeps_the_rest_bit_for_bit(dtype):
    """Pruned weights become +0.0 (whatever they were: -0.0, NaN, inf); kept ones are untouched,
    also through a strided view into a larger parameter (an expert's slot in a fused bank)."""
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(3, 6, 8, generator=gen).to(dtype)
    bank[1, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")], dtype=dtype)
    before = bank.clone()
    weight = bank[1].t()  # a non-contiguous view, as expert slots are
    mask = torch.rand(8, 6, generator=gen) < 0.5
    mask[:2, 0] = torch.tensor([True, False])  # prune the NaN, keep the inf
    apply_mask(weight, mask)
    pruned = weight[mask]
    assert torch.equal(pruned.float(), torch.zeros(len(pruned))) and not torch.signbit(pruned).any()
    assert torch.equal(weight[~mask].view(torch.uint8), before[1].t()[~mask].view(torch.uint8))
    assert torch.equal(bank[[0, 2]].view(torch.uint8), before[[0, 2]].view(torch.uint8))


@pytest.mark.parametrize("tie_break", ["random", "index", "magnitude"])
def test_a_threshold_guessed_from_a_sample_gives_the_mask_of_the_full_histogram(monkeypatch, tie_break):
    """Large layers guess the threshold from a sample and keep it only when the counts prove
    it; a misleading sample (the k-th count at the edge of two values) falls back."""
    import fedprune.selection as selection

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 64, generator=gen)
    layers = [_counts(64, 64, clients, seed) for clients, seed in ((2, 1), (7, 2), (30, 3))]
    edge = torch.zeros(64, 64, dtype=torch.int16)
    edge.view(-1)[::4] = 1  # the sample (every 64th count) sees only 1s: it guesses 1, the truth is 0
    exact = torch.ones(64, 64, dtype=torch.int16)
    exact.view(-1)[1::2] = 2  # exactly k counts above the guess (1): nothing tied is pruned
    for counts in layers + [edge, exact]:
        cfg = PruneConfig(0.5, tie_break=tie_break, seed=2)
        monkeypatch.setattr(selection, "_SAMPLE", 1 << 30)  # always the full histogram
        full = select_final_mask(counts, cfg, weight=weight, salt=1)
        monkeypatch.setattr(selection, "_SAMPLE", 64)
        assert torch.equal(select_final_mask(counts, cfg, weight=weight, salt=1), full)
        assert int(full.sum()) == counts.numel() // 2
    flat = edge.reshape(-1)
    sample = flat[:: len(flat) // 64]
    guess = selection._threshold(sample, max(1, round(len(flat) // 2 * len(sample) / len(flat))))
    assert guess != selection._split_layer(flat, len(flat) // 2)[0]  # the sample did mislead
