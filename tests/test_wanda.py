"""The Wanda scorer and local mask against an independent direct computation."""

import numpy as np
import pytest
import torch

from fedprune.config import PruneConfig
from fedprune.errors import PruningConfigError
from fedprune.wanda import InputNormStats, local_mask, wanda_scores


def test_local_mask_matches_direct_numpy_computation():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(12, 20)).astype(np.float32)
    inputs = [rng.normal(size=(3, 7, 20)).astype(np.float32) for _ in range(4)]  # 4 batches of 3 seqs
    stats = InputNormStats(20, torch.device("cpu"))
    for batch in inputs:
        stats.add_batch(torch.from_numpy(batch))
    x = np.concatenate([b.reshape(-1, 20) for b in inputs])
    col_norm = np.sqrt((x.astype(np.float64) ** 2).sum(0) / 12)  # mean over 12 sequences
    metric = np.abs(weight) * col_norm[None, :]
    expected = np.zeros_like(weight, dtype=bool)
    k = int(20 * 0.4)
    for r in range(12):
        expected[r, np.argsort(metric[r], kind="stable")[:k]] = True
    mask = local_mask(wanda_scores(torch.from_numpy(weight), stats.sq_norm), PruneConfig(0.4))
    assert np.array_equal(mask.numpy(), expected)
    assert np.allclose(stats.sq_norm.numpy(), col_norm**2, rtol=1e-5)


def test_running_mean_does_not_depend_on_batching():
    x = torch.randn(10, 5, 8)
    one = InputNormStats(8, torch.device("cpu"))
    one.add_batch(x)
    many = InputNormStats(8, torch.device("cpu"))
    for part in x.split(3):
        many.add_batch(part)
    assert one.nsamples == many.nsamples == 10
    assert torch.allclose(one.sq_norm, many.sq_norm, rtol=1e-6)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_local_mask_pattern(n, m):
    scores = torch.rand(6, 32)
    mask = local_mask(scores, PruneConfig(n / m, nm=(n, m)))
    groups = mask.reshape(6, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    # the pruned ones are the smallest in their group
    s = scores.reshape(6, 32 // m, m)
    assert (s.masked_fill(~groups, -1).amax(-1) <= s.masked_fill(groups, 2).amin(-1)).all()


def test_nm_needs_divisible_width():
    with pytest.raises(PruningConfigError):
        local_mask(torch.rand(2, 6), PruneConfig(0.5, nm=(2, 4)))


def test_selection_of_k_smallest_matches_a_stable_sort_even_with_ties():
    from fedprune.wanda import smallest_per_row

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 33), generator=gen).float()  # many ties
    for k in (0, 1, 7, 16, 33):
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(smallest_per_row(scores, k), expected)


def _reference_scaler_row(windows: torch.Tensor, nsamples: int) -> torch.Tensor:
    """WrappedGPT.add_batch of the reference, one (1, tokens, columns) window per call,
    then zero windows up to ``nsamples`` (its zero-padded buffer)."""
    scaler_row = torch.zeros(windows.shape[-1])
    count = 0
    for j in range(nsamples):
        inp = windows[j : j + 1] if j < len(windows) else torch.zeros_like(windows[:1])
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        scaler_row *= count / (count + tmp)
        count += tmp
        inp = inp.type(torch.float32)
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / count
    return scaler_row


def test_reference_stats_are_the_references_scaler_row_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(7, 33, 48, generator=gen) * torch.rand(48, generator=gen) * 30
    stats = InputNormStats(48, torch.device("cpu"), "reference")
    stats.add_batch(acts[:3])
    stats.add_batch(acts[3:])
    assert torch.equal(stats.sq_norm, _reference_scaler_row(acts, 7))
    stats.pad_to(12)  # a one-shot client of the reference divides by nsamples
    assert stats.nsamples == 12
    assert torch.equal(stats.sq_norm, _reference_scaler_row(acts, 12))
    batched = InputNormStats(48, torch.device("cpu"))
    batched.add_batch(acts)
    torch.testing.assert_close(batched.sq_norm, _reference_scaler_row(acts, 7))
