"""Our masks equal the reference implementation's (Pengxin-Guo/FedPrLLM) bit for bit.

The reference's procedure is rebuilt here step by step, independently of
``fedprune``: its data sampling and client split (``get_wikitext2`` and
``main.py``), its per-window statistics (``WrappedGPT.add_batch``), its local
masks (stable sort per row), its zero-padded one-shot buffers, and its server
selection (stable sorts for row/column, threshold plus a ``randperm`` fill from
the global generator for layer). Our tool runs with ``--partition reference
--stats reference --tie-break reference`` and must produce the same masks.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from fedprune.config import PruneConfig
from fedprune.data import reference_split
from fedprune.strategies import prune
from tests.conftest import make_tiny_llama

SEED = 3
NSAMPLES = 10  # 3 clients x 3 windows, one window left over (the reference drops it)
CLIENTS = 3
SEQLEN = 32
SPARSITY = 0.5


# ---- the reference, rebuilt -------------------------------------------------------------


def ref_loaders(token_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """get_wikitext2's sampling with the global Python RNG, then main.py's shuffle and split."""
    state = random.getstate()
    try:
        random.seed(SEED)
        trainloader = []
        for _ in range(NSAMPLES):
            i = random.randint(0, token_ids.shape[0] - SEQLEN - 1)
            trainloader.append(token_ids[i : i + SEQLEN])
        sampled = list(trainloader)
        random.shuffle(trainloader)
    finally:
        random.setstate(state)
    per_client = NSAMPLES // CLIENTS
    return sampled, [trainloader[c * per_client : (c + 1) * per_client] for c in range(CLIENTS)]


def find_layers(module: nn.Module, name: str = "") -> dict[str, nn.Linear]:
    if type(module) is nn.Linear:
        return {name: module}
    found = {}
    for child_name, child in module.named_children():
        found.update(find_layers(child, name + "." + child_name if name else child_name))
    return found


class WrappedGPT:
    def __init__(self, layer: nn.Linear) -> None:
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def prepare_calibration_input(model, windows, datasize):
    """Hidden states entering block 0, one window per forward, in a zero buffer of datasize."""
    layers = model.model.layers
    inps = torch.zeros((datasize, SEQLEN, model.config.hidden_size))
    cache: dict = {"i": 0}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            inps[cache["i"]] = args[0] if args else kwargs.pop("hidden_states")
            cache["i"] += 1
            cache["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
            raise ValueError

    layers[0] = Catcher(layers[0])
    for window in windows:
        try:
            model(window.unsqueeze(0))
        except ValueError:
            pass
    layers[0] = layers[0].module
    return inps, torch.zeros_like(inps), cache["kwargs"]


def run_layer(layer, inp, kwargs):
    out = layer(inp.unsqueeze(0), **kwargs)
    return (out[0] if isinstance(out, tuple) else out)[0]


def wanda_masks(layer, inps, outs, count, kwargs) -> dict[str, torch.Tensor]:
    """Statistics over inps[0:count] (one window per forward), then the stable-sort row masks."""
    subset = find_layers(layer)
    wrapped = {name: WrappedGPT(subset[name]) for name in subset}
    handles = [
        subset[name].register_forward_hook(lambda _m, inp, _o, n=name: wrapped[n].add_batch(inp[0].data))
        for name in subset
    ]
    for j in range(count):
        outs[j] = run_layer(layer, inps[j], kwargs)
    for h in handles:
        h.remove()
    masks = {}
    for name in subset:
        metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
        mask = torch.zeros_like(metric) == 1
        indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * SPARSITY)]
        mask.scatter_(1, indices, True)
        masks[name] = mask
    return masks


def ref_select(global_mask: torch.Tensor, group: str) -> torch.Tensor:
    """prune_fedprllm_layer / prune_fedprllm_row_or_column."""
    metric = -global_mask.float()
    mask = torch.zeros_like(metric) == 1
    if group == "row":
        indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * SPARSITY)]
        mask.scatter_(1, indices, True)
    elif group == "column":
        indices = torch.sort(metric, dim=0, stable=True)[1][: int(metric.shape[0] * SPARSITY), :]
        mask.scatter_(0, indices, True)
    else:
        thresh = torch.sort(metric.flatten())[0][int(metric.numel() * SPARSITY)]
        mask = metric < thresh
        num_to_select = int(metric.numel() * SPARSITY) - mask.sum().item()
        indices = (metric == thresh).nonzero(as_tuple=False)
        selected = indices[torch.randperm(indices.size(0))[:num_to_select]]
        mask[selected[:, 0], selected[:, 1]] = True
    return mask


def ref_local_pruning(model, windows, datasize, *, update=None):
    """prune_wanda (centralized, update=None) / prune_wanda_and_update_global_mask."""
    inps, outs, kwargs = prepare_calibration_input(model, windows, datasize)
    masks = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            block_masks = wanda_masks(layer, inps, outs, NSAMPLES, kwargs)
            for name, mask in block_masks.items():
                find_layers(layer)[name].weight.data[mask] = 0
                masks[f"model.layers.{i}.{name}"] = mask
            for j in range(NSAMPLES):
                outs[j] = run_layer(layer, inps[j], kwargs)
            inps, outs = outs, inps
    return masks


def ref_centralized(model, sampled):
    model = copy.deepcopy(model)
    torch.manual_seed(SEED)
    return ref_local_pruning(model, sampled, NSAMPLES)


def ref_one_shot(model, clients, group):
    torch.manual_seed(SEED)
    global_masks: dict[str, torch.Tensor] = {}
    for windows in clients:  # every client on a fresh copy (the reference reloads the weights)
        local = ref_local_pruning(copy.deepcopy(model), windows, NSAMPLES)
        for name, mask in local.items():
            global_masks[name] = global_masks.get(name, torch.zeros(mask.shape, dtype=torch.int8)) + mask
    return {name: ref_select(counts, group) for name, counts in global_masks.items()}


def ref_iterative(model, clients, group):
    """prune_fedprllmv2: per block, every client's masks on the dense block, selection, then all
    clients propagate through the pruned block. Buffers are the clients' own size (no padding)."""
    model = copy.deepcopy(model)
    torch.manual_seed(SEED)
    per_client = NSAMPLES // CLIENTS
    buffers = [prepare_calibration_input(model, windows, per_client) for windows in clients]
    inps = [b[0] for b in buffers]
    outs = [b[1] for b in buffers]
    kwargs = buffers[0][2]
    final = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            subset = find_layers(layer)
            global_masks = {name: torch.zeros(subset[name].weight.shape, dtype=torch.int8) for name in subset}
            for c in range(CLIENTS):
                for name, mask in wanda_masks(layer, inps[c], outs[c], per_client, kwargs).items():
                    global_masks[name] += mask
            for name in subset:
                mask = ref_select(global_masks[name], group)
                subset[name].weight.data[mask] = 0
                final[f"model.layers.{i}.{name}"] = mask
            for c in range(CLIENTS):
                for j in range(per_client):
                    outs[c][j] = run_layer(layer, inps[c][j], kwargs)
                inps[c], outs[c] = outs[c], inps[c]
    return final


# ---- the comparison ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(seed=5)
    token_ids = torch.randint(0, 128, (700,), generator=torch.Generator().manual_seed(9))
    ref_sampled, ref_clients = ref_loaders(token_ids)
    sampled, clients = reference_split(token_ids, NSAMPLES, SEQLEN, CLIENTS, SEED)
    return model, ref_sampled, ref_clients, sampled, clients


def _config(group: str) -> PruneConfig:
    return PruneConfig(
        SPARSITY, comparison_group=group, tie_break="reference", stats="reference", seed=SEED, batch_size=1
    )


def _ours(model, parties, group, strategy):
    with torch.random.fork_rng():
        torch.manual_seed(12345)  # our selection must not depend on the global generator
        result = prune(
            copy.deepcopy(model), parties, _config(group), strategy, progress=False, nsamples=NSAMPLES
        )
    return result.final_masks


def _differing(ours: dict, ref: dict) -> int:
    assert ours.keys() == ref.keys()
    return sum(int((ours[n] != ref[n]).sum()) for n in ours)


def test_reference_split_is_the_references_sampling_and_shuffle(setup):
    _, ref_sampled, ref_clients, sampled, clients = setup
    assert torch.equal(sampled, torch.stack(ref_sampled))
    assert len(clients) == CLIENTS
    for ours, ref in zip(clients, ref_clients, strict=True):
        assert torch.equal(ours, torch.stack(ref))


def test_centralized_equals_reference(setup):
    model, ref_sampled, _, sampled, _ = setup
    with torch.random.fork_rng():
        ref = ref_centralized(model, ref_sampled)
    assert _differing(_ours(model, [sampled], "layer", "centralized"), ref) == 0


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_one_shot_equals_reference(setup, group):
    model, _, ref_clients, _, clients = setup
    with torch.random.fork_rng():
        ref = ref_one_shot(model, ref_clients, group)
    assert _differing(_ours(model, clients, group, "one-shot"), ref) == 0


@pytest.mark.parametrize("group", ["layer", "row", "column"])
def test_iterative_equals_reference(setup, group):
    model, _, ref_clients, _, clients = setup
    with torch.random.fork_rng():
        ref = ref_iterative(model, ref_clients, group)
    assert _differing(_ours(model, clients, group, "iterative"), ref) == 0


def test_the_default_tie_break_is_not_the_reference(setup):
    """The check above has teeth: with seeded random keys the layer-group masks differ."""
    model, _, ref_clients, _, clients = setup
    with torch.random.fork_rng():
        ref = ref_one_shot(model, ref_clients, "layer")
    cfg = PruneConfig(SPARSITY, tie_break="random", stats="reference", seed=SEED, batch_size=1)
    ours = prune(copy.deepcopy(model), clients, cfg, "one-shot", progress=False, nsamples=NSAMPLES)
    assert _differing(ours.final_masks, ref) > 0


def test_server_config_accepts_every_tie_break_and_refuses_others():
    from nodes.config import NodeConfigError, ServerConfig

    base = {"insecure": True, "roster": {"a": "00", "b": "00"}}
    for tie_break in ("random", "magnitude", "index", "reference"):
        assert ServerConfig(**base, tie_break=tie_break).validate().tie_break == tie_break
    with pytest.raises(NodeConfigError, match="tie_break must be one of"):
        ServerConfig(**base, tie_break="lowest").validate()
