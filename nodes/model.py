"""The model as a node process holds it: streamed, one decoder block at a time.

DESIGN: the model is never whole in memory. Server and client load the
skeleton (``fedprune.streaming.load_streamed``: embeddings, final norm and
head) and each pass loads a block from the memory-mapped safetensors files,
uses it, and releases it (writing it out pruned, where an output is asked
for). A checkpoint whose tensor names are not the model's cannot be streamed;
it is loaded whole, with the same interface (blocks always resident, the
pruned model saved at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fedprune.models import Layout, LoadedModel, block_weights, fingerprint, load_model
from fedprune.selection import apply_mask
from fedprune.streaming import (
    BlockSource,
    CheckpointNamesError,
    PrunedWriter,
    StreamedModel,
    load_streamed,
    streamed_fingerprint,
)

from .masks import PackedMask

NodeModel = StreamedModel | LoadedModel


def load_node_model(spec: str, dtype: str, device: str, log: Callable[[str], None]) -> NodeModel:
    try:
        return load_streamed(spec, dtype=dtype, device=device)
    except CheckpointNamesError as exc:
        log(f"{exc}: loading the whole model in memory instead")
        return load_model(spec, dtype=dtype, device=device)


def model_fingerprint(lm: NodeModel) -> bytes:
    """``fedprune.models.fingerprint``, block by block for a streamed model (the same digest)."""
    return bytes.fromhex(streamed_fingerprint(lm) if isinstance(lm, StreamedModel) else fingerprint(lm.model))


def free_resident(lm: NodeModel) -> None:
    """Free the weights outside the blocks (embeddings, final norm, head) of a streamed
    model while only blocks are needed; :func:`load_resident` brings them back."""
    if isinstance(lm, StreamedModel):
        lm.free_resident()


def load_resident(lm: NodeModel) -> None:
    if isinstance(lm, StreamedModel):
        lm.load_resident()


class _Resident:
    """The blocks of a model loaded whole: always there; ``on_release`` still runs."""

    def __init__(self, on_release: Callable[[int], None] | None) -> None:
        self.on_release = on_release

    def load(self, index: int) -> None:
        pass

    def release(self, index: int) -> None:
        if self.on_release is not None:
            self.on_release(index)


def block_source(lm: NodeModel, on_release: Callable[[int], None] | None = None) -> BlockSource:
    """Where the passes get each block from; ``on_release(i)`` runs before block i is freed."""
    if isinstance(lm, StreamedModel):
        return lm.blocks(on_release=on_release)
    return _Resident(on_release)


class _WholeWriter:
    """A model loaded whole, saved whole once every block is pruned."""

    def __init__(self, lm: LoadedModel, directory: Path) -> None:
        self.lm, self.directory = lm, Path(directory)

    def write_block(self, index: int) -> None:
        pass

    def finish(self) -> None:
        self.lm.model.save_pretrained(self.directory, safe_serialization=True)
        self.lm.tokenizer.save_pretrained(self.directory)


def pruned_writer(lm: NodeModel, directory: Path) -> PrunedWriter | _WholeWriter:
    """Writes the pruned model into ``directory``: ``write_block(i)`` as block i is released
    (pass it as ``on_release``), then ``finish()``; ``from_pretrained`` loads the result."""
    if isinstance(lm, StreamedModel):
        return PrunedWriter(lm, directory)
    return _WholeWriter(lm, directory)


@torch.no_grad()
def apply_final_mask(lm: NodeModel, layout: Layout, final: PackedMask, block: int) -> None:
    """Zero the pruned weights of (loaded) block ``block``, one layer at a time."""
    weights = block_weights(lm.model, block)
    for slot in layout.block_slots(block):
        mask = torch.from_numpy(final.get(slot.offset, slot.numel).reshape(slot.shape))
        apply_mask(weights[slot.name], mask)


class MaskedBlocks:
    """The pruned model's blocks without a pruned copy: each block loaded from the source
    with the final mask applied (the server's perplexity after pruning)."""

    def __init__(self, lm: NodeModel, layout: Layout, final: PackedMask) -> None:
        self.lm, self.layout, self.final = lm, layout, final
        self.source = block_source(lm)

    def load(self, index: int) -> None:
        self.source.load(index)
        apply_final_mask(self.lm, self.layout, self.final, index)

    def release(self, index: int) -> None:
        self.source.release(index)
