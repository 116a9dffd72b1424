"""Model loading, the prunable-layer layout, and the model fingerprint.

Every party (server and clients) derives the same layout from the same model:
the ordered list of prunable weights (every ``nn.Linear`` inside the decoder
blocks, and each expert's slice of a fused MoE expert bank; embeddings and
``lm_head`` excluded; see ``architectures``) with their offsets in the flat
mask vector that the network carries. The fingerprint is a SHA-256 over those
weights in layout order, so that parties can prove they hold the same model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .architectures import block_matrices, blocks_path, check_coverage, decoder_blocks
from .assets import SMOLLM2_GGUF, cache_dir, cache_lock, fetch_asset
from .errors import ModelError

EMBEDDED_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class LayerSlot:
    """One prunable weight: its module name, shape and place in the flat vector."""

    name: str
    block: int
    shape: tuple[int, int]
    offset: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Layout:
    """The ordered vector layout of all prunable weights (the network's manifest)."""

    slots: tuple[LayerSlot, ...]

    @property
    def total(self) -> int:
        last = self.slots[-1]
        return last.offset + last.numel

    @property
    def num_blocks(self) -> int:
        return self.slots[-1].block + 1

    @classmethod
    def from_shapes(cls, entries: Iterable[tuple[str, int, tuple[int, int]]]) -> Layout:
        """The layout of ``(name, block, shape)`` entries laid end to end, in the given order."""
        slots: list[LayerSlot] = []
        offset = 0
        for name, block, (rows, cols) in entries:
            slots.append(LayerSlot(name, block, (rows, cols), offset))
            offset += rows * cols
        return cls(tuple(slots))

    def block_slots(self, block: int) -> tuple[LayerSlot, ...]:
        return tuple(s for s in self.slots if s.block == block)

    def block_range(self, block: int) -> tuple[int, int]:
        """(offset, length) of decoder block ``block``'s part of the flat vector."""
        slots = self.block_slots(block)
        return slots[0].offset, sum(s.numel for s in slots)

    def slots_in(self, offset: int, length: int) -> tuple[LayerSlot, ...]:
        """The slots that start in ``[offset, offset + length)``, in layout order."""
        return tuple(s for s in self.slots if offset <= s.offset < offset + length)

    def flatten(
        self, tensors: Mapping[str, torch.Tensor], slots: Sequence[LayerSlot] | None = None
    ) -> np.ndarray:
        """The tensors of ``slots`` (default: every slot) as one host vector, in layout order.

        Tensors may live on any device; each is copied to the host before numpy sees it.
        """
        parts = [tensors[s.name].flatten().cpu().numpy() for s in (self.slots if slots is None else slots)]
        return np.concatenate(parts)

    def unflatten(self, vector: np.ndarray, offset: int = 0) -> dict[str, np.ndarray]:
        """Slot name -> 2-D view of ``vector``, which holds elements ``[offset, offset + len(vector))``.

        Every slot in that range must lie wholly inside it (a round never cuts a layer).
        """
        out = {}
        for s in self.slots_in(offset, len(vector)):
            start = s.offset - offset
            if start + s.numel > len(vector):
                raise ValueError(f"the range [{offset}, {offset + len(vector)}) cuts slot {s.name}")
            out[s.name] = vector[start : start + s.numel].reshape(s.shape)
        return out

    def to_json(self) -> list[dict]:
        return [
            {"name": s.name, "block": s.block, "shape": list(s.shape), "offset": s.offset} for s in self.slots
        ]


def block_weights(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Full slot name -> prunable 2-D weight of decoder block ``index`` (views for experts)."""
    prefix = f"{blocks_path(model)}.{index}."
    return {prefix + name: w for name, w in block_matrices(decoder_blocks(model)[index]).items()}


def layout(model: nn.Module) -> Layout:
    """Derive the stable vector layout of all prunable weights.

    Refuses (``ModelError``) a model whose prunable weights cover too little of
    its decoder blocks (see ``architectures.check_coverage``).
    """
    check_coverage(model)
    return Layout.from_shapes(
        (name, i, tuple(weight.shape))
        for i in range(len(decoder_blocks(model)))
        for name, weight in block_weights(model, i).items()
    )


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> 2-D weight data for every slot of the layout, in layout order.

    Expert slots are views into the fused 3-D parameter, so in-place writes
    (``masked_fill_``, ``copy_``) reach the model.
    """
    out: dict[str, torch.Tensor] = {}
    for i in range(len(decoder_blocks(model))):
        out.update(block_weights(model, i))
    return out


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the prunable weights (name, dtype, shape, raw bytes) in layout order."""
    digest = hashlib.sha256()
    digest_weights(digest, prunable_weights(model))
    return digest.hexdigest()


def digest_weights(digest, weights: dict[str, torch.Tensor]) -> None:
    """Feed (name, dtype, shape, raw bytes) of each weight to a running hash (``fingerprint``)."""
    for name, weight in weights.items():
        w = weight.detach().to("cpu").contiguous()
        digest.update(f"{name}|{w.dtype}|{tuple(w.shape)}\n".encode())
        digest.update(w.view(torch.uint8).numpy().tobytes())


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the spec it came from."""

    model: nn.Module
    tokenizer: object
    spec: str

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _embedded_hf_dir() -> Path:
    """The embedded GGUF converted once to a float32 safetensors directory (fast reloads)."""
    converted = cache_dir() / SMOLLM2_GGUF.name / "hf-float32"
    if (converted / "config.json").exists():
        return converted
    gguf_path = fetch_asset(SMOLLM2_GGUF)
    with cache_lock(SMOLLM2_GGUF.name):
        if not (converted / "config.json").exists():
            _convert_gguf(gguf_path, converted)
    return converted


def gguf_safetensors_dir(gguf_path: Path) -> Path:
    """A GGUF file converted once to a float32 safetensors directory, cached by the
    file's path, size and modification time (the streamed passes read safetensors)."""
    if gguf_path.resolve() == fetch_asset(SMOLLM2_GGUF).resolve():
        return _embedded_hf_dir()
    stat = gguf_path.stat()
    tag = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    converted = cache_dir() / "gguf" / f"{gguf_path.stem}-{tag[:16]}"
    if (converted / "config.json").exists():
        return converted
    converted.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(f"gguf-{tag[:16]}"):
        if not (converted / "config.json").exists():
            try:
                _convert_gguf(gguf_path, converted)
            except _LOAD_ERRORS as exc:
                raise ModelError(
                    f"cannot convert GGUF {gguf_path}: {' '.join(str(exc).split())[:300]}"
                ) from exc
    return converted


def _convert_gguf(gguf_path: Path, converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _drop_quantizer(model)
    tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".hf-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, converted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model is dequantized but still flagged as quantized; unflag it."""
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def resolve_spec(spec: str) -> tuple[str, dict]:
    """Map a model spec to (from_pretrained path or id, extra kwargs)."""
    if spec == EMBEDDED_MODEL:
        return str(_embedded_hf_dir()), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec} is a directory without config.json (not a model directory)")
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"unknown model spec {spec!r}: use {EMBEDDED_MODEL!r}, a hub id (org/name), "
            "a local model directory, or a .gguf file"
        )
    return spec, {}  # a hub id; needs network unless already in the HF cache


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a broken model file or config (GGUF parser, config checks)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, struct.error)
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    return errors


_LOAD_ERRORS = _load_errors()


def check_device(dtype: str, device: str) -> None:
    """Refuse an unknown dtype or device, or CUDA without a GPU (``ModelError``)."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}; choose cpu or cuda")


def load_model(spec: str, dtype: str = "float32", device: Device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (embedded name, hub id, dir, .gguf)."""
    check_device(dtype, device)
    source, extra = resolve_spec(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except _LOAD_ERRORS as exc:  # an unreadable file the user named: not a bug of ours
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = reason if len(reason) <= 300 else reason[:299] + "…"
        raise ModelError(f"cannot load model {spec!r}: {reason}") from exc
    if "gguf_file" in extra:
        _drop_quantizer(model)
    model.to(device)
    model.eval()
    model.config.use_cache = False
    check_coverage(model)  # fail early with a clear message
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)
