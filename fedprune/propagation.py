"""Block-by-block calibration forward passes (the Wanda / FedPrLLM sequential scheme).

Calibration windows are embedded once (captured at the input of block 0), then
each decoder block is run twice per client: once with forward hooks that
collect input-norm statistics for every linear layer, and once (after the
block's mask is chosen) to produce the inputs of the next block, so that
activations flow through already-pruned blocks. Windows are processed in
batches; the statistics are a per-sequence running mean, so the batch size
does not change them beyond float rounding. Fused MoE expert banks are
statistics-collected per expert from the tokens routed to each expert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .architectures import (
    block_matrices,
    decoder_blocks,
    expert_banks,
    expert_slot_name,
    routed_expert_inputs,
)
from .config import StatsMode
from .selection import apply_mask
from .wanda import InputNormStats


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for one block: records its input and keyword arguments.

    A catcher stands in for every block at once, passing its input on unchanged,
    so that each block's own arguments are recorded (Gemma 2 and Qwen2/3 give
    sliding-window and full-attention layers different masks); the last one
    stops the forward pass.
    """

    def __init__(self, block: nn.Module, last: bool) -> None:
        super().__init__()
        self.block = block
        self.last = last
        if hasattr(block, "attention_type"):  # some models pick masks by this attribute
            self.attention_type = block.attention_type
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict | None = None

    def forward(self, *args, **kwargs):
        self.hidden = args[0] if args else kwargs.pop("hidden_states")
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        if self.last:
            raise _StopForward
        return self.hidden


class BlockRunner:
    """Runs calibration activations through one decoder block at a time."""

    def __init__(self, model: nn.Module, batch_size: int = 8) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.batch_size = batch_size
        # Keyword arguments the model passes to each block (masks, position embeddings),
        # by (block, batch size): an eager-attention mask has a batch dimension, and the
        # last batch may be smaller than the others.
        self.block_kwargs: dict[tuple[int, int], dict] = {}
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for every window: (n, seqlen, hidden)."""
        last = len(self.blocks) - 1
        catchers = [_Catcher(block, last=i == last) for i, block in enumerate(self.blocks)]
        for i, catcher in enumerate(catchers):
            self.blocks[i] = catcher
        outputs = []
        try:
            for batch in windows.split(self.batch_size):
                try:
                    self.model(batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
                outputs.append(catchers[0].hidden)
                for i, catcher in enumerate(catchers):
                    self.block_kwargs.setdefault((i, len(batch)), catcher.kwargs)
        finally:
            for i, catcher in enumerate(catchers):
                self.blocks[i] = catcher.block
        return torch.cat(outputs)

    def _run(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        outs = []
        for batch in hidden.split(self.batch_size):
            out = self.blocks[index](batch, **self.block_kwargs[index, len(batch)])
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    @torch.no_grad()
    def collect_stats(
        self,
        index: int,
        hidden: torch.Tensor,
        mode: StatsMode = "batched",
        accumulator: Callable[[int, torch.device], Any] | None = None,
    ) -> dict[str, InputNormStats]:
        """Input-norm statistics of every prunable matrix of block ``index`` on these inputs.

        Pre-hooks record each linear's input, and each fused expert bank's
        routed inputs per expert (``routed_expert_inputs``: an expert's statistics
        see only the tokens routed to it, averaged over all calibration
        sequences). Once every hooked module has seen the batch the pass stops,
        so the last matmul (down_proj in LLaMA, the experts in a MoE) and the rest
        of the block are never computed: their output is not needed.

        ``accumulator(columns, device)`` replaces ``InputNormStats`` by any object with
        the same ``add_batch`` (the statistics strategy's clipped sums).
        """
        block = self.blocks[index]
        matrices = block_matrices(block)
        make = accumulator or (lambda columns, device: InputNormStats(columns, device, mode))
        stats = {name: make(w.shape[1], self.device) for name, w in matrices.items()}
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n in matrices}
        banks = expert_banks(block)
        seen: set[str] = set()
        sequences = 0  # calibration sequences in the current batch

        def done(name: str) -> None:
            seen.add(name)
            if len(seen) == len(linears) + len(banks):
                raise _StopForward

        def record_linear(name: str, args: tuple) -> None:
            stats[name].add_batch(args[0])
            done(name)

        def record_bank(name: str, bank: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            for e, x_gate_up, x_down in routed_expert_inputs(bank, hidden_in, top_k_index):
                stats[expert_slot_name(name, "gate_up_proj", e)].add_batch(x_gate_up, sequences=sequences)
                stats[expert_slot_name(name, "down_proj", e)].add_batch(x_down, sequences=sequences)
            done(name)

        handles = [
            mod.register_forward_pre_hook(lambda _m, args, n=name: record_linear(n, args))
            for name, mod in linears.items()
        ] + [
            bank.register_forward_pre_hook(
                lambda m, args, kwargs, n=name: record_bank(n, m, args, kwargs), with_kwargs=True
            )
            for name, bank in banks.items()
        ]
        try:
            for batch in hidden.split(self.batch_size):
                seen.clear()
                sequences = batch.shape[0]
                try:
                    block(batch, **self.block_kwargs[index, len(batch)])
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
        matrices = block_matrices(self.blocks[index])
        dense = {}
        try:
            for name, mask in (masks or {}).items():
                dense[name] = matrices[name].clone()
                apply_mask(matrices[name], mask)
            return self._run(index, hidden)
        finally:
            for name, weight in dense.items():
                matrices[name].copy_(weight)
