"""Study: exact federated Wanda from summed statistics against FedPrLLM voting, with and without DP.

    python benchmarks/statistics_study.py --out benchmarks/results \\
        --calib ../shared/data/wikitext-2/valid.txt ../shared/data/ptb/ptb.valid.txt \\
        --eval ../shared/data/wikitext-2/test.txt ../shared/data/ptb/ptb.test.txt

Per partition (IID; Dirichlet alpha over the calibration sources; one source per
client) and sparsity: dense, centralized Wanda on the pooled windows, one-shot and
iterative voting (layer group), statistics (secure sum; its masks are compared
with centralized Wanda's: differing weights are counted and their score gap to the
row's threshold reported), and statistics with distributed DP at each epsilon.
Writes statistics_study.md (perplexity table), statistics_study.png and
statistics_study.json atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedprune.config import PruneConfig
from fedprune.evaluation import perplexity
from fedprune.models import block_weights, layout, load_model
from fedprune.propagation import BlockRunner
from fedprune.simulate import DataConfig, RunSpec, WeightSnapshot, prepare_data, run_spec
from fedprune.statistics import DPConfig, StatisticsConfig, select_block_masks
from fedprune.statistics_run import prune_statistics
from fedprune.wanda import wanda_scores
from nodes.files import atomic_write_bytes, atomic_write_text
from nodes.secure_sum import secure_sum, secure_vector_sum
from nodes.traffic import markdown as traffic_markdown
from nodes.traffic import traffic_table


@torch.no_grad()
def mask_agreement(lm, data, config: PruneConfig) -> dict:
    """Statistics (secure) masks against centralized Wanda's on the pooled windows.

    Block by block on the same inputs: the centralized masks are computed from the
    pooled windows propagated through the blocks as the statistics run pruned them,
    so a difference is attributable to that block's rounding alone (fixed point
    against float accumulation), not to an earlier difference carried forward.
    For every weight where they differ, the gap between its centralized score and the
    k-th smallest score of its row (the row's threshold), relative to the threshold:
    a near tie has a gap near the float/fixed-point resolution.
    """
    snapshot = WeightSnapshot(lm)
    result = prune_statistics(
        lm.model, data.client_windows, config, vector_sum=secure_vector_sum, secure=True, progress=False
    )
    snapshot.restore(lm)
    runner = BlockRunner(lm.model, config.batch_size)
    hidden = runner.embed(data.pooled_windows)
    differing, worst_gap, layers_differing = 0, 0.0, 0
    total = 0
    for i in range(layout(lm.model).num_blocks):
        stats = runner.collect_stats(i, hidden)
        weights = block_weights(lm.model, i)
        prefix = next(iter(weights)).rsplit(".", 2)[0]
        norms = {n: stats[n[len(prefix) + 1 :]].sq_norm for n in weights}
        central = select_block_masks(weights, norms, config)
        for name, mask in central.items():
            diff = mask.cpu() != result.final_masks[name]
            total += mask.numel()
            if bool(diff.any()):
                layers_differing += 1
                differing += int(diff.sum())
                scores = wanda_scores(weights[name], norms[name]).cpu()
                k = int(scores.shape[1] * config.sparsity)
                threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
                gap = ((scores - threshold).abs() / threshold.clamp_min(1e-30))[diff]
                worst_gap = max(worst_gap, float(gap.max()))
            weights[name].masked_fill_(result.final_masks[name].to(weights[name].device), 0)
        if i < len(runner.blocks) - 1:
            hidden = runner.forward(i, hidden)
    snapshot.restore(lm)
    return {
        "weights": total,
        "differing_weights": differing,
        "differing_fraction": differing / total,
        "layers_differing": layers_differing,
        "max_relative_score_gap": worst_gap,
        "resolution": result.details["resolution"],
    }


def partition_configs(args) -> list[tuple[str, DataConfig]]:
    common = dict(
        calib=tuple(args.calib),
        eval_sources=tuple(args.eval),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_windows=args.eval_windows,
        seed=args.seed,
    )
    out = []
    for name in args.partitions:
        if name == "iid":
            out.append(("iid", DataConfig(clients=args.clients, partition="iid", **common)))
        elif name == "dirichlet":
            label = f"dirichlet α={args.alpha:g}"
            out.append(
                (label, DataConfig(clients=args.clients, partition="dirichlet", alpha=args.alpha, **common))
            )
        elif name == "source":
            out.append(
                ("one source per client", DataConfig(clients=len(args.calib), partition="source", **common))
            )
        else:
            raise SystemExit(f"unknown partition {name!r}")
    return out


def markdown(rows: list[dict], eval_labels: list[str]) -> str:
    header = ["partition", "sparsity", "run", *(f"ppl {x}" for x in eval_labels), "prune s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        ppl = [f"{r['perplexity'][x]:.2f}" for x in eval_labels]
        lines.append(
            "| "
            + " | ".join([r["partition"], f"{r['sparsity']:g}", r["run"], *ppl, f"{r['prune_s']:.1f}"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict], eval_label: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 4.5), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], partitions, strict=True):
        sub = [r for r in rows if r["partition"] == part and r["run"] != "dense"]
        runs = list(dict.fromkeys(r["run"] for r in sub))
        for run in runs:
            pts = sorted((r["sparsity"], r["perplexity"][eval_label]) for r in sub if r["run"] == run)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
        dense = [r for r in rows if r["partition"] == part and r["run"] == "dense"]
        if dense:
            ax.axhline(dense[0]["perplexity"][eval_label], color="gray", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(part)
        ax.set_ylabel(f"perplexity ({eval_label})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = "../shared/data"
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--calib", nargs="+", default=[f"{data}/wikitext-2/valid.txt", f"{data}/ptb/ptb.valid.txt"]
    )
    p.add_argument("--eval", nargs="+", default=[f"{data}/wikitext-2/test.txt", f"{data}/ptb/ptb.test.txt"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet", "source"])
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--dp-clip", type=float, default=100.0)
    p.add_argument("--traffic-clients", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model(args.model, device=args.device)
    snapshot = WeightSnapshot(lm)
    rows: list[dict] = []
    agreement: list[dict] = []
    reports: list[dict] = []
    eval_labels: list[str] = []
    for part, data_cfg in partition_configs(args):
        prepared = prepare_data(lm, data_cfg)
        eval_labels = list(prepared.eval_sets)
        snapshot.restore(lm)
        dense = {x: perplexity(lm.model, w, progress=False) for x, w in prepared.eval_sets.items()}
        rows.append({"partition": part, "sparsity": 0.0, "run": "dense", "perplexity": dense, "prune_s": 0.0})
        for sparsity in args.sparsities:
            voting = PruneConfig(sparsity, comparison_group="layer", seed=args.seed)
            wanda = replace(voting, comparison_group="row")
            specs = [
                (RunSpec("centralized", wanda), False),
                (RunSpec("one-shot", voting), False),
                (RunSpec("iterative", voting), False),
                (RunSpec("statistics", wanda, StatisticsConfig()), True),
            ] + [
                (
                    RunSpec(
                        "statistics", wanda, StatisticsConfig(args.dp_clip, DPConfig(eps, args.dp_delta))
                    ),
                    True,
                )
                for eps in args.epsilons
            ]
            for spec, secure in specs:
                snapshot.restore(lm)
                t0 = time.perf_counter()
                entry = run_spec(
                    lm, prepared, spec, aggregate=secure_sum, vector_sum=secure_vector_sum, secure=secure,
                    progress=False,
                )  # fmt: skip
                entry["partition"] = part
                reports.append(entry)
                label = spec.label.replace(f" s={sparsity:g}", "")
                rows.append({
                    "partition": part, "sparsity": sparsity, "run": label, "perplexity": entry["perplexity"],
                    "prune_s": entry["timings"]["prune_total"],
                })  # fmt: skip
                print(f"{part} s={sparsity:g} {label}: {entry['perplexity']} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)  # fmt: skip
            snapshot.restore(lm)
            agreement.append({"partition": part, "sparsity": sparsity, **mask_agreement(lm, prepared, wanda)})
            print("agreement", agreement[-1], flush=True)

    traffic = traffic_table(layout(lm.model), args.traffic_clients)
    table = markdown(rows, eval_labels)
    agree_md = "\n".join(
        f"- {a['partition']}, s={a['sparsity']:g}: {a['differing_weights']} of {a['weights']} weights differ "
        f"({a['differing_fraction']:.2e}) in {a['layers_differing']} layers; largest relative score gap to the "
        f"row threshold {a['max_relative_score_gap']:.2e}; fixed-point resolution {a['resolution']:.2e}"
        for a in agreement
    )
    text = (
        f"{table}\nStatistics (secure) masks against centralized Wanda on the pooled windows:\n\n{agree_md}\n\n"
        f"Traffic per client, {args.traffic_clients} clients, {args.model}:\n\n{traffic_markdown(traffic)}"
    )
    atomic_write_text(out / "statistics_study.md", text)
    atomic_write_bytes(out / "statistics_study.png", plot_png(rows, eval_labels[0]))
    meta = {"args": vars(args), "python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}  # fmt: skip
    atomic_write_text(
        out / "statistics_study.json",
        json.dumps(
            {"meta": meta, "rows": rows, "agreement": agreement, "traffic": traffic, "runs": reports},
            indent=2,
        ),
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
