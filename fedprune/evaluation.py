"""Perplexity on non-overlapping windows of a test text (the reference's protocol)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(summed next-token NLL / number of predicted tokens) over the given windows."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
