"""Which weights of a decoder block are prunable, for every supported architecture.

A decoder block is pruned matrix by matrix. The prunable matrices of a block are

- every ``nn.Linear`` weight (LLaMA, Mistral, Qwen2/3, Gemma 2, OPT; Phi-3's fused
  ``qkv_proj`` and ``gate_up_proj`` are single linears whose rows are still
  output channels, so Wanda's per-row rule applies unchanged), and
- every expert's slice of a fused expert bank (Mixtral, Qwen3-MoE in current
  transformers keep all experts in 3-D parameters ``gate_up_proj`` [E, 2I, H] and
  ``down_proj`` [E, H, I], used as ``F.linear(x, W[e])``: each ``W[e]`` is an
  (out, in) matrix like a linear weight). Expert ``e``'s slices are named
  ``<bank>.gate_up_proj[e]`` and ``<bank>.down_proj[e]``; their Wanda statistics
  come from the tokens the router sends to expert ``e`` only.

The MoE router (``gate`` next to ``experts``, tiny) stays dense. Any other matrix
in a block (an unknown fused layout, a raw parameter) would stay dense too; a
model whose prunable matrices cover less than ``MIN_COVERAGE`` of its blocks'
matrix weights is refused rather than pruned to a misleading sparsity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError

# Where causal LMs keep their decoder blocks, relative to the *ForCausalLM module.
BLOCK_PATHS: tuple[str, ...] = ("model.layers", "model.decoder.layers")
MIN_COVERAGE = 0.95
SUPPORTED = "LLaMA, Mistral, Qwen2/3, Gemma 2, Phi-3, Mixtral, Qwen3-MoE, OPT"


def blocks_path(model: nn.Module) -> str:
    """The dotted path of the decoder blocks (``model.layers``; OPT: ``model.decoder.layers``)."""
    for path in BLOCK_PATHS:
        node: object = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return path
    raise ModelError(
        f"{type(model).__name__} has no decoder blocks at {' or '.join(BLOCK_PATHS)} (supported: {SUPPORTED})"
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported causal LM, in order."""
    return model.get_submodule(blocks_path(model))


def is_expert_bank(module: nn.Module) -> bool:
    """A fused expert bank in the Mixtral layout: [gate; up] concatenated, (out, in), no biases."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]  # [E, 2I, H] and [E, H, I]
        and gate_up.shape[2] == down.shape[1]
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "has_post_expert_norm", False)
        and callable(getattr(module, "_apply_gate", None))
    )


def expert_banks(block: nn.Module) -> dict[str, nn.Module]:
    """Block-relative name -> fused expert bank, in registration order."""
    return {name: mod for name, mod in block.named_modules() if is_expert_bank(mod)}


def expert_slot_name(bank: str, param: str, expert: int) -> str:
    return f"{bank}.{param}[{expert}]"


def _is_router(block: nn.Module, name: str) -> bool:
    """The gate of a mixture of experts (``<moe>.gate`` next to ``<moe>.experts``)."""
    parent, _, leaf = name.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    return leaf in ("gate", "shared_expert_gate") and hasattr(owner, "experts")


def block_matrices(block: nn.Module) -> dict[str, torch.Tensor]:
    """Block-relative name -> prunable (out, in) weight, in a stable order.

    Linear weights are the parameters' data; expert slices are views into the
    3-D parameter, so writing to them (``masked_fill_``) prunes the model.
    """
    out: dict[str, torch.Tensor] = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and not _is_router(block, name):
            out[name] = mod.weight.data
        elif is_expert_bank(mod):
            for param in ("gate_up_proj", "down_proj"):
                data = getattr(mod, param).data
                for e in range(data.shape[0]):
                    out[expert_slot_name(name, param, e)] = data[e]
    return out


def block_matrix_params(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the block with two or more dimensions (what coverage counts)."""
    return {name: p.data for name, p in block.named_parameters() if p.dim() >= 2}


def _dense_params(block: nn.Module) -> dict[str, int]:
    """Block-relative parameter name -> number of its weights that no prunable slot covers."""
    covered: dict[int, int] = {}
    for w in block_matrices(block).values():
        key = w.untyped_storage().data_ptr()
        covered[key] = covered.get(key, 0) + w.numel()
    dense = {}
    for name, p in block_matrix_params(block).items():
        left = p.numel() - covered.get(p.untyped_storage().data_ptr(), 0)
        if left > 0:
            dense[name] = left
    return dense


@dataclass(frozen=True)
class Coverage:
    """How much of the blocks' matrix weights the prunable slots cover."""

    prunable: int
    total: int
    dense: dict[str, int]  # block-relative parameter name -> weights left dense, summed over blocks

    @property
    def fraction(self) -> float:
        return self.prunable / self.total if self.total else 0.0


def coverage(model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> Coverage:
    """Coverage over ``blocks`` (default: all the model's decoder blocks)."""
    prunable = total = 0
    dense: dict[str, int] = {}
    for block in decoder_blocks(model) if blocks is None else blocks:
        prunable += sum(w.numel() for w in block_matrices(block).values())
        total += sum(p.numel() for p in block_matrix_params(block).values())
        for name, count in _dense_params(block).items():
            dense[name] = dense.get(name, 0) + count
    return Coverage(prunable, total, dense)


def check_coverage(model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> Coverage:
    """Refuse a model whose prunable matrices cover less than ``MIN_COVERAGE`` of its blocks
    (``blocks``: the loaded ones of a streamed model, whose others are on meta)."""
    cov = coverage(model, blocks)
    if cov.fraction < MIN_COVERAGE:
        worst = sorted(cov.dense.items(), key=lambda kv: -kv[1])
        named = ", ".join(f"{n} ({c:,} weights)" for n, c in worst[:6])
        more = f" and {len(worst) - 6} more" if len(worst) > 6 else ""
        raise ModelError(
            f"{type(model).__name__}: only {cov.fraction:.1%} of the decoder blocks' matrix weights are "
            f"prunable (at least {MIN_COVERAGE:.0%} needed); these would stay dense: {named}{more}. "
            f"Supported: nn.Linear layers and fused expert banks in the Mixtral layout ({SUPPORTED})"
        )
    return cov


def routed_expert_inputs(
    bank: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, gate_up_proj input, down_proj input) for every expert, from its routed tokens only.

    ``hidden`` is the bank's input (tokens, H) and ``top_k_index`` (tokens, k) the
    router's choices, exactly as the MoE block hands them to the bank. The
    down_proj input is recomputed with the bank's own gating (``act(gate) * up``,
    before the routing weight scales the output). An expert no token is routed
    to yields empty (0, H) and (0, I) inputs.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    routes = top_k_index.reshape(flat.shape[0], -1)
    for e in range(bank.gate_up_proj.shape[0]):
        x = flat[(routes == e).any(dim=-1)]
        gate_up = nn.functional.linear(x, bank.gate_up_proj[e])
        yield e, x, bank._apply_gate(gate_up)


@dataclass(frozen=True)
class BlockSparsity:
    """Zeros in the decoder blocks: over the prunable slots and over all block matrices.

    ``all_matrices`` counts every parameter with two or more dimensions inside the
    blocks (routers and anything else left dense included), so it is the honest
    figure for "how sparse is the model's decoder"; ``prunable`` is what the
    target sparsity is defined on.
    """

    prunable_zeros: int
    prunable_total: int
    matrix_zeros: int
    matrix_total: int

    @property
    def prunable(self) -> float:
        return self.prunable_zeros / self.prunable_total

    @property
    def all_matrices(self) -> float:
        return self.matrix_zeros / self.matrix_total


@torch.no_grad()
def block_sparsity(model: nn.Module) -> BlockSparsity:
    """Count the zero weights of the decoder blocks (what any party holding the model can report)."""
    pz = pt = mz = mt = 0
    for block in decoder_blocks(model):
        for w in block_matrices(block).values():
            pz += w.numel() - int(torch.count_nonzero(w))
            pt += w.numel()
        for p in block_matrix_params(block).values():
            mz += p.numel() - int(torch.count_nonzero(p))
            mt += p.numel()
    return BlockSparsity(pz, pt, mz, mt)
