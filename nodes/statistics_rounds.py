"""The ``statistics`` strategy over the federation: public parameters and a client's rounds.

The in-process loop is ``fedprune.statistics_run.prune_statistics``; this module
splits it between the processes. Round r is decoder block r:

- server: RoundStart (the block's range in the vote layout, for the final mask, and
  ``vector_length`` = ``BlockLayout.length``) -> the sum of the clients' uint64
  vectors (plain, or SecAgg on 64-bit lanes with ring inputs) -> ``decode_block``
  (impossible sums abort the round) -> ``select_block_masks`` on its own weights ->
  FinalMask;
- client (:class:`StatisticsClient`): clipped per-channel sums of squared inputs of
  block r over its own windows (through the blocks already pruned with the final
  masks) -> ``StatisticsEncoder`` -> upload; after the FinalMask, forward its hidden
  states through the pruned block.

Every party derives each round's fixed-point code (``FixedPoint.derive``) and noise
from the public parameters of the Welcome (:class:`StatisticsParameters`), so that
they agree without another message.

Differential privacy with dropouts: each client adds ``N(0, sigma^2 / t)`` with t
the secure-aggregation threshold, not ``sigma^2 / m``: the server can only unmask a
round with at least t survivors, so every sum it decodes carries at least the
calibrated noise ``N(0, sigma^2)`` (at most ``m / t`` times its variance when nobody
drops). The fixed-point code leaves room for that larger noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedprune.architectures import blocks_path
from fedprune.errors import PrivacyConfigError, StatisticsError
from fedprune.models import Layout, block_weights
from fedprune.propagation import BlockRunner
from fedprune.selection import apply_mask
from fedprune.statistics import (
    ACCOUNTANT,
    BlockLayout,
    ClippedSquareSums,
    DPCalibration,
    DPConfig,
    FixedPoint,
    StatisticsEncoder,
    epsilon_spent,
    select_block_masks,
    window_sensitivity,
)

LANE_BITS = 64
INPUT_BOUND = 2**64 - 1  # ring inputs: any element of Z_(2^64)


@dataclass(frozen=True)
class StatisticsParameters:
    """What every party must agree on before the first statistics round (sent in the Welcome)."""

    clip: float
    max_tokens_per_client: int
    seqlen: int
    members: int
    threshold: int  # the noise share of each client is sigma / sqrt(threshold)
    num_blocks: int
    dp_epsilon: float = 0.0  # 0: no differential privacy
    dp_delta: float = 0.0
    noise_multiplier: float = 0.0  # z = sigma / sensitivity

    @classmethod
    def for_server(
        cls,
        clip: float,
        max_tokens_per_client: int,
        seqlen: int,
        members: int,
        threshold: int,
        num_blocks: int,
        dp: DPCalibration | None,
    ) -> StatisticsParameters:
        """The server's parameters; ``dp``: the noise that meets its (epsilon, delta) over the
        blocks (``calibrate_noise(DPConfig(...), num_blocks)``, computed before serving)."""
        if dp is not None and dp.releases != num_blocks:
            raise ValueError("the DP calibration must be over one release per block")
        return cls(
            clip,
            max_tokens_per_client,
            seqlen,
            members,
            threshold,
            num_blocks,
            dp.epsilon if dp else 0.0,
            dp.delta if dp else 0.0,
            dp.noise_multiplier if dp else 0.0,
        )

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def max_tokens(self) -> int:
        """The pooled token bound N_max: every member at its bound."""
        return self.members * self.max_tokens_per_client

    def sigma(self, block: BlockLayout) -> float:
        """Standard deviation of the calibrated noise of one round (0 without DP)."""
        if not self.dp:
            return 0.0
        return self.noise_multiplier * window_sensitivity(self.clip, self.seqlen, len(block.names))

    def share_std(self, block: BlockLayout) -> float:
        """Each client's noise: any t shares sum to at least N(0, sigma^2) (module docstring)."""
        return DPCalibration.share_std(self.sigma(block), self.threshold)

    def codec(self, block: BlockLayout) -> FixedPoint:
        """The round's fixed-point code, with room for the noise of all m members' shares."""
        pooled_noise = self.share_std(block) * math.sqrt(self.members)
        return FixedPoint.derive(self.clip, self.max_tokens, pooled_noise)

    def to_welcome(self) -> dict:
        return {
            "stats_clip": self.clip,
            "max_tokens_per_client": self.max_tokens_per_client,
            "seqlen": self.seqlen,
            "dp_epsilon": self.dp_epsilon,
            "dp_delta": self.dp_delta,
            "dp_noise_multiplier": self.noise_multiplier,
        }

    @classmethod
    def from_welcome(cls, w, num_blocks: int) -> StatisticsParameters:
        """The parameters a client is told, checked: a server cannot announce (epsilon, delta)
        and send less noise than they need, nor DP without secure aggregation."""
        if not (math.isfinite(w.stats_clip) and w.stats_clip > 0) or w.max_tokens_per_client < 1:
            raise StatisticsError("the server sent no usable statistics clip or token bound")
        params = cls(
            w.stats_clip,
            w.max_tokens_per_client,
            w.seqlen,
            len(w.roster),
            w.threshold if w.mode == "secure" else 1,
            num_blocks,
            w.dp_epsilon,
            w.dp_delta,
            w.dp_noise_multiplier,
        )
        if params.dp or w.dp_epsilon:
            if w.mode != "secure":
                raise PrivacyConfigError(
                    "the server asks for differential privacy with plain aggregation: it would see "
                    "this client's noise share alone; refusing"
                )
            DPConfig(w.dp_epsilon, w.dp_delta)  # a positive epsilon and delta in (0, 1)
            if not (math.isfinite(params.noise_multiplier) and params.noise_multiplier > 0):
                raise PrivacyConfigError("the server announces differential privacy without noise")
            spent = epsilon_spent(params.noise_multiplier, num_blocks, w.dp_delta)
            if spent > w.dp_epsilon * (1 + 1e-6):
                raise PrivacyConfigError(
                    f"the server's noise multiplier {params.noise_multiplier:g} gives epsilon "
                    f"{spent:.3g} over {num_blocks} rounds, more than the announced {w.dp_epsilon:g}"
                )
        return params

    def report(self, layouts: list[BlockLayout]) -> dict:
        """The report's ``statistics`` section (and ``dp`` inside it when enabled)."""
        codecs = [self.codec(b) for b in layouts]
        out = {
            "clip": self.clip,
            "max_tokens_per_client": self.max_tokens_per_client,
            "max_tokens": self.max_tokens,
            "lane_bits": LANE_BITS,
            "scale_bits": sorted({c.scale_bits for c in codecs}),
            "resolution": max(c.resolution for c in codecs),
            "elements_per_block": [b.length for b in layouts],
        }
        if self.dp:
            sigmas = [self.sigma(b) for b in layouts]
            out["dp"] = {
                "epsilon": self.dp_epsilon,
                "delta": self.dp_delta,
                "epsilon_spent": epsilon_spent(self.noise_multiplier, self.num_blocks, self.dp_delta),
                "noise_multiplier": self.noise_multiplier,
                "releases": self.num_blocks,
                "accountant": ACCOUNTANT,
                "per": "client",
                "unit": f"one calibration window of {self.seqlen} tokens of one client (replace-one)",
                "seqlen": self.seqlen,
                "sigma_per_block": sigmas,
                "noise_share_std_per_block": [self.share_std(b) for b in layouts],
                "threshold": self.threshold,
                "assumptions": (
                    "honest-but-curious server not colluding with clients; secure aggregation hides "
                    "each client's noise share; each client adds N(0, sigma^2/t) with t the threshold, "
                    "so every sum the server can unmask (at least t survivors) carries at least "
                    "N(0, sigma^2); the number of windows per client is public"
                ),
            }
        return out


def block_layouts(layout: Layout) -> list[BlockLayout]:
    return [BlockLayout.from_slots(layout.block_slots(b)) for b in range(layout.num_blocks)]


def server_block_masks(model, block: int, pooled, prune_cfg) -> dict[str, torch.Tensor]:
    """Select block ``block``'s masks from the pooled statistics and prune the server's copy."""
    weights = block_weights(model, block)
    masks = select_block_masks(weights, pooled.sq_norm, prune_cfg)
    for name, mask in masks.items():
        apply_mask(weights[name], mask)
    return masks


class StatisticsClient:
    """A client's side of the statistics rounds: its hidden states, kept across rounds."""

    def __init__(
        self, model, windows: torch.Tensor, layout: Layout, params: StatisticsParameters, batch_size: int
    ) -> None:
        self.layout = layout
        self.params = params
        self.tokens = int(windows.shape[0] * windows.shape[1])
        if self.tokens > params.max_tokens_per_client:
            raise StatisticsError(
                f"this client holds {self.tokens} calibration tokens, more than the server's bound of "
                f"{params.max_tokens_per_client} per client; use fewer --nsamples or a shorter --seqlen"
            )
        if params.dp and int(windows.shape[1]) != params.seqlen:
            raise StatisticsError(
                f"differential privacy is calibrated for windows of {params.seqlen} tokens; this "
                f"client uses {int(windows.shape[1])} (--seqlen {params.seqlen})"
            )
        self.prefix = blocks_path(model)
        self.runner = BlockRunner(model, batch_size)
        self.hidden = self.runner.embed(windows)
        self.clip = params.clip

    def vector(self, block: int) -> np.ndarray:
        """This client's encoded statistics of ``block`` (its share of the noise included)."""
        lay = BlockLayout.from_slots(self.layout.block_slots(block))
        clip = self.clip

        def accumulator(columns: int, device: torch.device) -> ClippedSquareSums:
            return ClippedSquareSums(columns, device, clip)

        sums = self.runner.collect_stats(block, self.hidden, accumulator=accumulator)
        full = {f"{self.prefix}.{block}.{name}": s.sums for name, s in sums.items()}
        encoder = StatisticsEncoder(lay, self.params.codec(lay), self.params.share_std(lay))
        return encoder.encode(full, self.tokens)

    def advance(self, block: int) -> None:
        """Forward the hidden states through ``block``, already pruned with its final mask."""
        if block < self.layout.num_blocks - 1:
            self.hidden = self.runner.forward(block, self.hidden)
