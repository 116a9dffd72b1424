"""Perplexity on non-overlapping windows of a test text (the reference's protocol).

With a ``BlockSource`` (a streamed model), all windows go through block 0, then
block 1, and so on, one block in memory at a time; the final norm and the head
then run batch by batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import decoder_blocks
from .propagation import BlockRunner
from .streaming import BlockSource


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
    blocks: BlockSource | None = None,
) -> float:
    """exp(summed next-token NLL / number of predicted tokens) over the given windows."""
    batches = windows.split(batch_size)
    if blocks is None:
        device = next(model.parameters()).device
        logits = (model(b.to(device), use_cache=False).logits for b in batches)
    else:
        runner = BlockRunner(model, batch_size)
        hidden = runner.embed(windows)
        for i in tqdm(range(len(runner.blocks)), desc=desc, unit="block", disable=not progress):
            blocks.load(i)
            try:
                hidden = runner.forward(i, hidden)
            finally:
                blocks.release(i)
        device = runner.device
        states = hidden.split(batch_size)
        logits = (_head_logits(model, b.to(device), h) for b, h in zip(batches, states, strict=True))
    total_nll, total_tokens = 0.0, 0
    for batch, batch_logits in tqdm(
        zip(batches, logits, strict=True), desc=desc, unit="batch", disable=not progress or blocks is not None
    ):
        nll, tokens = _nll(batch_logits, batch.to(device))
        total_nll += nll
        total_tokens += tokens
    return math.exp(total_nll / total_tokens)


def _nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return nll.item(), targets.numel()


class _Replay(nn.Module):
    """Stands in for a decoder block: the first returns the given final hidden states,
    the others pass theirs on, so the model's own tail (final norm, head, soft-capping) runs."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.block = block
        self.hidden = hidden
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, *args, **kwargs):
        return self.hidden if self.hidden is not None else (args[0] if args else kwargs["hidden_states"])


def _head_logits(model: nn.Module, batch: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    blocks = decoder_blocks(model)
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Replay(block, hidden if i == 0 else None)
        return model(batch, use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
