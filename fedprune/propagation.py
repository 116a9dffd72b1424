"""Block-by-block calibration forward passes (the Wanda / FedPrLLM sequential scheme).

Calibration windows are embedded once (captured at the input of block 0), then
each decoder block is run twice per client: once with forward hooks that
collect input-norm statistics for every linear layer, and once (after the
block's mask is chosen) to produce the inputs of the next block, so that
activations flow through already-pruned blocks. Windows are processed in
batches; the statistics are a per-sequence running mean, so the batch size
does not change them beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import StatsMode
from .models import block_linears, decoder_blocks
from .wanda import InputNormStats


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its input and keyword arguments, then stops."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        if hasattr(block, "attention_type"):  # Mistral/Qwen2 pick masks by this attribute
            self.attention_type = block.attention_type
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict | None = None

    def forward(self, *args, **kwargs):
        self.hidden = args[0] if args else kwargs.pop("hidden_states")
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        raise _StopForward


class BlockRunner:
    """Runs calibration activations through one decoder block at a time."""

    def __init__(self, model: nn.Module, batch_size: int = 8) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.batch_size = batch_size
        self.block_kwargs: dict | None = None
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for every window: (n, seqlen, hidden)."""
        catcher = _Catcher(self.blocks[0])
        self.blocks[0] = catcher
        outputs = []
        try:
            for batch in windows.split(self.batch_size):
                try:
                    self.model(batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
                outputs.append(catcher.hidden)
                if self.block_kwargs is None:
                    self.block_kwargs = catcher.kwargs
        finally:
            self.blocks[0] = catcher.block
        return torch.cat(outputs)

    def _run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        outs = []
        for batch in hidden.split(self.batch_size):
            out = block(batch, **(self.block_kwargs or {}))
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    @torch.no_grad()
    def collect_stats(
        self, index: int, hidden: torch.Tensor, mode: StatsMode = "batched"
    ) -> dict[str, InputNormStats]:
        """Input-norm statistics of every linear layer of block ``index`` on these inputs.

        Pre-hooks record each linear's input; once every linear of the block has
        seen the batch the pass stops, so the last matmul (down_proj in LLaMA)
        and the rest of the block are never computed: their output is not needed.
        """
        block = self.blocks[index]
        linears = block_linears(block)
        stats = {name: InputNormStats(mod.in_features, self.device, mode) for name, mod in linears.items()}
        seen: set[str] = set()

        def record(name: str, inputs: tuple) -> None:
            stats[name].add_batch(inputs[0])
            seen.add(name)
            if len(seen) == len(linears):
                raise _StopForward

        handles = [
            mod.register_forward_pre_hook(lambda _m, inp, n=name: record(n, inp))
            for name, mod in linears.items()
        ]
        try:
            for batch in hidden.split(self.batch_size):
                seen.clear()
                try:
                    block(batch, **(self.block_kwargs or {}))
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def forward(
        self, index: int, hidden: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Outputs of block ``index``; ``masks`` (name -> prune mask) apply only for this call."""
        block = self.blocks[index]
        linears = block_linears(block)
        dense = {}
        for name, mask in (masks or {}).items():
            dense[name] = linears[name].weight.data
            linears[name].weight.data = dense[name].masked_fill(mask, 0)
        try:
            return self._run(block, hidden)
        finally:
            for name, weight in dense.items():
                linears[name].weight.data = weight
