"""Block-by-block passes over a model saved as safetensors: the same masks, perplexity and
pruned weights as the in-memory model, and a pruned copy that transformers loads."""

from __future__ import annotations

import pytest
import torch

from fedprune.architectures import decoder_blocks
from fedprune.config import PruneConfig
from fedprune.evaluation import perplexity
from fedprune.models import fingerprint, prunable_weights
from fedprune.simulate import PreparedData, RunSpec, run_study
from fedprune.strategies import prune
from fedprune.streaming import CheckpointNamesError, PrunedWriter, load_streamed, streamed_fingerprint
from tests.conftest import make_byte_tokenizer
from tests.test_architectures import MOE, VOCAB, make_model


def _saved(arch: str, path, **overrides):
    model = make_model(arch, **overrides)
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return model


def _windows(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2", "phi3", "opt", *MOE])
def test_streamed_one_shot_matches_in_memory_and_reloads(arch, tmp_path):
    """Same final masks and pruned weights; the written copy loads with the expected sparsity.
    MoE checkpoints hold one tensor per expert (as published and as save_pretrained writes
    them): each fused bank is assembled from them block by block."""
    from transformers import AutoModelForCausalLM

    model = _saved(arch, tmp_path / "src")
    parties = [_windows(1), _windows(2)]
    cfg = PruneConfig(0.5, batch_size=4)
    expected = prune(model, parties, cfg, "one-shot", progress=False)

    sm = load_streamed(str(tmp_path / "src"))
    assert streamed_fingerprint(sm) == fingerprint(make_model(arch))
    writer = PrunedWriter(sm, tmp_path / "pruned")
    got = prune(
        sm.model,
        parties,
        cfg,
        "one-shot",
        progress=False,
        blocks=sm.blocks(on_release=writer.write_block),
        keep_masks=False,
    )
    writer.finish()
    assert not got.final_masks  # a streamed run keeps counts, not every mask
    assert got.sparsity() == expected.sparsity()
    assert all(p.device.type == "meta" for p in decoder_blocks(sm.model).parameters())  # nothing left loaded

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, weight in prunable_weights(reloaded).items():
        assert torch.equal(weight, prunable_weights(model)[name]), name
        assert torch.equal(weight == 0, expected.final_masks[name]), name
    assert writer.block_sparsity().prunable == pytest.approx(0.5)


@pytest.mark.parametrize("strategy", ["centralized", "iterative"])
def test_streamed_masks_match_in_memory_for_every_strategy(strategy, tmp_path):
    model = _saved("llama-gqa", tmp_path / "src")
    parties = [_windows(3), _windows(4)]
    cfg = PruneConfig(0.6, comparison_group="row", batch_size=4)
    expected = prune(model, parties, cfg, strategy, progress=False)
    sm = load_streamed(str(tmp_path / "src"))
    writer = PrunedWriter(sm, tmp_path / "pruned")
    prune(sm.model, parties, cfg, strategy, progress=False, blocks=sm.blocks(on_release=writer.write_block))
    writer.finish()
    pruned = load_streamed(str(tmp_path / "pruned"))
    for i in range(pruned.num_blocks):
        pruned.load_block(i)
        for name, weight in prunable_weights(pruned.model).items():
            if name.startswith(f"model.layers.{i}."):
                assert torch.equal(weight == 0, expected.final_masks[name]), name
        pruned.free_block(i)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2", "opt"])
def test_streamed_perplexity_equals_in_memory_with_tied_embeddings(arch, tmp_path):
    model = _saved(arch, tmp_path / "src", tie_word_embeddings=True)
    sm = load_streamed(str(tmp_path / "src"))
    assert sm.model.lm_head.weight is sm.model.get_input_embeddings().weight
    windows = _windows(5, n=5)  # a last batch smaller than the others
    dense = perplexity(model, windows, batch_size=2)
    assert perplexity(sm.model, windows, batch_size=2, blocks=sm.blocks()) == pytest.approx(dense, rel=1e-5)


def test_streamed_study_never_modifies_the_source_and_keeps_the_last_copy(tmp_path):
    model = _saved("llama-gqa", tmp_path / "src")
    sm = load_streamed(str(tmp_path / "src"))
    data = PreparedData(
        [_windows(6), _windows(7)], {"eval": _windows(8, n=4)}, torch.cat([_windows(6), _windows(7)])
    )
    specs = [RunSpec(s, PruneConfig(0.5, batch_size=4)) for s in ("centralized", "local-only", "one-shot")]
    report = run_study(sm, data, specs, progress=False, work_dir=tmp_path, keep_last=tmp_path / "last")
    assert report["dense"]["perplexity"]["eval"] == pytest.approx(
        perplexity(model, _windows(8, n=4)), rel=1e-5
    )
    assert [r["sparsity_all_block_matrices"] for r in report["runs"]] == [0.5, 0.5, 0.5]
    assert streamed_fingerprint(load_streamed(str(tmp_path / "src"))) == fingerprint(model)
    assert (tmp_path / "last" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "src"]  # workspace removed


def _drop_tensor(directory, key: str) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("arch", "missing", "error"),
    [
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            r"\(4, 32, 64\) in the model.*\(3, 32, 64\)",
        ),
        (
            "qwen3-moe",
            "model.layers.0.mlp.experts.0.up_proj.weight",
            "no tensor for parameter 'model.layers.0.mlp.experts.gate_up_proj'",
        ),
        (
            "llama-gqa",
            "model.layers.1.mlp.down_proj.weight",
            "no tensor for parameter 'model.layers.1.mlp.down_proj.weight'",
        ),
    ],
)
def test_a_checkpoint_that_lacks_a_tensor_is_refused_by_name(arch, missing, error, tmp_path):
    """A missing expert shrinks its bank (refused by shape); a missing part or matrix is named."""
    _saved(arch, tmp_path / "src")
    _drop_tensor(tmp_path / "src", missing)
    sm = load_streamed(str(tmp_path / "src")) if "layers.1." in missing else None
    with pytest.raises(CheckpointNamesError, match=error):
        if sm is None:
            load_streamed(str(tmp_path / "src"))
        else:
            sm.load_block(1)
