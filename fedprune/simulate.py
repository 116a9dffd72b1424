"""The in-process simulation of m clients: data split, strategies, evaluation, report.

No networking: the clients' masks are summed in process (or by any other
``aggregate`` function, such as the secure sum). Used by ``fedprune simulate``
and by the paper study grid.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
from .streaming import PrunedWriter, SafetensorsCheckpoint, StreamedModel


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


def prepare_data(lm: LoadedModel | StreamedModel, data: DataConfig) -> PreparedData:
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


Model = LoadedModel | StreamedModel


def evaluate(
    lm: Model, eval_sets: dict[str, torch.Tensor], progress: bool, pruned: Path | None = None
) -> dict[str, float]:
    """Perplexity per eval set; a streamed model reads its blocks from ``pruned`` (default: its source)."""
    blocks = None
    if isinstance(lm, StreamedModel):
        blocks = lm.blocks(None if pruned is None else SafetensorsCheckpoint(pruned))
    return {
        label: perplexity(lm.model, windows, progress=progress, desc=f"perplexity {label}", blocks=blocks)
        for label, windows in eval_sets.items()
    }


class _Workspace:
    """Where a streamed model's pruned copies go: one directory per run, removed after
    evaluation except the last one kept (moved to ``keep_last``) when asked."""

    def __init__(self, work_dir: Path | None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fedprune-pruned-", dir=work_dir))

    def new(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _prune(model, parties: Sequence[torch.Tensor], spec: RunSpec, strategy: str, **kwargs):
    """The strategy's pruning function: statistics rounds, or mask voting and its baselines."""
    if strategy == "statistics":
        return prune_statistics(model, parties, spec.prune, **kwargs)
    return prune(model, parties, spec.prune, strategy, **kwargs)


def _prune_into(
    lm: StreamedModel, out: Path, parties: Sequence[torch.Tensor], spec: RunSpec, strategy: str, **kwargs
):
    """Prune block by block from the source, writing each pruned block into ``out``."""
    writer = PrunedWriter(lm, out)
    result = _prune(
        lm.model,
        parties,
        spec,
        strategy,
        blocks=lm.blocks(on_release=writer.write_block),
        keep_masks=False,
        **kwargs,
    )
    writer.finish()
    return result, writer.block_sparsity().all_matrices


def run_spec(
    lm: Model,
    data: PreparedData,
    spec: RunSpec,
    *,
    aggregate: Aggregate = plain_sum,
    vector_sum: VectorSum = plain_vector_sum,
    secure: bool = False,
    progress: bool = True,
) -> dict:
    """Prune with one spec (an in-memory model is left pruned), evaluate, and return
    the report entry.

    ``aggregate`` sums vote masks, ``vector_sum`` statistics vectors; ``secure`` says
    whether they hide the clients' inputs (differential privacy requires it).
    """
    return run_study(
        lm,
        data,
        [spec],
        aggregate=aggregate,
        vector_sum=vector_sum,
        secure=secure,
        progress=progress,
        evaluate_dense=False,
    )["runs"][0]


def _run_spec(
    lm: Model,
    data: PreparedData,
    spec: RunSpec,
    *,
    aggregate: Aggregate,
    vector_sum: VectorSum,
    secure: bool,
    progress: bool,
    workspace: _Workspace | None,
) -> tuple[dict, Path | None]:
    """``run_spec``, returning also the pruned model's directory (streamed model; else None)."""
    entry: dict = {"label": spec.label, "strategy": spec.strategy, "config": asdict(spec.prune)}
    nsamples = len(data.pooled_windows)
    streamed = isinstance(lm, StreamedModel)
    if spec.strategy == "local-only":
        snapshot = None if streamed else WeightSnapshot(lm)
        per_client, sparsities, block_sparsities, times = [], [], [], []
        out = None
        for windows in data.client_windows:
            kwargs = {"progress": progress, "nsamples": nsamples}
            if streamed:
                out = workspace.new()
                result, all_matrices = _prune_into(lm, out, [windows], spec, "centralized", **kwargs)
            else:
                snapshot.restore(lm)
                result = prune(lm.model, [windows], spec.prune, "centralized", **kwargs)
                all_matrices = block_sparsity(lm.model).all_matrices
            times.append(result.timings["prune_total"])
            sparsities.append(result.sparsity()[0])
            block_sparsities.append(all_matrices)
            per_client.append(evaluate(lm, data.eval_sets, progress, out))
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
        return entry, out
    if spec.strategy == "statistics":
        parties = data.client_windows
        kwargs = {"stats": spec.statistics, "vector_sum": vector_sum, "secure": secure, "progress": progress}
    else:
        parties = [data.pooled_windows] if spec.strategy == "centralized" else data.client_windows
        kwargs = {"aggregate": aggregate, "progress": progress, "nsamples": nsamples}
    out = None
    if streamed:
        out = workspace.new()
        result, all_matrices = _prune_into(lm, out, parties, spec, spec.strategy, **kwargs)
    else:
        result = _prune(lm.model, parties, spec, spec.strategy, **kwargs)
        all_matrices = block_sparsity(lm.model).all_matrices
    if spec.strategy == "statistics":
        entry["statistics"] = result.details
    global_sparsity, per_layer = result.sparsity()
    t0 = time.perf_counter()
    entry["perplexity"] = evaluate(lm, data.eval_sets, progress, out)
    entry["sparsity"] = global_sparsity
    entry["sparsity_all_block_matrices"] = all_matrices
    entry["sparsity_per_layer"] = per_layer
    entry["timings"] = {**result.timings, "evaluation": time.perf_counter() - t0}
    return entry, out


def run_study(
    lm: Model,
    data: PreparedData,
    specs: Sequence[RunSpec],
    *,
    aggregate: Aggregate = plain_sum,
    vector_sum: VectorSum = plain_vector_sum,
    secure: bool = False,
    progress: bool = True,
    evaluate_dense: bool = True,
    work_dir: Path | None = None,
    keep_last: Path | None = None,
) -> dict:
    """Run every spec from the same dense weights; return {'dense': ..., 'runs': [...]}.

    An in-memory model is left pruned by the last spec (so a single run can be
    saved). A streamed model is never modified: each spec reads the source and
    writes its pruned copy under ``work_dir`` (default: the system's temporary
    directory), evaluated and then removed; the last one is moved to
    ``keep_last`` when given (a path that does not exist yet).
    """
    streamed = isinstance(lm, StreamedModel)
    snapshot = None if streamed else WeightSnapshot(lm)
    workspace = _Workspace(work_dir) if streamed else None
    report: dict = {"runs": []}
    try:
        if evaluate_dense:
            report["dense"] = {"perplexity": evaluate(lm, data.eval_sets, progress)}
        for n, spec in enumerate(specs):
            if snapshot is not None:
                snapshot.restore(lm)
            entry, out = _run_spec(
                lm,
                data,
                spec,
                aggregate=aggregate,
                vector_sum=vector_sum,
                secure=secure,
                progress=progress,
                workspace=workspace,
            )
            report["runs"].append(entry)
            if out is not None and keep_last is not None and n == len(specs) - 1:
                os.replace(out, keep_last)
            elif out is not None:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if workspace is not None:
            workspace.close()
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
