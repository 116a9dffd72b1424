"""Tables (Markdown) and plots (PNG) of simulation and study reports."""

from __future__ import annotations

import io
import re


def markdown_table(report: dict) -> str:
    """One row per run (dense first): sparsity, perplexity per eval set, pruning time."""
    runs = report["runs"]
    eval_labels = list((report.get("dense") or runs[0])["perplexity"])
    header = ["run", "sparsity", *(f"ppl {label}" for label in eval_labels), "prune s"]
    rows = []
    if report.get("dense"):
        rows.append(
            ["dense", "0.000", *(f"{report['dense']['perplexity'][x]:.2f}" for x in eval_labels), "-"]
        )
    for run in runs:
        ppl = []
        for label in eval_labels:
            cell = f"{run['perplexity'][label]:.2f}"
            if "perplexity_std" in run:
                cell += f" ± {run['perplexity_std'][label]:.2f}"
            ppl.append(cell)
        rows.append([run["label"], f"{run['sparsity']:.3f}", *ppl, f"{run['timings']['prune_total']:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def study_plot_png(report: dict) -> bytes:
    """Perplexity (first eval set, log scale) per run: lines over sparsity, or bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    label = next(iter(runs[0]["perplexity"]))
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        name = re.sub(r"\s*s=\S+", "", run["label"])
        series.setdefault(name, []).append((run["config"]["sparsity"], run["perplexity"][label]))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if all(len(points) == 1 for points in series.values()):
        names = list(series)
        values = [series[n][0][1] for n in names]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        if report.get("dense"):
            ax.axhline(report["dense"]["perplexity"][label], color="gray", ls="--", label="dense")
            ax.legend()
    else:
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel("sparsity")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity ({label})")
    ax.set_title("FedPrLLM study")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
