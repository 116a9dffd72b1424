"""Benchmark: the FedPrLLM study on SmolLM2-135M (issue settings), perplexity and pruning time.

    python benchmarks/pruning.py --data ../shared/data --out benchmarks/results

64 calibration windows of 512 tokens from WikiText-2 valid, 16 IID clients,
sparsity 0.5, seed 0; perplexity on the first 32 windows of WikiText-2 test and
PTB test. Prints a Markdown table (and writes it with the JSON report).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from fedprune.config import prune_config
from fedprune.models import load_model
from fedprune.simulate import DataConfig, RunSpec, prepare_data, run_study
from nodes.files import atomic_write_text
from nodes.report import markdown_table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data", help="folder with wikitext-2/ and ptb/")
    p.add_argument("--out", default=None, help="folder for pruning.md and pruning.json")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runs",
        default="centralized,one-shot:layer,one-shot:row,one-shot:column,"
        "one-shot:layer:scaling,iterative:layer",
    )
    args = p.parse_args()
    data_dir = Path(args.data)
    wiki, ptb = data_dir / "wikitext-2", data_dir / "ptb"
    if not (wiki / "valid.txt").exists() or not (ptb / "ptb.test.txt").exists():
        print(f"benchmark: {data_dir} lacks wikitext-2/valid.txt or ptb/ptb.test.txt", file=sys.stderr)
        return 2
    specs = []
    for item in args.runs.split(","):
        strategy, *rest = item.split(":")
        cfg = prune_config(
            sparsity=0.5,
            group=rest[0] if rest else "layer",
            weight_scaling="scaling" in rest,
            seed=0,
            batch_size=8,
        )
        specs.append(RunSpec(strategy, cfg))
    lm = load_model("smollm2-135m", device=args.device)
    data = prepare_data(
        lm,
        DataConfig(
            calib=(str(wiki / "valid.txt"),),
            eval_sources=(str(wiki / "test.txt"), str(ptb / "ptb.test.txt")),
            clients=args.clients,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            eval_windows=args.eval_windows,
            seed=0,
        ),
    )
    report = run_study(lm, data, specs, progress=True)
    report["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
    }
    table = markdown_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "pruning.md", table)
        atomic_write_text(out / "pruning.json", json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
