"""Benchmark: `fedprune simulate` and a real federation on large LLaMA shapes with random
weights (no download).

    python benchmarks/scale.py --shape 1.1b --dtype bfloat16 --device cpu \\
        --runs centralized:2,one-shot:2,one-shot:16,one-shot:64 --out benchmarks/results
    python benchmarks/scale.py --shape 1.1b --runs federation:2 --nsamples 2 --seqlen 64

Builds the model from a transformers config class with random weights and saves it
as safetensors under --models (once; 2.2 GB for 1.1B in bf16, 13.5 GB for 7B), with
a byte-level tokenizer and a synthetic text. Each run is one `fedprune simulate`
subprocess; reported: wall time, the process's peak resident memory (its
VmHWM, polled), peak GPU memory on CUDA, and the share of pruning time spent in
selection. A ``federation:N`` run is a secure one-shot federation on loopback with
real processes (``fedprune server`` and N ``fedprune client``, mutual TLS, as
``fedprune demo`` starts them), each client with ``--nsamples`` windows of its own;
reported: wall time and peak resident memory of every process (its VmHWM, polled).
Prints a Markdown table and writes scale.md / scale.json atomically.
``--selection 2,16,64`` adds the server's selection alone on one 5632x2048 layer
(TinyLlama's MLP) with Wanda-like votes of that many clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    # TinyLlama-1.1B
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # TinyLlama-1.1B's layer shapes, 4 of its 22 decoder blocks (a before/after comparison
    # of the federation that fits this box when the processes still hold whole models)
    "1.1b-4blocks": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # LLaMA-2-7B
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # for a quick check of the script itself
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build_model(shape: str, dtype: str, root: Path) -> Path:
    """The random-weight model directory for a shape (built once, atomically).

    Tensors are drawn one at a time and written in shards of about 1 GB, so building
    the 7B shape (13.5 GB in bf16) needs about one shard of memory, not the model.
    """
    target = root / f"llama-{shape}-{dtype}"
    if (target / "config.json").exists():
        return target  # without importing torch: the --one wrapper stays small (see run_simulate)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, use_cache=False)
    config.dtype = dtype
    with torch.device("meta"):
        params = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    shards: list[dict] = [{}]
    sizes = [0]
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        save_file(shards[-1], str(tmp / f"part-{len(shards)}"), metadata={"format": "pt"})
        shards[-1] = {}  # release the tensors; the next shard starts empty
        shards.append({})
        sizes.append(0)

    for name, shape_ in params:
        t = torch.empty(shape_, dtype=getattr(torch, dtype))
        if t.dim() >= 2:
            t.normal_(0, 0.02)
        else:
            t.fill_(1.0)  # norms
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > 1 << 30:
            flush()
        shards[-1][name] = t
        sizes[-1] += nbytes
        weight_map[name] = len(shards)
        total += nbytes
    flush()
    count = len(shards) - 1
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, final in names.items():
        os.replace(tmp / f"part-{i}", tmp / final)
    index = {"metadata": {"total_size": total}, "weight_map": {n: names[i] for n, i in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    _byte_tokenizer().save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def synthetic_text(root: Path) -> Path:
    path = root / "text.txt"
    if not path.exists():
        rng = random.Random(0)
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
        path.write_text(" ".join(rng.choice(words) for _ in range(200_000)))
    return path


def run_simulate(model: Path, text: Path, strategy: str, clients: int, args) -> dict:
    nsamples = max(args.nsamples, clients)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "nodes.cli", "simulate",
            "--model", str(model), "--dtype", args.dtype, "--device", args.device,
            "--strategy", strategy, "--clients", str(clients),
            "--nsamples", str(nsamples), "--seqlen", str(args.seqlen),
            "--calib", str(text), "--eval-file", str(text), "--eval", "",
            "--eval-windows", str(args.eval_windows), "--batch-size", str(args.batch_size),
            "--json", str(report_path), "--no-progress",
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The child's own high-water mark, polled from /proc: its RUSAGE_CHILDREN maxrss also
        # counts the forked copy of this process before exec (a torch-importing parent's
        # hundreds of MB). VmHWM only grows, so the last poll misses at most the final 0.2 s.
        hwm = [0]
        poller = threading.Thread(target=_poll_hwm, args=(proc, hwm), daemon=True)
        poller.start()
        out, err = proc.communicate()
        poller.join()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"simulate failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
        report = json.loads(report_path.read_text())
    import resource

    run = report["runs"][0]
    timings = run["timings"]
    return {
        "strategy": strategy,
        "clients": clients,
        "nsamples": nsamples,
        "seqlen": args.seqlen,
        "wall_s": wall,
        "peak_rss_bytes": hwm[0] or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_gpu_bytes": report.get("peak_gpu_memory_bytes"),
        "prune_s": timings["prune_total"],
        "selection_s": timings.get("selection", 0.0),
        "selection_share_of_wall": timings.get("selection", 0.0) / wall,
        "sparsity": run["sparsity"],
        "perplexity": run["perplexity"],
        "load_s": report["timings"]["load_model"],
    }


def run_federation(model: Path, text: Path, clients: int, args) -> dict:
    """A secure one-shot federation of ``clients`` real client processes and a server."""

    from nodes.demo import start_federation
    from nodes.identity import make_certificates, write_identity

    names = [f"org-{i + 1}" for i in range(clients)]
    with tempfile.TemporaryDirectory(prefix="scale-federation-") as tmp:
        work = Path(tmp)
        (work / "keys").mkdir()
        for c in names:
            write_identity(work / "keys", c)
        make_certificates(work / "certs", names)
        (work / "data").mkdir()
        words = text.read_text().split()
        per = len(words) // clients
        for i, c in enumerate(names):  # disjoint private texts
            (work / "data" / f"{c}.txt").write_text(" ".join(words[i * per : (i + 1) * per]))
        node = ["--dtype", args.dtype, "--device", args.device, "--batch-size", str(args.batch_size)]
        start = time.perf_counter()
        server, procs, _, logs = start_federation(
            work,
            mode="secure",
            strategy="one-shot",
            clients=names,
            model=str(model),
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            sparsity=0.5,
            eval_windows=args.eval_windows,
            echo=False,
            client_args={c: node for c in names},
            server_toml=[f'dtype = "{args.dtype}"', f'device = "{args.device}"'],
            round_deadline_s=7200.0,
        )
        processes = {"server": server, **procs}
        results: dict[str, tuple[int, float, int]] = {}
        hwm = {name: [0] for name in processes}
        exited = {name: threading.Event() for name in processes}

        def reap(name: str, proc) -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            exited[name].set()
            results[name] = (os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss)

        # Each process's own VmHWM, polled: wait4's ru_maxrss can also count the pages of
        # the forked copy of this (torch-importing) process before exec.
        threads = [threading.Thread(target=reap, args=item) for item in processes.items()]
        threads += [
            threading.Thread(target=_poll_hwm, args=(proc, hwm[name], exited[name]), daemon=True)
            for name, proc in processes.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {n: r[0] for n, r in results.items() if r[0] != 0}
        if failed:
            tail = {n: logs.get(n, {}).get("lines", [])[-3:] for n in failed}
            raise SystemExit(f"federation failed {failed}: {tail}")
        report = json.loads((work / "secure" / "out" / "report.json").read_text())
    return {
        "strategy": "federation",
        "clients": clients,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "wall_s": max(r[1] for r in results.values()),
        "processes": {
            n: {"wall_s": wall, "peak_rss_bytes": hwm[n][0] or kib * 1024, "wait4_maxrss_bytes": kib * 1024}
            for n, (_, wall, kib) in results.items()
        },
        "peak_rss_bytes": hwm["server"][0] or results["server"][2] * 1024,
        "federation_s": report["timings"]["federation"],
        "load_s": report["timings"]["load_model"],
        "sparsity": report["sparsity"],
        "perplexity_before": report.get("perplexity_before"),
        "perplexity_after": report.get("perplexity_after"),
    }


def wanda_like_counts(clients: int, rows: int, cols: int, seed: int = 0):
    """Vote counts of ``clients`` masks that each prune the lower half of every row by
    correlated scores (a shared |W|-like score times per-client noise), as Wanda votes are."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(rows, cols, generator=gen)
    counts = torch.zeros(rows, cols, dtype=torch.int16)
    for _ in range(clients):
        scores = base * torch.exp(0.5 * torch.randn(rows, cols, generator=gen))
        counts += scores <= torch.kthvalue(scores, cols // 2, dim=1, keepdim=True).values
    return counts


def selection_benchmark(clients_list: list[int], rows: int, cols: int, reps: int = 5) -> list[dict]:
    """Median wall and CPU seconds of ``select_final_mask`` on one (rows, cols) layer."""

    from fedprune.config import PruneConfig
    from fedprune.selection import select_final_mask

    out = []
    for clients in clients_list:
        counts = wanda_like_counts(clients, rows, cols)
        for group in ("layer", "row", "column"):
            cfg = PruneConfig(0.5, comparison_group=group)
            walls, cpus = [], []
            for _ in range(reps):
                w0, c0 = time.perf_counter(), time.process_time()
                select_final_mask(counts, cfg, salt=1)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            out.append(
                {"clients": clients, "group": group, "rows": rows, "cols": cols,
                 "wall_s": sorted(walls)[reps // 2], "cpu_s": sorted(cpus)[reps // 2]}
            )  # fmt: skip
            print(f"selection {clients} clients {group}: {json.dumps(out[-1])}", file=sys.stderr, flush=True)
    return out


def selection_markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [
        f"\nselect_final_mask on one {r0['rows']}x{r0['cols']} layer, Wanda-like votes, "
        f"sparsity 0.5, random ties (median of 5)\n",
        "| clients | group | wall (s) | CPU (s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['clients']} | {r['group']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _poll_hwm(proc: subprocess.Popen, hwm: list[int], stop: threading.Event | None = None) -> None:
    """Keep ``hwm[0]`` at the child's VmHWM (bytes) until it exits (or ``stop`` is set,
    for a child that another thread reaps)."""
    status = Path(f"/proc/{proc.pid}/status")
    while not (stop.is_set() if stop is not None else proc.poll() is not None):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
        except (OSError, ValueError):  # not Linux, or the child just exited
            pass
        time.sleep(0.2)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['shape']} shape, {meta['dtype']}, {meta['device']} ({meta['cpu']}, {meta['threads']} threads)"
    ]
    federations = [r for r in rows if r["strategy"] == "federation"]
    rows = [r for r in rows if r["strategy"] != "federation"]
    if rows:
        lines += [
            "",
            "| run | windows x tokens | wall (s) | peak RSS (GiB) | peak GPU (GiB) | prune (s) "
            "| selection (s) | selection / wall |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        gpu = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] else "-"
        lines.append(
            f"| {r['strategy']} {r['clients']} clients | {r['nsamples']} x {r['seqlen']} | {r['wall_s']:.1f} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} | {gpu} | {r['prune_s']:.1f} | {r['selection_s']:.1f} "
            f"| {r['selection_share_of_wall']:.1%} |"
        )
    if federations:
        lines += [
            "",
            "| federation (secure, one-shot) | windows x tokens per client | wall (s) | process "
            "| process wall (s) | peak RSS (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in federations:
            for name, p in r["processes"].items():
                lines.append(
                    f"| {r['clients']} clients | {r['nsamples']} x {r['seqlen']} | {r['wall_s']:.1f} "
                    f"| {name} | {p['wall_s']:.1f} | {p['peak_rss_bytes'] / 2**30:.2f} |"
                )
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.1b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="/tmp/scale-models", help="where the random models are kept")
    p.add_argument("--runs", default="centralized:2,one-shot:2,one-shot:16,one-shot:64")
    p.add_argument(
        "--nsamples",
        type=int,
        default=4,
        help="calibration windows (simulate: in all, at least one per client; federation: per client)",
    )
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="folder for scale.md and scale.json")
    p.add_argument(
        "--selection",
        default="",
        help="also time the server's selection alone on a 5632x2048 layer for these client counts (e.g. 2,16,64)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: a single run, JSON out
    args = p.parse_args()
    root = Path(args.models)
    model = build_model(args.shape, args.dtype, root)
    text = synthetic_text(root)
    if args.one:  # in its own process, so that RUSAGE_CHILDREN is this run's child alone
        strategy, clients = args.one.split(":")
        if strategy == "federation":
            print(json.dumps(run_federation(model, text, int(clients), args)))
        else:
            print(json.dumps(run_simulate(model, text, strategy, int(clients), args)))
        return 0
    import torch

    rows = []
    for item in filter(None, args.runs.split(",")):
        cmd = [sys.executable, *sys.argv, "--one", item]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"run {item} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {item}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    meta = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": args.dtype,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    table = markdown(rows, meta) if rows else ""
    result: dict = {"meta": meta, "runs": rows}
    if args.selection:
        result["selection"] = selection_benchmark([int(c) for c in args.selection.split(",")], 5632, 2048)
        table += selection_markdown(result["selection"])
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "scale.md", table)
        _atomic_write(out / "scale.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
