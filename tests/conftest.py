"""Shared fixtures: a tiny random LLaMA model (no download) and random token windows."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    # Give weights some spread so that Wanda scores are not near-uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


@pytest.fixture
def windows():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=gen)


def make_byte_tokenizer():
    """A 256-symbol byte-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_model_dir(path, seed: int = 0):
    """A tiny random LLaMA with a byte tokenizer saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


PROSE = (
    "The hospital kept its records in a locked room at the end of the corridor. "
    "Every morning the clerk unlocked the door, counted the files, and wrote the "
    "number in a small book that nobody else was allowed to read. "
) * 40


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "private.txt"
    path.write_text(PROSE)
    return path
