"""Exact federated Wanda from securely summed activation statistics (the ``statistics`` strategy).

Wanda's score ``|W_ij| * ||X_j||_2`` needs, per linear layer, only the per-channel
sums of squared inputs over the calibration tokens. If every client sends its own
sums (and its token count) through secure aggregation, the server learns only the
pooled sums and computes the centralized Wanda mask on the pooled data exactly,
block by block (one round per decoder block): it never sees a client's statistics,
masks or activations, and it receives ``in_features`` numbers per layer instead of
one vote per weight.

Vector format (one round per block; what the gRPC federation carries)
---------------------------------------------------------------------
One ``np.uint64`` vector per client and block, summed lane-wise in Z_(2^64)
(secagg 64-bit lanes with ring inputs, ``input_bound = 2^64 - 1``)::

    [ layer 0: in_features_0 elements | layer 1: ... | ... | token count ]

- Layers in the block's layout order (``models.layout(model).block_slots(b)``, the
  same slots and names as the vote vector); ``BlockLayout`` holds names and widths.
- Layer element ``j``: ``round(s_j * 2^f)`` as a two's-complement int64, where
  ``s_j = sum over this client's tokens of min(1, C / ||x_t^2||_2) * x_tj^2`` (the
  clipped squared input of channel j), plus, with differential privacy, this client's
  rounded share of the Gaussian noise. ``f`` (``FixedPoint.scale_bits``) is agreed
  before the round from public numbers: the clip ``C``, a bound on the pooled token
  count, and the noise scale (``FixedPoint.derive``).
- Last element: the client's token count (windows x seqlen), an unsigned integer,
  never noised (the number of windows per client is public, see below).

The server decodes the sum as signed int64 (``decode_block``), checks every element
against what honest clients can produce, and turns the sums into per-token means
(``PooledStatistics.sq_norm``), from which ``select_block_masks`` computes the
block's masks with Wanda's per-row rule (or a layer/column group, or N:M) on its
own weights. Clients apply the broadcast mask and propagate to the next block.

Clip and resolution
-------------------
``C`` bounds each token's vector of squared inputs to one layer in L2 norm
(``||x_t^2||_2 = sqrt(sum_j x_tj^4) <= C``; a larger one is scaled down, which for a
single channel means ``x_tj^2 <= C``). The default ``2^32`` exceeds what any
float16 activation can reach (``65504^2``), so nothing is clipped and the masks are
exact. The pooled sum of every element is then at most ``N * C`` for ``N`` pooled
tokens; the scale ``2^f`` is the largest power of two with
``(N_max * C + tail * sigma) * 2^f <= 2^62``, which leaves a factor of two before
the signed range of int64, so no honest sum can wrap. The resolution of a pooled
sum is ``2^-f`` (plus one half unit per client from rounding): masks can differ
from the centralized ones only between weights whose scores are that close.

Differential privacy (optional)
-------------------------------
Unit of privacy: one calibration window of ``seqlen`` tokens of one client, under
replace-one (the number of windows each client holds is public). A window
contributes at most ``seqlen * C`` in L2 norm to each layer's sums, so replacing it
moves a block's vector (S layers) by at most ``sqrt(2) * seqlen * C * sqrt(S)``
(two non-negative vectors of that norm). Each round is a Gaussian mechanism with
noise ``sigma = z * sensitivity`` on every element; the ``num_blocks`` rounds are
composed (adaptively) with the RDP accountant of Google's ``dp-accounting`` and
``z`` is the smallest that meets the target (epsilon, delta). Distributed noise:
each of the m clients adds ``N(0, sigma^2 / m)`` (rounded to the fixed-point grid),
so the sum carries ``N(0, sigma^2)``; decoded sums are clamped at 0 before the
square root. Assumptions: an honest-but-curious server that does not collude with
clients; secure aggregation hides the individual noise shares (DP with plain
aggregation is refused: each share alone is m times too small); all m clients
contribute (a dropout lowers the noise); the fixed-point rounding of the noise is
treated as negligible (its grid is far finer than sigma); numpy's generator is
not a cryptographic one (floating-point sampling attacks are out of scope).
The guarantee, (epsilon, delta) per client for each of its windows, holds against
the server and every party that sees the masks (post-processing).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import PruneConfig
from .errors import PrivacyConfigError, PruningConfigError, StatisticsError
from .models import LayerSlot
from .wanda import local_mask, smallest_per_row, wanda_scores

DEFAULT_CLIP = 2.0**32  # above 65504^2: no float16 activation is ever clipped
HEADROOM = 2**62  # every honest decoded sum stays below this in absolute value
DEFAULT_NOISE_TAIL = 10.0  # bound checks allow noise up to this many standard deviations
ACCOUNTANT = "RDP (dp-accounting), replace-one"


@dataclass(frozen=True)
class DPConfig:
    """Target (epsilon, delta) per client, over all blocks of one pruning run."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyConfigError(f"epsilon must be a positive number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class StatisticsConfig:
    """The statistics strategy's settings: the clip C (module docstring) and optional DP."""

    clip: float = DEFAULT_CLIP
    dp: DPConfig | None = None
    noise_tail: float = DEFAULT_NOISE_TAIL

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise PrivacyConfigError(f"the statistics clip must be a positive number, got {self.clip}")
        if not self.noise_tail > 0:
            raise PrivacyConfigError("the noise tail must be positive")


@dataclass(frozen=True)
class BlockLayout:
    """Which layer occupies which elements of a block's statistics vector."""

    block: int
    names: tuple[str, ...]  # full slot names, in layout order
    widths: tuple[int, ...]  # in_features of each

    @classmethod
    def from_slots(cls, slots: Sequence[LayerSlot]) -> BlockLayout:
        if not slots:
            raise StatisticsError("a block without prunable layers has no statistics")
        return cls(slots[0].block, tuple(s.name for s in slots), tuple(s.shape[1] for s in slots))

    @property
    def length(self) -> int:
        """Elements of the vector: every layer's channels and the token count."""
        return sum(self.widths) + 1

    def spans(self) -> list[tuple[str, int, int]]:
        out, start = [], 0
        for name, width in zip(self.names, self.widths, strict=True):
            out.append((name, start, start + width))
            start += width
        return out


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point code of one round: value ``v`` is ``round(v * 2^scale_bits)`` in int64."""

    clip: float
    max_tokens: int  # bound on the pooled token count (all clients together)
    scale_bits: int
    noise_std: float = 0.0  # standard deviation of the pooled noise per element (real units)
    noise_tail: float = DEFAULT_NOISE_TAIL

    @classmethod
    def derive(
        cls, clip: float, max_tokens: int, noise_std: float = 0.0, noise_tail: float = DEFAULT_NOISE_TAIL
    ) -> FixedPoint:
        """The finest scale at which ``max_tokens`` clipped tokens plus the noise tail fit 2^62."""
        if max_tokens < 1:
            raise StatisticsError("the token bound must be at least 1")
        bound = max_tokens * clip + noise_tail * noise_std
        scale_bits = math.floor(math.log2(HEADROOM / bound))
        while math.ldexp(bound, scale_bits) > HEADROOM:  # log2 rounding at the edge
            scale_bits -= 1
        return cls(clip, max_tokens, scale_bits, noise_std, noise_tail)

    @property
    def resolution(self) -> float:
        """The smallest step of a decoded sum (squared input units)."""
        return math.ldexp(1.0, -self.scale_bits)

    def encode(self, values: np.ndarray) -> np.ndarray:
        return np.rint(np.ldexp(np.asarray(values, dtype=np.float64), self.scale_bits)).astype(np.int64)

    def bounds(self, tokens: int, contributors: int) -> tuple[int, int]:
        """[lo, hi] of an honest decoded sum over ``tokens`` pooled tokens (fixed-point units).

        Each client rounds once (half a unit); with noise, ``noise_tail`` standard
        deviations are allowed either side.
        """
        slack = contributors + math.ldexp(self.noise_tail * self.noise_std, self.scale_bits)
        return -math.ceil(slack if self.noise_std else 0), math.ceil(
            math.ldexp(tokens * self.clip, self.scale_bits) + slack
        )


# -- client side ------------------------------------------------------------------------------


class ClippedSquareSums:
    """One layer's per-channel sum of clipped squared inputs over a client's tokens.

    A drop-in accumulator for ``BlockRunner.collect_stats`` (same ``add_batch``): every
    token's vector of squared inputs is scaled down to L2 norm ``clip`` if longer.
    Sums are kept in float64 (the squares in float32, as Wanda's own statistics).
    """

    def __init__(self, columns: int, device: torch.device, clip: float) -> None:
        self.sums = torch.zeros(columns, dtype=torch.float64, device=device)
        self.clip = clip
        self.clipped_tokens = 0

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        squares = inputs.reshape(-1, inputs.shape[-1]).float().pow(2)
        norms = torch.linalg.vector_norm(squares, dim=1)
        over = norms > self.clip
        if bool(over.any()):
            self.clipped_tokens += int(over.sum())
            squares[over] *= (self.clip / norms[over]).unsqueeze(1)
        self.sums += squares.sum(dim=0, dtype=torch.float64)


class StatisticsEncoder:
    """A client's side of one round: its sums and token count as one uint64 vector.

    ``noise_std`` is this client's share of the noise (``DPCalibration.share_std``);
    ``rng`` draws it (default: seeded from the operating system).
    """

    def __init__(
        self,
        layout: BlockLayout,
        codec: FixedPoint,
        noise_std: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.layout = layout
        self.codec = codec
        self.noise_std = noise_std
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))

    def encode(self, sums: Mapping[str, torch.Tensor | np.ndarray], tokens: int) -> np.ndarray:
        if set(sums) != set(self.layout.names):
            raise StatisticsError(f"statistics for block {self.layout.block} do not match its layers")
        if not 0 < tokens <= self.codec.max_tokens:
            raise StatisticsError(f"{tokens} tokens outside (0, {self.codec.max_tokens}]")
        parts = []
        for name, width in zip(self.layout.names, self.layout.widths, strict=True):
            value = sums[name]
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if value.shape != (width,):
                raise StatisticsError(f"{name}: {value.shape} statistics for {width} input channels")
            parts.append(value.astype(np.float64))
        flat = np.concatenate(parts)
        if flat.min() < 0 or flat.max() > tokens * self.codec.clip * (1 + 1e-6):
            raise StatisticsError("statistics outside [0, tokens x clip]: they were not clipped")
        encoded = self.codec.encode(flat)
        if self.noise_std > 0:
            encoded += self.codec.encode(self.rng.normal(0.0, self.noise_std, flat.shape))
        out = np.empty(self.layout.length, dtype=np.uint64)
        out[:-1] = encoded.view(np.uint64)
        out[-1] = tokens
        return out


# -- server side ------------------------------------------------------------------------------


@dataclass
class PooledStatistics:
    """What the server learns from one round: pooled per-token means of squared inputs."""

    tokens: int
    sq_norm: dict[str, torch.Tensor]  # name -> (in_features,) float32, clamped at 0
    clamped: int  # elements that decoded below 0 (noise) and were clamped


def decode_block(
    total: np.ndarray, layout: BlockLayout, codec: FixedPoint, contributors: int
) -> PooledStatistics:
    """Decode the summed vector of one block; raise :class:`StatisticsError` if impossible.

    Impossible: a wrong length, a pooled token count of 0 or above the agreed bound, or
    any element outside what ``contributors`` honest clients can produce with that many
    tokens (negative without noise, above ``tokens * clip``, beyond the noise tail).
    """
    total = np.asarray(total)
    if total.dtype != np.uint64 or total.shape != (layout.length,):
        raise StatisticsError(
            f"block {layout.block}: expected {layout.length} uint64 elements, got {total.dtype} {total.shape}"
        )
    tokens = int(total[-1])
    if not 0 < tokens <= codec.max_tokens:
        raise StatisticsError(
            f"block {layout.block}: the pooled token count {tokens} is outside (0, {codec.max_tokens}]; "
            "the round is aborted"
        )
    signed = total[:-1].view(np.int64)
    lo, hi = codec.bounds(tokens, contributors)
    bad = (signed < lo) | (signed > hi) if hi < 2**63 else signed < lo
    if bool(bad.any()):
        first = int(np.flatnonzero(bad)[0])
        name, start, _ = next(s for s in layout.spans() if s[1] <= first < s[2])
        raise StatisticsError(
            f"block {layout.block}: the pooled statistics of {name} (channel {first - start}) decode to "
            f"{int(signed[first])}, outside [{lo}, {hi}] for {tokens} tokens and clip {codec.clip:g}; "
            "no honest clients produce this, the round is aborted"
        )
    sums = np.ldexp(signed.astype(np.float64), -codec.scale_bits)
    clamped = int((sums < 0).sum())
    means = np.maximum(sums, 0.0) / tokens
    sq_norm = {
        name: torch.from_numpy(means[start:stop].astype(np.float32)) for name, start, stop in layout.spans()
    }
    return PooledStatistics(tokens, sq_norm, clamped)


def select_from_scores(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Prune mask (True = prune) of the lowest Wanda scores in every comparison group.

    ``row`` (and N:M) is Wanda's own rule (``wanda.local_mask``); ``layer`` and
    ``column`` prune the ``int(n * sparsity)`` lowest scores of the layer or of each
    column. Equal scores go to the lower index, as Wanda's stable sort.
    """
    rows, cols = scores.shape
    if config.nm is not None or config.comparison_group == "row":
        return local_mask(scores, config)
    if config.comparison_group == "layer":
        return smallest_per_row(scores.reshape(1, -1), int(rows * cols * config.sparsity)).reshape(rows, cols)
    return smallest_per_row(scores.t().contiguous(), int(rows * config.sparsity)).t().contiguous()


def select_block_masks(
    weights: Mapping[str, torch.Tensor], sq_norm: Mapping[str, torch.Tensor], config: PruneConfig
) -> dict[str, torch.Tensor]:
    """The block's final masks from its weights and the pooled statistics (server side)."""
    if config.weight_scaling:
        raise PruningConfigError("weight scaling needs vote counts; the statistics strategy has none")
    masks = {}
    for name, weight in weights.items():
        scores = wanda_scores(weight, sq_norm[name].to(weight.device))
        masks[name] = select_from_scores(scores, config)
    return masks


# -- differential privacy ---------------------------------------------------------------------


def window_sensitivity(clip: float, seqlen: int, layers: int) -> float:
    """L2 change of one block's summed vector when one window of one client is replaced."""
    return math.sqrt(2.0) * seqlen * clip * math.sqrt(layers)


@dataclass(frozen=True)
class DPCalibration:
    """The noise that meets (epsilon, delta) over ``releases`` Gaussian rounds."""

    epsilon: float
    delta: float
    noise_multiplier: float  # z = sigma / sensitivity, the same in every round
    releases: int
    epsilon_spent: float  # the accountant's epsilon at z (<= epsilon)

    def sigma(self, sensitivity: float) -> float:
        return self.noise_multiplier * sensitivity

    @staticmethod
    def share_std(sigma: float, contributors: int) -> float:
        """Each client's noise: m shares of N(0, sigma^2 / m) sum to N(0, sigma^2)."""
        return sigma / math.sqrt(contributors)

    def report(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon_spent": self.epsilon_spent,
            "noise_multiplier": self.noise_multiplier,
            "releases": self.releases,
            "accountant": ACCOUNTANT,
            "unit": "one calibration window of seqlen tokens of one client (replace-one)",
            "per": "client",
        }


def _gaussian_rounds(z: float, releases: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases)


def _accountant():
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def epsilon_spent(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian rounds with this noise multiplier."""
    accountant = _accountant()
    accountant.compose(_gaussian_rounds(noise_multiplier, releases))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(dp: DPConfig, releases: int) -> DPCalibration:
    """The smallest noise multiplier whose composition over ``releases`` rounds meets ``dp``."""
    import dp_accounting

    if releases < 1:
        raise PrivacyConfigError("differential privacy needs at least one release")
    try:
        z = dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: _gaussian_rounds(z, releases),
            dp.epsilon,
            dp.delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e6),
        )
    except (ValueError, RuntimeError) as exc:
        raise PrivacyConfigError(
            f"no Gaussian noise meets epsilon={dp.epsilon:g}, delta={dp.delta:g} "
            f"over {releases} rounds: {exc}"
        ) from exc
    return DPCalibration(dp.epsilon, dp.delta, float(z), releases, epsilon_spent(z, releases, dp.delta))
