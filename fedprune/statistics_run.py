"""The ``statistics`` strategy in process: m clients, one summed statistics vector per block.

Per decoder block every client collects the clipped per-channel sums of squared
inputs of every prunable layer over its own tokens (through the blocks already
pruned with the final masks), encodes them with its token count
(``statistics.StatisticsEncoder``), and the vectors are summed by ``vector_sum``
(the plain sum here, the in-process SecAgg round from ``nodes.secure_sum``). The
server decodes and checks the sum, selects the block's masks from its weights
and the pooled statistics, prunes, and the clients propagate to the next block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import blocks_path
from .config import PruneConfig
from .errors import DataError, PrivacyConfigError, PruningConfigError
from .models import block_weights, layout
from .propagation import BlockRunner
from .selection import apply_mask
from .statistics import (
    BlockLayout,
    ClippedSquareSums,
    DPCalibration,
    FixedPoint,
    StatisticsConfig,
    StatisticsEncoder,
    calibrate_noise,
    decode_block,
    select_block_masks,
    window_sensitivity,
)
from .strategies import PruneResult
from .streaming import RESIDENT, BlockSource

VectorSum = Callable[[Sequence[np.ndarray]], np.ndarray]


def plain_vector_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The clients' uint64 vectors summed in the clear, modulo 2^64."""
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        np.add(total, v, out=total)
    return total


@dataclass
class StatisticsResult(PruneResult):
    """A pruning result with what the statistics rounds used and cost."""

    details: dict = field(default_factory=dict)


def prune_statistics(
    model: nn.Module,
    client_windows: Sequence[torch.Tensor],
    config: PruneConfig,
    stats: StatisticsConfig | None = None,
    *,
    vector_sum: VectorSum = plain_vector_sum,
    secure: bool = False,
    progress: bool = True,
    rng: np.random.Generator | None = None,
    blocks: BlockSource = RESIDENT,
    keep_masks: bool = True,
) -> StatisticsResult:
    """Prune ``model`` in place with exact federated Wanda; ``client_windows[c]`` is client c's data.

    ``secure`` says whether ``vector_sum`` hides the individual vectors; differential
    privacy without it is refused (each client's noise share would be seen alone).
    ``rng`` draws the noise shares (tests); by default each client seeds from the OS.
    ``blocks`` and ``keep_masks`` are those of ``strategies.prune`` (a streamed model
    loads each block before its round and writes it out pruned after).
    """
    stats = stats or StatisticsConfig()
    if stats.dp is not None and not secure:
        raise PrivacyConfigError(
            "differential privacy with plain aggregation would show the server each client's noise "
            "share (1/m of the noise); use secure aggregation"
        )
    if config.weight_scaling:
        raise PruningConfigError("weight scaling needs vote counts; the statistics strategy has none")
    seqlens = {int(w.shape[1]) for w in client_windows}
    if len(seqlens) != 1 or any(len(w) == 0 for w in client_windows):
        raise DataError("the statistics strategy needs every client to hold windows of one length")
    seqlen = seqlens.pop()
    num_clients = len(client_windows)
    max_tokens = sum(len(w) for w in client_windows) * seqlen
    slots = layout(model)
    calibration: DPCalibration | None = calibrate_noise(stats.dp, slots.num_blocks) if stats.dp else None

    timings = {"calibration": 0.0, "encoding": 0.0, "aggregation": 0.0, "selection": 0.0}
    start = time.perf_counter()
    runners = [BlockRunner(model, config.batch_size) for _ in client_windows]
    hidden = [runner.embed(w) for runner, w in zip(runners, client_windows, strict=True)]
    prefix = blocks_path(model)

    def accumulator(columns: int, device: torch.device) -> ClippedSquareSums:
        return ClippedSquareSums(columns, device, stats.clip)

    final_masks: dict[str, torch.Tensor] = {}
    pruned_counts: dict[str, tuple[int, int]] = {}
    per_block: list[dict] = []
    clipped_tokens = clamped = 0
    for i in tqdm(range(slots.num_blocks), desc="statistics pruning", unit="block", disable=not progress):
        blocks.load(i)
        block_layout = BlockLayout.from_slots(slots.block_slots(i))
        sigma = 0.0
        if calibration is not None:
            sigma = calibration.sigma(window_sensitivity(stats.clip, seqlen, len(block_layout.names)))
        codec = FixedPoint.derive(stats.clip, max_tokens, sigma, stats.noise_tail)
        share = DPCalibration.share_std(sigma, num_clients) if sigma else 0.0
        vectors = []
        for runner, h in zip(runners, hidden, strict=True):
            t0 = time.perf_counter()
            sums = runner.collect_stats(i, h, accumulator=accumulator)
            timings["calibration"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            clipped_tokens += sum(s.clipped_tokens for s in sums.values())
            full = {f"{prefix}.{i}.{name}": s.sums for name, s in sums.items()}
            encoder = StatisticsEncoder(block_layout, codec, share, rng)
            vectors.append(encoder.encode(full, int(h.shape[0] * h.shape[1])))
            timings["encoding"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        total = vector_sum(vectors)
        timings["aggregation"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pooled = decode_block(total, block_layout, codec, num_clients)
        clamped += pooled.clamped
        weights = block_weights(model, i)
        masks = select_block_masks(weights, pooled.sq_norm, config)
        for name, mask in masks.items():
            apply_mask(weights[name], mask)
            pruned_counts[name] = (int(torch.count_nonzero(mask)), mask.numel())
            if keep_masks:
                final_masks[name] = mask.cpu()
        timings["selection"] += time.perf_counter() - t0
        per_block.append({"scale_bits": codec.scale_bits, "sigma": sigma, "elements": block_layout.length})
        if i < slots.num_blocks - 1:
            t0 = time.perf_counter()
            hidden = [runner.forward(i, h) for runner, h in zip(runners, hidden, strict=True)]
            timings["calibration"] += time.perf_counter() - t0
        blocks.release(i)
    timings["prune_total"] = time.perf_counter() - start
    details = {
        "aggregation": "secure" if secure else "plain",
        "clip": stats.clip,
        "max_tokens": max_tokens,
        "scale_bits": sorted({b["scale_bits"] for b in per_block}),
        "resolution": max(2.0 ** -b["scale_bits"] for b in per_block),
        "elements_per_block": [b["elements"] for b in per_block],
        "bytes_per_client_per_round": [8 * b["elements"] for b in per_block],
        "bytes_per_client": 8 * sum(b["elements"] for b in per_block),
        "rounds": len(per_block),
        # Simulation diagnostics summed over all clients (a federation's server sees neither).
        "clipped_tokens_all_layers": clipped_tokens,
        "clamped_elements": clamped,
    }
    if calibration is not None:
        details["dp"] = {
            **calibration.report(),
            "clip": stats.clip,
            "seqlen": seqlen,
            "sigma_per_block": [b["sigma"] for b in per_block],
            "noise_share_std_per_block": [
                DPCalibration.share_std(b["sigma"], num_clients) for b in per_block
            ],
            "assumptions": "honest-but-curious server not colluding with clients; secure aggregation "
            "hides each client's noise share; every client contributes to every round",
        }
    return StatisticsResult(final_masks, num_clients, timings, pruned_counts, details)
