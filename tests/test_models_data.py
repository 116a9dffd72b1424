"""Layout, fingerprint, model specs, and the calibration/evaluation data helpers."""

import json

import pytest
import torch

from fedprune.data import (
    eval_windows,
    load_text,
    partition_dirichlet,
    partition_iid,
    sample_windows,
)
from fedprune.errors import DataError, ModelError
from fedprune.models import fingerprint, layout, load_model, resolve_spec


def test_layout_is_contiguous_ordered_and_excludes_embeddings(tiny_model):
    lay = layout(tiny_model)
    names = [s.name for s in lay.slots]
    assert names[:7] == [
        f"model.layers.0.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert len(names) == 14 and lay.num_blocks == 2
    offset = 0
    for slot in lay.slots:
        assert slot.offset == offset
        offset += slot.numel
    assert lay.total == offset
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_fingerprint_detects_any_weight_change(tiny_model):
    before = fingerprint(tiny_model)
    assert fingerprint(tiny_model) == before
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert fingerprint(tiny_model) != before


def test_model_without_decoder_blocks_is_refused():
    with pytest.raises(ModelError, match="no decoder blocks"):
        layout(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("spec", ["no-such-model", "./missing-dir", "/tmp/missing.gguf"])
def test_unknown_model_spec(spec):
    with pytest.raises(ModelError):
        resolve_spec(spec)


def test_local_model_directory_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert layout(lm.model).num_blocks == 2
    assert lm.tokenizer("abc")["input_ids"]


def test_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a = sample_windows(ids, 10, 50, seed=3)
    assert a.shape == (10, 50)
    assert torch.equal(a, sample_windows(ids, 10, 50, seed=3))
    assert not torch.equal(a, sample_windows(ids, 10, 50, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows
    with pytest.raises(DataError):
        sample_windows(ids, 10, 999, seed=0)


def test_eval_windows_are_non_overlapping_and_limited():
    ids = torch.arange(105)
    w = eval_windows(ids, 10)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), ids[:100])
    assert eval_windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(DataError):
        eval_windows(ids, 200)


def test_iid_partition_is_an_equal_disjoint_split():
    windows = torch.arange(20).reshape(10, 2)
    parts = partition_iid(windows, 3, seed=0)
    assert [len(p) for p in parts] == [3, 3, 3]
    seen = torch.cat(parts)[:, 0].tolist()
    assert len(set(seen)) == 9
    with pytest.raises(DataError):
        partition_iid(windows, 11, seed=0)


def test_dirichlet_partition_gives_every_client_data():
    sources = [torch.full((12, 4), s) for s in range(3)]
    parts = partition_dirichlet(sources, 5, alpha=0.1, seed=0)
    assert len(parts) == 5 and all(len(p) >= 1 for p in parts)
    assert sum(len(p) for p in parts) == 36


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_text(str(txt), "calibration") == "hello world"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(jl), "calibration") == "one\n\ntwo"
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="text"):
        load_text(str(bad), "calibration")
    empty = tmp_path / "d.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(empty), "calibration")
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"), "calibration")
    with pytest.raises(DataError, match="unknown data source"):
        load_text("wikitext", "calibration")
