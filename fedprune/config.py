"""The pruning configuration shared by every strategy (one frozen, validated dataclass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import PruningConfigError

Partition = Literal["iid", "source", "dirichlet", "reference"]
PARTITIONS: tuple[Partition, ...] = ("iid", "source", "dirichlet", "reference")

ComparisonGroup = Literal["layer", "row", "column"]
TieBreak = Literal["random", "magnitude", "index", "reference"]
StatsMode = Literal["batched", "reference"]
COMPARISON_GROUPS: tuple[ComparisonGroup, ...] = ("layer", "row", "column")
TIE_BREAKS: tuple[TieBreak, ...] = ("random", "magnitude", "index", "reference")
STATS_MODES: tuple[StatsMode, ...] = ("batched", "reference")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how the server selects from vote counts (FedPrLLM steps 1-4).

    ``nm`` = (n, m) prunes n of every m consecutive input weights (N:M sparsity);
    then ``sparsity`` must equal n/m and selection happens inside each M-group.

    ``tie_break`` orders weights with equal vote counts (see ``selection``):
    ``random`` (seeded per layer), ``magnitude`` (smaller |W| first), ``index``
    (lowest index first) or ``reference`` (the reference code: lowest index for
    row/column, a ``randperm`` fill from one generator for layer).
    ``stats`` is how Wanda's input norms are accumulated (see ``wanda``):
    ``batched`` (fast) or ``reference`` (window by window, as the reference).
    """

    sparsity: float
    comparison_group: ComparisonGroup = "layer"
    tie_break: TieBreak = "random"
    stats: StatsMode = "batched"
    weight_scaling: bool = False
    nm: tuple[int, int] | None = None
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise PruningConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.comparison_group not in COMPARISON_GROUPS:
            raise PruningConfigError(
                f"unknown comparison group {self.comparison_group!r}; "
                f"choose one of {', '.join(COMPARISON_GROUPS)}"
            )
        if self.tie_break not in TIE_BREAKS:
            raise PruningConfigError(
                f"unknown tie-break {self.tie_break!r}; choose one of {', '.join(TIE_BREAKS)}"
            )
        if self.stats not in STATS_MODES:
            raise PruningConfigError(
                f"unknown statistics mode {self.stats!r}; choose one of {', '.join(STATS_MODES)}"
            )
        if self.batch_size < 1:
            raise PruningConfigError("batch size must be at least 1")
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise PruningConfigError(f"N:M needs 0 < N < M, got {n}:{m}")
            if abs(n / m - self.sparsity) > 1e-9:
                raise PruningConfigError(
                    f"N:M {n}:{m} prunes {n / m:g} of the weights but sparsity is {self.sparsity:g}"
                )


def prune_config(
    *,
    sparsity: float,
    group: str = "layer",
    tie_break: str = "random",
    nm: str | tuple[int, int] | None = None,
    seed: int = 0,
    weight_scaling: bool = False,
    stats: str = "batched",
    batch_size: int = 8,
) -> PruneConfig:
    """The one place user-facing settings become a :class:`PruneConfig`.

    Every source of settings goes through here: the ``simulate`` flags, the
    server's TOML and flags, the client's Welcome. ``group`` is the comparison
    group; ``nm`` is ``"2:4"`` text, an ``(n, m)`` pair, or none (``None``,
    ``""`` or the wire's ``(0, 0)``). Raises ``PruningConfigError``.
    """
    if isinstance(nm, str):
        nm = parse_nm(nm) if nm else None
    elif nm is not None:
        nm = (int(nm[0]), int(nm[1])) if nm[1] else None
    return PruneConfig(
        sparsity=sparsity,
        comparison_group=group,  # type: ignore[arg-type]  (checked in __post_init__)
        tie_break=tie_break,  # type: ignore[arg-type]
        stats=stats,  # type: ignore[arg-type]
        weight_scaling=weight_scaling,
        nm=nm,
        seed=seed,
        batch_size=batch_size,
    )


def parse_nm(text: str) -> tuple[int, int]:
    """Parse '2:4' into (2, 4)."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise PruningConfigError(f"N:M must look like 2:4, got {text!r}") from exc
    return n, m
