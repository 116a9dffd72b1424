"""Every supported architecture through the pipeline, on tiny random models (no download).

Per architecture: the layout covers the blocks, centralized and one-shot prunes
reach the target sparsity over all block matrices, and perplexity still runs.
For fused MoE expert banks: one slot per expert matrix, each at the per-row
sparsity, with Wanda statistics from the tokens routed to that expert only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.architectures import MIN_COVERAGE, block_sparsity, coverage, routed_expert_inputs
from fedprune.config import PruneConfig
from fedprune.errors import ModelError
from fedprune.evaluation import perplexity
from fedprune.models import fingerprint, layout, prunable_weights
from fedprune.propagation import BlockRunner
from fedprune.strategies import prune

VOCAB = 96
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    use_cache=False,
)


def _config(arch: str, **overrides):
    import transformers as tf

    common = {**COMMON, **overrides}

    if arch == "llama-gqa":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8)
    if arch == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3-moe":
        return tf.Qwen3MoeConfig(
            **common, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            use_cache=False,
        )
    raise AssertionError(arch)


ARCHS = ("llama-gqa", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "qwen3-moe", "opt")
MOE = ("mixtral", "qwen3-moe")


def make_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # spread, so that Wanda scores are not near-uniform
    return model


def _windows(n: int = 6, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_covers_the_blocks(arch):
    model = make_model(arch)
    lay = layout(model)
    cov = coverage(model)
    assert cov.fraction >= MIN_COVERAGE
    assert lay.total == cov.prunable
    weights = prunable_weights(model)
    assert list(weights) == [s.name for s in lay.slots]
    assert [tuple(w.shape) for w in weights.values()] == [s.shape for s in lay.slots]
    if arch == "opt":
        assert lay.slots[0].name.startswith("model.decoder.layers.0.")
        assert {"model.decoder.layers.0.fc1", "model.decoder.layers.1.fc2"} <= {s.name for s in lay.slots}
    if arch in MOE:
        assert "mlp.gate.weight" in cov.dense  # the router stays dense, but is counted
        assert "model.layers.0.mlp.experts.gate_up_proj[3]" in {s.name for s in lay.slots}


@pytest.mark.parametrize(
    ("arch", "strategy"),
    [(a, s) for s in ("centralized", "one-shot") for a in ARCHS]
    + [(a, "iterative") for a in ("phi3", "mixtral", "qwen3-moe", "opt")],
)
def test_prune_reaches_target_sparsity_over_block_matrices(arch, strategy):
    model = make_model(arch)
    windows = _windows()
    dense_ppl = perplexity(model, windows)
    config = PruneConfig(sparsity=0.5, batch_size=4)
    client_windows = [windows[:3], windows[3:]]
    result = prune(model, client_windows, config, strategy, progress=False)
    assert result.sparsity()[0] == pytest.approx(0.5, abs=1e-3)
    report = block_sparsity(model)
    assert report.prunable == pytest.approx(0.5, abs=1e-3)
    assert report.all_matrices == pytest.approx(0.5, abs=0.02)
    assert report.all_matrices <= report.prunable
    for name, weight in prunable_weights(model).items():
        assert (weight[result.final_masks[name]] == 0).all()
    ppl = perplexity(model, windows)
    assert torch.isfinite(torch.tensor(ppl)) and ppl != dense_ppl


@pytest.mark.parametrize("arch", MOE)
def test_moe_masks_are_per_expert_at_the_per_row_sparsity(arch):
    model = make_model(arch)
    result = prune(model, [_windows()], PruneConfig(sparsity=0.5), "centralized", progress=False)
    bank = model.model.layers[0].mlp.experts
    experts = bank.gate_up_proj.shape[0]
    for param in ("gate_up_proj", "down_proj"):
        for e in range(experts):
            mask = result.final_masks[f"model.layers.0.mlp.experts.{param}[{e}]"]
            rows, cols = mask.shape
            assert mask.sum(dim=1).eq(cols // 2).all()  # Wanda's per-row rule, per expert
            # the mask reached the fused 3-D parameter, expert by expert
            assert (getattr(bank, param)[e][mask] == 0).all()
            assert (getattr(bank, param)[e][~mask] != 0).all()


def _captured_routing(model: nn.Module, idle: int):
    """Record block 0's expert-bank inputs and router choices; never route to expert ``idle``."""
    moe = model.model.layers[0].mlp
    seen: dict[str, list[torch.Tensor]] = {}
    substitute = (idle + 1) % moe.experts.gate_up_proj.shape[0]

    def reroute(_m, _args, out):
        logits, scores, index = out
        return logits, scores, torch.where(index == idle, substitute, index)

    def capture(_m, args):
        seen.setdefault("hidden", []).append(args[0])
        seen.setdefault("index", []).append(args[1])

    handles = [moe.gate.register_forward_hook(reroute), moe.experts.register_forward_pre_hook(capture)]
    return seen, handles


@pytest.mark.parametrize("arch", MOE)
def test_expert_statistics_come_from_routed_tokens_only(arch):
    model = make_model(arch)
    runner = BlockRunner(model, batch_size=4)
    hidden = runner.embed(_windows(n=6))
    idle = 2
    seen, handles = _captured_routing(model, idle)
    try:
        stats = runner.collect_stats(0, hidden)
        # an independent full pass (batched the same way) to record what the bank really received
        for batch in hidden.split(4):
            model.model.layers[0](batch, **runner.block_kwargs[0, len(batch)])
    finally:
        for h in handles:
            h.remove()
    bank = model.model.layers[0].mlp.experts
    half = len(seen["hidden"]) // 2  # the stats pass stopped at the bank; the second pass ran it
    xs = torch.cat(seen["hidden"][half:])
    index = torch.cat(seen["index"][half:])
    for e in range(bank.gate_up_proj.shape[0]):
        routed = (index == e).any(dim=-1)
        x = xs[routed]
        h = nn.functional.silu(x @ bank.gate_up_proj[e][: bank.down_proj.shape[2]].T) * (
            x @ bank.gate_up_proj[e][bank.down_proj.shape[2] :].T
        )
        gu = stats[f"mlp.experts.gate_up_proj[{e}]"].sq_norm
        dn = stats[f"mlp.experts.down_proj[{e}]"].sq_norm
        torch.testing.assert_close(gu, x.pow(2).sum(0) / hidden.shape[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dn, h.pow(2).sum(0) / hidden.shape[0], rtol=1e-4, atol=1e-6)
        if e == idle:
            assert not routed.any() and gu.eq(0).all() and dn.eq(0).all()
        else:
            assert routed.any() and gu.gt(0).any()


def test_routed_inputs_rebuild_the_bank_output():
    """The per-expert inputs are the ones the bank itself computes with (orientation check)."""
    model = make_model("mixtral")
    moe = model.model.layers[0].mlp
    x = torch.randn(10, 32)
    _, weights, index = moe.gate(x)
    expected = moe.experts(x, index, weights)
    rebuilt = torch.zeros_like(x)
    for e, x_gate_up, x_down in routed_expert_inputs(moe.experts, x, index):
        rows = (index == e).any(dim=-1)
        w = (weights * (index == e)).sum(dim=-1)[rows, None]
        rebuilt[rows] += w * nn.functional.linear(x_down, moe.experts.down_proj[e])
        assert torch.equal(x_gate_up, x[rows])
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-6)


def test_expert_slot_writes_reach_the_model_and_the_fingerprint():
    model = make_model("qwen3-moe")
    before = fingerprint(model)
    prunable_weights(model)["model.layers.1.mlp.experts.down_proj[3]"][0, 0] = 0.0
    assert model.model.layers[1].mlp.experts.down_proj[3, 0, 0] == 0
    assert fingerprint(model) != before


class _RawMLP(nn.Module):
    """An MLP that keeps its matrices as raw parameters (no nn.Linear): nothing to prune."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(inner, hidden))
        self.w_out = nn.Parameter(torch.randn(hidden, inner))

    def forward(self, x):
        return nn.functional.linear(nn.functional.silu(nn.functional.linear(x, self.w_in)), self.w_out)


def test_model_with_too_little_coverage_is_refused():
    model = make_model("llama-gqa")
    for block in model.model.layers:
        block.mlp = _RawMLP(32, 64)
    with pytest.raises(ModelError) as err:
        layout(model)
    message = str(err.value)
    assert "prunable" in message and "95%" in message
    assert "mlp.w_in" in message and "mlp.w_out" in message and "stay dense" in message


def test_unsupported_expert_layout_is_refused():
    """A transposed expert bank (gpt-oss style) is not mistaken for the Mixtral layout."""
    model = make_model("mixtral")
    for block in model.model.layers:
        block.mlp.experts.is_transposed = True
    with pytest.raises(ModelError, match=r"experts\.gate_up_proj"):
        layout(model)


def test_simulation_report_gives_sparsity_over_all_block_matrices():
    from fedprune.models import LoadedModel
    from fedprune.simulate import PreparedData, RunSpec, run_spec

    lm = LoadedModel(model=make_model("mixtral"), tokenizer=None, spec="tiny-mixtral")
    windows = _windows()
    data = PreparedData(
        client_windows=[windows[:3], windows[3:]], eval_sets={"calib": windows}, pooled_windows=windows
    )
    entry = run_spec(lm, data, RunSpec("one-shot", PruneConfig(sparsity=0.5)), progress=False)
    cov = coverage(lm.model)
    assert entry["sparsity"] == pytest.approx(0.5)
    # the dense router counts in the denominator only
    assert entry["sparsity_all_block_matrices"] == pytest.approx(0.5 * cov.fraction, abs=1e-3)
    assert entry["sparsity_all_block_matrices"] < entry["sparsity"]


@pytest.mark.parametrize("arch", ["gemma2", "qwen3", "opt", "mixtral"])
def test_block_by_block_pass_matches_the_model(arch):
    """Each block gets its own arguments (Gemma 2 alternates sliding-window and full attention)."""
    overrides = {"sliding_window": 4, "num_hidden_layers": 3} if arch == "gemma2" else {}
    model = make_model(arch, **overrides)
    windows = _windows(n=5, seqlen=16)
    runner = BlockRunner(model, batch_size=2)
    hidden = runner.embed(windows)
    expected = model(windows, output_hidden_states=True).hidden_states
    for i in range(len(runner.blocks) - 1):
        torch.testing.assert_close(hidden, expected[i], rtol=1e-4, atol=1e-5)
        hidden = runner.forward(i, hidden)
