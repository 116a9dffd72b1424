"""Benchmark: the federation over gRPC on this machine, plain versus secure.

    python benchmarks/federation.py --clients 8 --repeats 2 --out benchmarks/results

SmolLM2-135M, one server and 8 client processes on 127.0.0.1 with mutual TLS,
one-shot, layer comparison, sparsity 0.5, 8 windows of 256 tokens per client
(each client holds its own slice of the embedded corpus). Modes alternate
(plain, secure, plain, ...) and the table reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nodes.demo import prepare_workdir, start_federation
from nodes.files import atomic_write_text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per client process")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    clients = [f"org-{i + 1}" for i in range(args.clients)]
    work = Path(tempfile.mkdtemp(prefix="fedprune-bench-"))
    prepare_workdir(work, clients)
    runs = []
    for rep in range(args.repeats):
        for mode in ("plain", "secure"):
            run_dir = work / f"{mode}-{rep}"
            run_dir.mkdir()
            for sub in ("keys", "certs", "data"):
                (run_dir / sub).symlink_to(work / sub)
            t0 = time.perf_counter()
            server, procs, _, _ = start_federation(
                run_dir,
                mode=mode,
                strategy="one-shot",
                clients=clients,
                model=args.model,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                sparsity=0.5,
                eval_windows=0,
                echo=False,
                client_args={c: ["--threads", str(args.threads)] for c in clients},
            )
            codes = [p.wait() for p in procs.values()]
            if server.wait() != 0 or any(codes):
                print(f"benchmark: {mode} run {rep} failed", file=sys.stderr)
                return 1
            wall = time.perf_counter() - t0
            report = json.loads((run_dir / mode / "out" / "report.json").read_text())
            runs.append(
                {
                    "mode": mode,
                    "wall_s": wall,
                    "federation_s": report["timings"]["federation"],
                    "aggregate_s": report["rounds"][0]["aggregate_s"],
                    "bytes": sum(report["bytes_received"].values()),
                    "peak_rss_mb": report["peak_rss_mb"],
                    "sha": report["final_mask_sha256"],
                    "weights": json.loads((run_dir / mode / "out" / "manifest.json").read_text())["total"],
                }
            )
            print(f"{mode} run {rep}: wall {wall:.1f} s", file=sys.stderr, flush=True)
    rows = {}
    for mode in ("plain", "secure"):
        rs = [r for r in runs if r["mode"] == mode]
        rows[mode] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("wall_s", "federation_s", "aggregate_s", "bytes", "peak_rss_mb")
        }
    weights = runs[0]["weights"]  # prunable weights in the layout
    lines = [
        "| mode | wall s (median) | federation s | server bytes received | bits per weight per client | server peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in rows.items():
        bpw = r["bytes"] * 8 / (weights * args.clients)
        lines.append(
            f"| {mode} | {r['wall_s']:.1f} | {r['federation_s']:.1f} | {r['bytes'] / 1e6:.1f} MB | "
            f"{bpw:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    ratio = rows["secure"]["wall_s"] / rows["plain"]["wall_s"]
    lines.append("")
    lines.append(
        f"secure / plain wall time: {ratio:.3f}; identical final masks: {len({r['sha'] for r in runs}) == 1}"
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "federation.md", table + "\n")
        atomic_write_text(Path(args.out) / "federation.json", json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
