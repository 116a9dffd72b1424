"""The model is never whole in memory: decoder blocks streamed from safetensors files.

A ``StreamedModel`` is the model's skeleton with its parameters on the meta
device, except the embeddings, the final norm and ``lm_head`` (and the buffers,
such as rotary frequencies, which are computed, not loaded). Every pass
(calibration, pruning, perplexity) goes block by block through a
``BlockSource``: ``load(i)`` materializes block ``i``'s parameters on the
device from the memory-mapped safetensors files, ``release(i)`` (optionally
writes the block out and) turns them back into meta tensors. A process holds
the embeddings, one block and the activations of its windows.

The pruned model is written block by block (``PrunedWriter``): one safetensors
shard per decoder block and one for everything else, with the index, the
config and the tokenizer, so that ``from_pretrained`` loads it.

GGUF files are converted once to safetensors (cached, see ``models``); hub ids
resolve to their downloaded snapshot. MoE checkpoints published one tensor per
expert (Mixtral's ``block_sparse_moe.experts.{e}.w1``, Qwen2/3-MoE's
``mlp.experts.{e}.gate_proj``) stream too: each fused bank of the model
(``experts.gate_up_proj``, ``experts.down_proj``) is assembled from them when its
block loads, one expert at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .architectures import BlockSparsity, block_matrices, block_matrix_params, blocks_path, decoder_blocks
from .errors import ModelError


class CheckpointNamesError(ModelError):
    """The checkpoint's tensor names or shapes are not the model's (a layout that transformers
    converts on loading in a way this module does not repeat): it cannot be streamed as it is.
    Per-expert MoE checkpoints are streamed (each fused bank assembled from its experts)."""


class BlockSource(Protocol):
    """Where a pass gets decoder block ``i`` from, and gives it back to."""

    def load(self, index: int) -> None: ...

    def release(self, index: int) -> None: ...


class Resident:
    """The blocks of an in-memory model: always there, nothing to do."""

    def load(self, index: int) -> None:
        pass

    def release(self, index: int) -> None:
        pass


RESIDENT = Resident()


class SafetensorsCheckpoint:
    """The tensors of a model directory's ``*.safetensors`` files, by name, read on demand.

    Files are opened (memory-mapped) for one read and closed after, so that
    pages of the whole checkpoint never stay mapped (they would count in the
    process's resident memory).
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{directory} holds no .safetensors files")
        self.file_of: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self.file_of[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        return out


# Fused expert banks (transformers' MoE layout: ``experts.gate_up_proj`` [E, 2I, H],
# ``experts.down_proj`` [E, H, I]) are published, and written by save_pretrained, one
# tensor per expert: expert e's rows are its parts concatenated (gate, then up).
_EXPERT_PARTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),  # Qwen2/3-MoE, Mixtral
    "down_proj": (("down_proj",), ("w2",)),
}
_MODULE_RENAMES = ((".mlp.", ".block_sparse_moe."),)  # Mixtral's checkpoint module name


@dataclass(frozen=True)
class ExpertBank:
    """A fused expert parameter assembled from per-expert checkpoint tensors:
    ``keys[e]`` are expert e's parts, concatenated along their first dimension."""

    keys: tuple[tuple[str, ...], ...]

    def assemble(
        self, checkpoint: SafetensorsCheckpoint, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The [E, rows, cols] bank on ``device``, read one expert at a time (the bank and
        one expert in memory, not two banks)."""
        out = None
        for e, keys in enumerate(self.keys):
            parts = checkpoint.read(keys)
            rows = sum(parts[k].shape[0] for k in keys)
            if out is None:
                shape = (len(self.keys), rows, *parts[keys[0]].shape[1:])
                out = torch.empty(shape, dtype=dtype, device=device)
            at = 0
            for k in keys:
                part = parts.pop(k)
                out[e, at : at + len(part)].copy_(part)
                at += len(part)
        assert out is not None
        return out


def _name_variants(name: str, prefix: str) -> list[str]:
    """The names a checkpoint may use for ``name``: as is, without the base-model prefix,
    with Mixtral's module name."""
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name[len(prefix) + 1 :])
    for old, new in _MODULE_RENAMES:
        names += [n.replace(old, new) for n in names if old in n]
    return names


def _checkpoint_key(name: str, checkpoint: SafetensorsCheckpoint, prefix: str) -> str | ExpertBank:
    """The checkpoint's name for model parameter ``name``, or for a fused expert bank the
    per-expert tensors it is assembled from."""
    variants = _name_variants(name, prefix)
    for candidate in variants:
        if candidate in checkpoint:
            return candidate
    stem, _, leaf = name.rpartition(".")
    if stem.endswith(".experts") and leaf in _EXPERT_PARTS:
        for base in _name_variants(stem, prefix):
            for parts in _EXPERT_PARTS[leaf]:
                count = 0
                while all(f"{base}.{count}.{part}.weight" in checkpoint for part in parts):
                    count += 1
                if count:
                    return ExpertBank(
                        tuple(tuple(f"{base}.{e}.{part}.weight" for part in parts) for e in range(count))
                    )
    raise CheckpointNamesError(
        f"{checkpoint.directory}: no tensor for parameter {name!r}; streaming needs a checkpoint "
        "whose tensor names are the model's (save it with save_pretrained)"
    )


def _read_params(
    model: nn.Module,
    names: dict[str, str | ExpertBank],
    checkpoint: SafetensorsCheckpoint,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Materialize the parameters ``names`` (parameter -> checkpoint source) on ``device``."""
    plain = {n: k for n, k in names.items() if isinstance(k, str)}
    tensors = checkpoint.read(plain.values())
    for name, source in names.items():
        expected = model.get_parameter(name).shape
        if isinstance(source, str):
            value = tensors.pop(source).to(device=device, dtype=dtype)
        else:
            value = source.assemble(checkpoint, device, dtype)
        if value.shape != expected:
            raise CheckpointNamesError(
                f"{checkpoint.directory}: parameter {name!r} is {tuple(expected)} in the model's "
                f"configuration but {tuple(value.shape)} in the checkpoint"
            )
        _set_param(model, name, value)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@dataclass
class StreamedModel:
    """A causal LM whose decoder blocks live in safetensors files until a pass needs them."""

    model: nn.Module
    tokenizer: object
    spec: str
    checkpoint: SafetensorsCheckpoint
    device: torch.device
    dtype: torch.dtype
    _prefix: str = field(default="", repr=False)

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def num_blocks(self) -> int:
        return len(decoder_blocks(self.model))

    def block_param_names(self, index: int) -> dict[str, str | ExpertBank]:
        """Full parameter name -> checkpoint key (or per-expert keys) of block ``index``."""
        prefix = f"{blocks_path(self.model)}.{index}."
        block = decoder_blocks(self.model)[index]
        return {
            prefix + n: _checkpoint_key(prefix + n, self.checkpoint, self._prefix)
            for n, _ in block.named_parameters()
        }

    def load_block(self, index: int, checkpoint: SafetensorsCheckpoint | None = None) -> None:
        """Materialize block ``index`` on the device from ``checkpoint`` (default: the source)."""
        source = checkpoint or self.checkpoint
        names = self.block_param_names(index)
        if source is not self.checkpoint:
            names = {n: _checkpoint_key(n, source, self._prefix) for n in names}
        _read_params(self.model, names, source, self.device, self.dtype)

    def free_block(self, index: int) -> None:
        """Turn block ``index``'s parameters back into meta tensors."""
        block = decoder_blocks(self.model)[index]
        for name, param in list(block.named_parameters()):
            _set_param(block, name, torch.empty_like(param, device="meta"))

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Full parameter name -> tensor of the loaded block ``index``."""
        prefix = f"{blocks_path(self.model)}.{index}."
        return {prefix + n: p.data for n, p in decoder_blocks(self.model)[index].named_parameters()}

    def resident_state(self) -> dict[str, torch.Tensor]:
        """The parameters outside the decoder blocks (a tied ``lm_head`` left out)."""
        path = blocks_path(self.model) + "."
        out, seen = {}, set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name.startswith(path) or id(p) in seen:
                continue
            seen.add(id(p))
            out[name] = p.data
        return out

    def _resident_names(self) -> dict[str, str | ExpertBank]:
        """Parameter name -> checkpoint key of everything outside the blocks (a tied head left out)."""
        path = blocks_path(self.model) + "."
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        return {
            n: _checkpoint_key(n, self.checkpoint, self._prefix)
            for n, _ in self.model.named_parameters(remove_duplicate=False)
            if not n.startswith(path) and not (tied and n == "lm_head.weight")
        }

    def load_resident(self) -> None:
        """Materialize the embeddings, the final norm and ``lm_head`` (``load_streamed`` does)."""
        _read_params(self.model, self._resident_names(), self.checkpoint, self.device, self.dtype)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.lm_head.weight = self.model.get_input_embeddings().weight

    def free_resident(self) -> None:
        """Turn the parameters outside the blocks back into meta tensors, for a stretch of
        work that needs the blocks alone (a server selecting, a client with its activations)."""
        for name in self._resident_names():
            param = self.model.get_parameter(name)
            _set_param(self.model, name, torch.empty_like(param, device="meta"))
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.lm_head.weight = self.model.get_input_embeddings().weight

    def blocks(
        self,
        checkpoint: SafetensorsCheckpoint | None = None,
        on_release: Callable[[int], None] | None = None,
    ) -> BlockSource:
        """A block source reading from ``checkpoint`` (default: the source model);
        ``on_release(i)`` runs on the loaded block before it is freed (to write it out)."""
        return _Stream(self, checkpoint, on_release)

    def reading(self, directory: Path) -> StreamedModel:
        """The same skeleton streaming its blocks from another (pruned) directory."""
        return StreamedModel(
            self.model,
            self.tokenizer,
            self.spec,
            SafetensorsCheckpoint(directory),
            self.device,
            self.dtype,
            self._prefix,
        )


@dataclass
class _Stream:
    model: StreamedModel
    checkpoint: SafetensorsCheckpoint | None
    on_release: Callable[[int], None] | None

    def load(self, index: int) -> None:
        self.model.load_block(index, self.checkpoint)

    def release(self, index: int) -> None:
        if self.on_release is not None:
            self.on_release(index)
        self.model.free_block(index)


def model_directory(spec: str) -> Path:
    """A spec's safetensors directory: the embedded model and GGUF files converted once
    (cached), a local directory as is, a hub id's downloaded snapshot."""
    from .models import gguf_safetensors_dir, resolve_spec

    source, extra = resolve_spec(spec)
    if "gguf_file" in extra:
        return gguf_safetensors_dir(Path(source) / extra["gguf_file"])
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown id, gated: many exception types
        raise ModelError(f"cannot fetch model {spec!r} from the hub ({type(exc).__name__})") from exc


def load_streamed(spec: str, dtype: str = "float32", device: str = "cpu") -> StreamedModel:
    """The skeleton of a model with only its embeddings, final norm and lm_head loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .architectures import check_coverage
    from .models import _LOAD_ERRORS, DTYPES, check_device

    check_device(dtype, device)
    directory = model_directory(spec)
    try:
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except _LOAD_ERRORS as exc:
        raise ModelError(f"cannot load model {spec!r}: {' '.join(str(exc).split())[:300]}") from exc
    model.eval()
    model.config.use_cache = False
    dev = torch.device(device)
    for name, buf in list(model.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = buf.to(dev)
    sm = StreamedModel(
        model,
        tokenizer,
        spec,
        SafetensorsCheckpoint(directory),
        dev,
        DTYPES[dtype],
        getattr(model, "base_model_prefix", ""),
    )
    sm.load_resident()
    sm.load_block(0)
    try:
        check_coverage(model, blocks=[decoder_blocks(model)[0]])  # all blocks alike
    finally:
        sm.free_block(0)
    return sm


class PrunedWriter:
    """Writes a pruned model into ``directory``: a shard per block, then the rest, the index,
    the config and the tokenizer. Counts the zeros of the blocks it writes."""

    def __init__(self, sm: StreamedModel, directory: Path) -> None:
        self.sm = sm
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.total_shards = sm.num_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.sparsity = [0, 0, 0, 0]  # prunable zeros, prunable total, matrix zeros, matrix total

    def _shard(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"model-{number:05d}-of-{self.total_shards:05d}.safetensors"
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tmp = self.directory / f".{name}.tmp"
        save_file(host, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.directory / name)
        self.weight_map.update(dict.fromkeys(tensors, name))

    @torch.no_grad()
    def write_block(self, index: int) -> None:
        block = decoder_blocks(self.sm.model)[index]
        for w in block_matrices(block).values():
            self.sparsity[0] += w.numel() - int(torch.count_nonzero(w))
            self.sparsity[1] += w.numel()
        for p in block_matrix_params(block).values():
            self.sparsity[2] += p.numel() - int(torch.count_nonzero(p))
            self.sparsity[3] += p.numel()
        self._shard(index + 1, self.sm.block_state(index))

    def block_sparsity(self) -> BlockSparsity:
        return BlockSparsity(*self.sparsity)

    def finish(self) -> None:
        """Write the non-block weights, the index, the config and the tokenizer."""
        self._shard(self.total_shards, self.sm.resident_state())
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.sm.model.config.save_pretrained(self.directory)
        self.sm.tokenizer.save_pretrained(self.directory)


def streamed_fingerprint(sm: StreamedModel) -> str:
    """``models.fingerprint`` of a streamed model: the same digest, one block at a time."""
    import hashlib

    from .models import block_weights, digest_weights

    digest = hashlib.sha256()
    for i in range(sm.num_blocks):
        sm.load_block(i)
        try:
            digest_weights(digest, block_weights(sm.model, i))
        finally:
            sm.free_block(i)
    return digest.hexdigest()
