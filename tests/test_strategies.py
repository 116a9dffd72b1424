"""Strategies on a tiny random LLaMA: equivalences the paper's study relies on."""

import copy

import pytest
import torch

from fedprune.config import PruneConfig
from fedprune.models import prunable_weights
from fedprune.strategies import plain_sum, prune


def _run(model, client_windows, strategy, **cfg):
    m = copy.deepcopy(model)
    result = prune(m, client_windows, PruneConfig(0.5, **cfg), strategy, progress=False)
    return m, result


def _masks_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_sum_counts_equal_sum_of_masks():
    gen = torch.Generator().manual_seed(0)
    masks = [{"w": torch.rand(5, 7, generator=gen) > 0.5} for _ in range(6)]
    counts = plain_sum(masks)["w"]
    assert torch.equal(counts.int(), sum(m["w"].int() for m in masks))


@pytest.mark.parametrize("strategy", ["one-shot", "iterative"])
def test_federated_with_one_client_equals_centralized(tiny_model, windows, strategy):
    _, central = _run(tiny_model, [windows], "centralized")
    _, fed = _run(tiny_model, [windows], strategy)
    assert _masks_equal(central.final_masks, fed.final_masks)


@pytest.mark.parametrize("strategy", ["centralized", "one-shot", "iterative"])
@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_exact_sparsity_and_weights_zeroed(tiny_model, windows, strategy, group):
    model, result = _run(tiny_model, [windows[:4], windows[4:]], strategy, comparison_group=group)
    global_sparsity, per_layer = result.sparsity()
    assert global_sparsity == 0.5 and all(v == 0.5 for v in per_layer.values())
    for name, weight in prunable_weights(model).items():
        assert (weight[result.final_masks[name]] == 0).all()


def test_batch_size_does_not_change_masks(tiny_model, windows):
    _, a = _run(tiny_model, [windows[:4], windows[4:]], "one-shot", batch_size=1)
    _, b = _run(tiny_model, [windows[:4], windows[4:]], "one-shot", batch_size=3)
    assert _masks_equal(a.final_masks, b.final_masks)


def test_one_shot_selects_from_the_sum_of_local_wanda_masks(tiny_model, windows):
    clients = [windows[:3], windows[3:6], windows[6:]]
    seen = []

    def recording_sum(client_masks):
        seen.append([dict(m) for m in client_masks])
        return plain_sum(client_masks)

    m = copy.deepcopy(tiny_model)
    prune(m, clients, PruneConfig(0.5), "one-shot", aggregate=recording_sum, progress=False)
    # Each client's one-shot masks equal its own centralized Wanda run.
    for c, client_windows in enumerate(clients):
        _, alone = _run(tiny_model, [client_windows], "centralized")
        got = {k: v for block in seen for k, v in block[c].items()}
        assert _masks_equal(got, alone.final_masks)


def test_weight_scaling_multiplies_kept_weights(tiny_model, windows):
    clients = [windows[:4], windows[4:]]
    counts_seen = {}

    def recording_sum(client_masks):
        counts = plain_sum(client_masks)
        counts_seen.update(counts)
        return counts

    dense = prunable_weights(tiny_model)
    m = copy.deepcopy(tiny_model)
    result = prune(
        m, clients, PruneConfig(0.5, weight_scaling=True), "one-shot", aggregate=recording_sum, progress=False
    )
    for name, weight in prunable_weights(m).items():
        factor = (2 - counts_seen[name].float()) / 2
        expected = dense[name] * factor
        expected[result.final_masks[name]] = 0
        assert torch.allclose(weight, expected)


def test_iterative_differs_from_one_shot_with_several_clients(tiny_model, windows):
    _, one = _run(tiny_model, [windows[:4], windows[4:]], "one-shot")
    _, it = _run(tiny_model, [windows[:4], windows[4:]], "iterative")
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(one.final_masks[first], it.final_masks[first])  # block 0 sees the same inputs
    assert not _masks_equal(one.final_masks, it.final_masks)


def test_local_pruning_masks_equal_centralized_and_leave_weights(tiny_model, windows):
    from fedprune.strategies import local_pruning_masks

    before = {n: w.clone() for n, w in prunable_weights(tiny_model).items()}
    masks = local_pruning_masks(tiny_model, windows, PruneConfig(0.5))
    _, central = _run(tiny_model, [windows], "centralized")
    assert _masks_equal(masks, central.final_masks)
    assert all(torch.equal(before[n], w) for n, w in prunable_weights(tiny_model).items())


@pytest.mark.parametrize("strategy", ["one-shot", "iterative"])
def test_secure_sum_plugs_into_the_aggregation_seam(tiny_model, windows, strategy):
    from nodes.secure_sum import secure_sum

    clients = [windows[:3], windows[3:6], windows[6:]]
    plain = prune(copy.deepcopy(tiny_model), clients, PruneConfig(0.5), strategy, progress=False)
    secure = prune(
        copy.deepcopy(tiny_model), clients, PruneConfig(0.5), strategy, aggregate=secure_sum, progress=False
    )
    assert _masks_equal(plain.final_masks, secure.final_masks)
