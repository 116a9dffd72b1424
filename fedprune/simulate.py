"""The in-process simulation of m clients: data split, strategies, evaluation, report.

No networking: the clients' masks are summed in process (or by any other
``aggregate`` function, such as the secure sum). Used by ``fedprune simulate``
and by the paper study grid.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from .architectures import block_sparsity
from .config import PARTITIONS, Partition, PruneConfig
from .data import (
    check_source,
    eval_windows,
    load_text,
    partition_dirichlet,
    partition_iid,
    reference_split,
    sample_windows,
    source_label,
    tokenize,
)
from .errors import DataError, PruningConfigError
from .evaluation import perplexity
from .models import LoadedModel, prunable_weights
from .statistics import StatisticsConfig
from .statistics_run import VectorSum, plain_vector_sum, prune_statistics
from .strategies import STRATEGIES, Aggregate, plain_sum, prune


@dataclass(frozen=True)
class DataConfig:
    """Where calibration and evaluation text comes from and how it is split."""

    calib: tuple[str, ...] = ("embedded",)
    eval_sources: tuple[str, ...] = ("embedded",)
    clients: int = 4
    nsamples: int = 16
    seqlen: int = 128
    eval_windows: int | None = 8
    partition: Partition = "iid"
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise DataError("seqlen must be at least 2")
        if self.clients < 1:
            raise DataError("the number of clients must be at least 1")
        if self.nsamples < self.clients:
            raise DataError(
                f"{self.nsamples} calibration windows cannot be split across {self.clients} clients"
            )
        if self.partition not in PARTITIONS:
            raise DataError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        for source in (*self.calib, *self.eval_sources):
            check_source(source)


@dataclass(frozen=True)
class RunSpec:
    """One cell of a study: a strategy with a pruning configuration."""

    strategy: str
    prune: PruneConfig
    statistics: StatisticsConfig | None = None  # the statistics strategy's clip and DP

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PruningConfigError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.statistics is not None and self.strategy != "statistics":
            raise PruningConfigError("a clip and differential privacy apply to the statistics strategy only")

    @property
    def label(self) -> str:
        parts = [self.strategy]
        if self.strategy in ("one-shot", "iterative", "statistics"):
            parts.append(self.prune.comparison_group)
            if self.prune.weight_scaling:
                parts.append("scaling")
        if self.statistics is not None and self.statistics.dp is not None:
            parts.append(f"dp ε={self.statistics.dp.epsilon:g}")
        if self.prune.nm:
            parts.append(f"{self.prune.nm[0]}:{self.prune.nm[1]}")
        parts.append(f"s={self.prune.sparsity:g}")
        return " ".join(parts)


@dataclass
class PreparedData:
    """The clients' calibration windows, the pooled windows of the centralized
    baseline (the clients' windows together; with ``reference`` partition, all
    sampled windows in sampling order, as the reference's centralized run), and
    the evaluation windows per source."""

    client_windows: list[torch.Tensor]
    eval_sets: dict[str, torch.Tensor]
    pooled_windows: torch.Tensor


def prepare_data(lm: LoadedModel, data: DataConfig) -> PreparedData:
    """Tokenize the sources, sample calibration windows, split them, cut eval windows.

    The ``reference`` partition also tokenizes as the reference does, with the
    tokenizer's special tokens (a BOS in front for LLaMA), calibration and evaluation.
    """
    if data.seqlen > lm.max_context:
        raise DataError(f"seqlen {data.seqlen} exceeds the model's context of {lm.max_context} tokens")
    special = data.partition == "reference"
    texts = [
        tokenize(lm.tokenizer, load_text(src, "calibration"), special_tokens=special) for src in data.calib
    ]
    sampled: torch.Tensor | None = None  # the reference's centralized windows, in sampling order
    if data.partition == "reference":
        sampled, clients = reference_split(
            torch.cat(texts), data.nsamples, data.seqlen, data.clients, data.seed
        )
    elif data.partition == "iid":
        windows = sample_windows(torch.cat(texts), data.nsamples, data.seqlen, data.seed)
        clients = partition_iid(windows, data.clients, data.seed)
    elif data.partition == "source":
        if len(texts) != data.clients:
            raise DataError(
                f"partition 'source' gives each client its own source: {len(texts)} sources "
                f"for {data.clients} clients"
            )
        per_client = data.nsamples // data.clients
        clients = [sample_windows(t, per_client, data.seqlen, data.seed + c) for c, t in enumerate(texts)]
    else:
        per_source = data.nsamples // len(texts)
        if per_source < 1:
            raise DataError("fewer calibration windows than sources")
        windows = [sample_windows(t, per_source, data.seqlen, data.seed + s) for s, t in enumerate(texts)]
        clients = partition_dirichlet(windows, data.clients, data.alpha, data.seed)
    eval_sets = {}
    for src in data.eval_sources:
        ids = tokenize(lm.tokenizer, load_text(src, "evaluation"), special_tokens=special)
        eval_sets[source_label(src)] = eval_windows(ids, data.seqlen, data.eval_windows)
    return PreparedData(clients, eval_sets, torch.cat(clients) if sampled is None else sampled)


class WeightSnapshot:
    """A copy of the prunable weights, to restore the dense model between runs."""

    def __init__(self, lm: LoadedModel) -> None:
        self._saved = {n: w.clone() for n, w in prunable_weights(lm.model).items()}

    def restore(self, lm: LoadedModel) -> None:
        for name, weight in prunable_weights(lm.model).items():
            weight.copy_(self._saved[name])


def evaluate(lm: LoadedModel, eval_sets: dict[str, torch.Tensor], progress: bool) -> dict[str, float]:
    return {
        label: perplexity(lm.model, windows, progress=progress, desc=f"perplexity {label}")
        for label, windows in eval_sets.items()
    }


def run_spec(
    lm: LoadedModel,
    data: PreparedData,
    spec: RunSpec,
    *,
    aggregate: Aggregate = plain_sum,
    vector_sum: VectorSum = plain_vector_sum,
    secure: bool = False,
    progress: bool = True,
) -> dict:
    """Prune with one spec (model left pruned), evaluate, and return the report entry.

    ``aggregate`` sums vote masks, ``vector_sum`` statistics vectors; ``secure`` says
    whether they hide the clients' inputs (differential privacy requires it).
    """
    entry: dict = {"label": spec.label, "strategy": spec.strategy, "config": asdict(spec.prune)}
    nsamples = len(data.pooled_windows)
    if spec.strategy == "local-only":
        snapshot = WeightSnapshot(lm)
        per_client, sparsities, block_sparsities, times = [], [], [], []
        for windows in data.client_windows:
            snapshot.restore(lm)
            result = prune(
                lm.model, [windows], spec.prune, "centralized", progress=progress, nsamples=nsamples
            )
            times.append(result.timings["prune_total"])
            sparsities.append(result.sparsity()[0])
            block_sparsities.append(block_sparsity(lm.model).all_matrices)
            per_client.append(evaluate(lm, data.eval_sets, progress))
        entry["perplexity"] = {
            label: statistics.fmean(p[label] for p in per_client) for label in data.eval_sets
        }
        entry["perplexity_std"] = {
            label: statistics.pstdev(p[label] for p in per_client) for label in data.eval_sets
        }
        entry["perplexity_per_client"] = per_client
        entry["sparsity"] = statistics.fmean(sparsities)
        entry["sparsity_all_block_matrices"] = statistics.fmean(block_sparsities)
        entry["timings"] = {"prune_total": sum(times), "prune_per_client_mean": statistics.fmean(times)}
        return entry
    if spec.strategy == "statistics":
        result = prune_statistics(
            lm.model,
            data.client_windows,
            spec.prune,
            spec.statistics,
            vector_sum=vector_sum,
            secure=secure,
            progress=progress,
        )
        entry["statistics"] = result.details
    else:
        parties = [data.pooled_windows] if spec.strategy == "centralized" else data.client_windows
        result = prune(
            lm.model,
            parties,
            spec.prune,
            spec.strategy,
            aggregate=aggregate,
            progress=progress,
            nsamples=nsamples,
        )
    global_sparsity, per_layer = result.sparsity()
    t0 = time.perf_counter()
    entry["perplexity"] = evaluate(lm, data.eval_sets, progress)
    entry["sparsity"] = global_sparsity
    entry["sparsity_all_block_matrices"] = block_sparsity(lm.model).all_matrices
    entry["sparsity_per_layer"] = per_layer
    entry["timings"] = {**result.timings, "evaluation": time.perf_counter() - t0}
    return entry


def run_study(
    lm: LoadedModel,
    data: PreparedData,
    specs: Sequence[RunSpec],
    *,
    aggregate: Aggregate = plain_sum,
    vector_sum: VectorSum = plain_vector_sum,
    secure: bool = False,
    progress: bool = True,
    evaluate_dense: bool = True,
) -> dict:
    """Run every spec from the same dense weights; return {'dense': ..., 'runs': [...]}.

    The model is left pruned by the last spec (so a single run can be saved).
    """
    snapshot = WeightSnapshot(lm)
    report: dict = {"runs": []}
    if evaluate_dense:
        report["dense"] = {"perplexity": evaluate(lm, data.eval_sets, progress)}
    for spec in specs:
        snapshot.restore(lm)
        report["runs"].append(
            run_spec(
                lm, data, spec, aggregate=aggregate, vector_sum=vector_sum, secure=secure, progress=progress
            )
        )
    return report


def study_grid(
    strategies: Sequence[str],
    groups: Sequence[str],
    scalings: Sequence[bool],
    sparsities: Sequence[float],
    base: PruneConfig,
    statistics: Sequence[StatisticsConfig | None] = (None,),
) -> list[RunSpec]:
    """The grid strategies x groups x scaling x sparsities; group/scaling only where they apply.

    The statistics strategy runs Wanda's per-row rule, once per entry of ``statistics``
    (e.g. without and with differential privacy at several epsilons).
    """
    specs: list[RunSpec] = []
    for sparsity in sparsities:
        for strategy in strategies:
            if strategy == "statistics":
                cfg = replace(base, sparsity=sparsity, comparison_group="row", weight_scaling=False)
                specs += [RunSpec(strategy, cfg, stats) for stats in statistics]
                continue
            federated = strategy in ("one-shot", "iterative")
            for group in groups if federated else groups[:1]:
                for scaling in scalings if federated else (False,):
                    cfg = replace(base, sparsity=sparsity, comparison_group=group, weight_scaling=scaling)
                    specs.append(RunSpec(strategy, cfg))
    if not specs:
        raise PruningConfigError("the study grid is empty: name at least one strategy, group and sparsity")
    return specs
