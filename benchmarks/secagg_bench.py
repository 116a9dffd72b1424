"""Benchmark: secure aggregation cost against this machine's single-core limit.

    python benchmarks/secagg_bench.py                 # full table (N = 1e8, m = 8; m = 64)
    python benchmarks/secagg_bench.py --quick         # N = 1e6, for a smoke run

For m clients (complete graph) each client adds m masks (1 self + m-1 pairwise)
to its packed vector; the server removes m masks (0 dropouts) or more (the
dropped client's pairwise masks with its neighbours). The limit is the time
for the same number of AES-CTR keystream bytes plus numpy adds, measured on
one core in the same run. Peak RSS of a streamed client and a streamed server
is measured in child processes for N = 1e8 and N = 1e9.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from secagg import make_session
from secagg.prg import MaskStream, context
from secagg.ring import packed_nbytes, sub_

CHUNK = 1 << 21  # elements per chunk (1 MiB at b = 4, 2 MiB at b = 8)


def limit_rates(nbytes: int = 1 << 21, repeats: int = 15) -> tuple[float, float]:
    """Single-core AES-CTR keystream and numpy uint8 add throughput, bytes/s (medians)."""
    acc = np.zeros(nbytes, dtype=np.uint8)
    stream = MaskStream.derive(os.urandom(32), b"limit")
    aes, add = [], []
    for i in range(repeats):
        t = time.perf_counter()
        out = stream.keystream(i * nbytes, nbytes)
        aes.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.add(acc, out, out=acc)
        add.append(time.perf_counter() - t)
    return nbytes / statistics.median(aes), nbytes / statistics.median(add)


def limit_seconds(masks: int, n: int, bits: int, rates: tuple[float, float]) -> float:
    nbytes = packed_nbytes(n, bits)
    return masks * (nbytes / rates[0] + nbytes / rates[1])


def open_round(server, clients) -> tuple[float, list[float]]:
    """Round 0 (fresh signed keys) and round 1 (shares): (key round seconds, share seconds per client)."""
    t = time.perf_counter()
    server.begin_round(0)
    for c in clients.values():
        server.receive_advertisement(c.advertise(0))
    directory = server.key_directory()
    for c in clients.values():
        c.receive_keys(directory)
    keys = time.perf_counter() - t
    share_times = []
    for c in clients.values():
        t0 = time.perf_counter()
        msg = c.share_keys()
        share_times.append(time.perf_counter() - t0)
        server.receive_shares(msg)
    return keys, share_times


def run_protocol(m: int, n: int, bits: int, neighbours: int | None, dropouts: int) -> dict:
    """One full round through the state machines; times per role and phase."""
    config, server, clients = make_session(
        m,
        n,
        lane_bits=bits,
        neighbours=neighbours,
        chunk_elems=min(CHUNK, -(-n // 128) * 128),
    )
    values = np.random.default_rng(0).integers(0, 2, config.chunk_elems).astype(np.uint8)
    source = lambda offset, count: values[:count]  # noqa: E731  same bits every chunk
    t = time.perf_counter()
    key_round, share_times = open_round(server, clients)
    setup = time.perf_counter() - t
    bundles = server.share_bundles()
    dropped = set(range(dropouts))
    mask_times, sum_time = [], 0.0
    for cid, bundle in bundles.items():
        clients[cid].receive_shares(bundle)
        if cid in dropped:
            continue
        t0 = time.perf_counter()
        spent_on_server = 0.0
        for chunk in clients[cid].masked_chunks(source):
            s0 = time.perf_counter()
            server.receive_chunk(chunk)
            spent_on_server += time.perf_counter() - s0
        mask_times.append(time.perf_counter() - t0 - spent_on_server)
        sum_time += spent_on_server
    survivors = server.survivor_list()
    for cid in survivors.survivors:
        server.receive_signature(clients[cid].sign_survivors(survivors))
    request = server.unmask_request()
    for cid in survivors.survivors:
        server.receive_unmask(clients[cid].unmask(request))
    t0 = time.perf_counter()
    server.finish_packed()
    unmask = time.perf_counter() - t0
    hood = len(config.graph[0])
    return {
        "m": m,
        "n": n,
        "bits": bits,
        "neighbours": hood,
        "dropouts": dropouts,
        "client_mask_s": statistics.median(mask_times),
        "client_masks": hood + 1,
        "client_share_keys_s": statistics.median(share_times),
        "server_sum_s": sum_time,
        "server_unmask_s": unmask,
        "server_unmask_masks": len(survivors.survivors) + dropouts * hood,
        "setup_s": setup,
        "key_round_s": key_round,
    }


def streamed_rss(role: str, n: int, bits: int) -> dict:
    """Peak RSS of a child process that streams one client's masking or the server's unmask."""
    code = f"import sys; sys.argv=['x']; from benchmarks.secagg_bench import _stream_child; _stream_child({role!r}, {n}, {bits})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stream_child(role: str, n: int, bits: int, m: int = 8) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if role == "client":
        config, server, clients = make_session(m, n, lane_bits=bits, chunk_elems=CHUNK)
        open_round(server, clients)
        clients[0].receive_shares(server.share_bundles()[0])
        values = np.ones(CHUNK, dtype=np.uint8)
        sent = 0
        for chunk in clients[0].masked_chunks(lambda off, cnt: values[:cnt]):
            sent += len(chunk.data)  # a transport would write it to the socket here
    else:
        # The server's unmasking, streamed over a packed sum read chunk by chunk (as from a
        # memory-mapped file): m self masks removed per chunk, bounded scratch.
        streams = [MaskStream.derive(os.urandom(32), context(b"s" * 16, 0, "self", i)) for i in range(m)]
        step = packed_nbytes(CHUNK, bits)
        total = packed_nbytes(n, bits)
        acc = np.zeros(step, dtype=np.uint8)
        sent = 0
        for start in range(0, total, step):
            size = min(step, total - start)
            for s in streams:
                sub_(acc[:size], s.keystream(start, size), bits)
            sent += size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "role": role,
                "n": n,
                "bits": bits,
                "bytes": sent,
                "seconds": time.perf_counter() - t,
                "peak_rss_mb": peak / 1024,
                "rss_before_mb": base / 1024,
            }
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    n = 10**6 if args.quick else 10**8
    rates = limit_rates()
    print(
        f"single-core limit: AES-CTR keystream {rates[0] / 1e9:.2f} GB/s, numpy add {rates[1] / 1e9:.2f} GB/s"
    )
    rows = []
    for bits in (4, 8):
        for dropouts in (0, 1):
            r = run_protocol(8, n, bits, None, dropouts)
            r["client_limit_s"] = limit_seconds(r["client_masks"], n, bits, rates)
            r["server_limit_s"] = limit_seconds(r["server_unmask_masks"], n, bits, rates)
            rows.append(r)
    print(
        "\n| m | graph | b | N | dropouts | client mask s | ×limit | server sum s | server unmask s | ×limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['m']} | complete | {r['bits']} | {r['n']:.0e} | {r['dropouts']} | {r['client_mask_s']:.2f} | "
            f"{r['client_mask_s'] / r['client_limit_s']:.2f} | {r['server_sum_s']:.2f} | {r['server_unmask_s']:.2f} | "
            f"{r['server_unmask_s'] / r['server_limit_s']:.2f} |"
        )
    n64 = 10**5 if args.quick else 10**6
    graph_rows = [run_protocol(64, n64, 8, k, 1) for k in (12, None)]
    print(
        "\n| m | graph | neighbours | N | key round s (all clients) | share keys s/client | client mask s | server unmask s (1 dropout) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in graph_rows:
        name = "SecAgg+ (k≈2·log2 m)" if r["neighbours"] < 63 else "complete"
        print(
            f"| 64 | {name} | {r['neighbours']} | {r['n']:.0e} | {r['key_round_s']:.3f} | {r['client_share_keys_s']:.3f} | "
            f"{r['client_mask_s']:.3f} | {r['server_unmask_s']:.3f} |"
        )
    rss = []
    for big in [10**7] if args.quick else [10**8, 10**9]:
        for role in ("client", "server"):
            rss.append(streamed_rss(role, big, 8))
    print("\n| streamed | b | N | bytes | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rss:
        print(
            f"| {r['role']} | {r['bits']} | {r['n']:.0e} | {r['bytes']:.2e} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"limit_bytes_per_s": rates, "rows": rows, "graph": graph_rows, "rss": rss}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
