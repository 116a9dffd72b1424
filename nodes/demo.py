"""``fedprune demo``: a whole federation on 127.0.0.1, once in plain and once in secure mode.

Real processes on real sockets with mutual TLS: one server and N clients,
each client holding a disjoint part of the embedded corpus as its private
text. Prints a table comparing the modes and the audit verdict of each.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedprune.config import prune_config
from fedprune.data import EMBEDDED_CORPUS, load_text
from fedprune.models import resolve_spec

from .audit import audit
from .config import ServerConfig
from .errors import DemoError, NodeConfigError
from .files import check_output_dir
from .identity import make_certificates, write_identity
from .traffic import human_bytes


def _pump(proc: subprocess.Popen, prefix: str, found: dict, echo: bool) -> None:
    for line in proc.stderr:
        line = line.rstrip()
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            found["port"] = int(match.group(1))
        found.setdefault("lines", []).append(line)
        if echo and not line.startswith(("Loading weights", "\r")):
            print(f"  [{prefix}] {line}", file=sys.stderr, flush=True)


def start_federation(
    workdir: Path,
    *,
    mode: str,
    strategy: str,
    clients: list[str],
    model: str,
    nsamples: int,
    seqlen: int,
    sparsity: float,
    eval_windows: int,
    echo: bool = True,
    extra_server: list[str] | None = None,
    client_launcher: dict[str, list[str]] | None = None,
    data: dict[str, Path] | None = None,
    round_deadline_s: float = 600.0,
    roster_clients: list[str] | None = None,
    client_args: dict[str, list[str]] | None = None,
    server_toml: list[str] | None = None,
):
    """Start a server and its clients; return (server, {client: process}, port, logs).

    ``logs`` maps each process name to {"lines": [...]} of its stderr (and the server's "port").
    ``client_launcher[c]`` replaces the command that starts client c (``python -m nodes.cli``);
    the tests start faulty clients this way (tests/fault_client.py).
    """
    keys, certs = workdir / "keys", workdir / "certs"
    roster = {c: (keys / f"{c}.pub").read_text().strip() for c in (roster_clients or clients)}
    run_dir = workdir / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    toml = [
        'listen = "127.0.0.1:0"',
        f'model = "{model}"',
        f'mode = "{mode}"',
        f'strategy = "{strategy}"',
        f"sparsity = {sparsity}",
        f"expected_clients = {len(roster)}",
        f"min_clients = {min(2, len(roster))}",
        f'tls_cert = "{certs / "server.crt"}"',
        f'tls_key = "{certs / "server.tls.key"}"',
        f'client_ca = "{certs / "ca.pem"}"',
        f'audit_dir = "{run_dir / "audit"}"',
        f'output_dir = "{run_dir / "out"}"',
        f"round_deadline_s = {round_deadline_s}",
        "join_deadline_s = 300",
        f"eval_windows = {eval_windows}",
        f"eval_seqlen = {seqlen}",
    ]
    if eval_windows:
        toml.append(f'eval_sources = ["{EMBEDDED_CORPUS}"]')
    settings = {line.split("=", 1)[0].strip(): line for line in toml + (server_toml or [])}
    toml = list(settings.values())  # later lines override earlier keys
    toml.append("[roster]")
    toml += [f'"{c}" = "{pk}"' for c, pk in roster.items()]
    (run_dir / "server.toml").write_text("\n".join(toml) + "\n")
    cli = [sys.executable, "-m", "nodes.cli"]
    server = subprocess.Popen(
        cli + ["server", "--config", str(run_dir / "server.toml"), *(extra_server or [])],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    found: dict = {}
    threading.Thread(target=_pump, args=(server, "server", found, echo), daemon=True).start()
    deadline = time.monotonic() + 300
    while "port" not in found:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start")
        time.sleep(0.1)
    port = found["port"]
    procs: dict = {}
    logs: dict = {}
    for c in clients:
        procs[c] = subprocess.Popen(
            (client_launcher or {}).get(c, cli)
            + [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--id",
                c,
                "--identity",
                str(keys / f"{c}.key"),
                "--data",
                str((data or {}).get(c, workdir / "data" / f"{c}.txt")),
                "--model",
                model,
                "--nsamples",
                str(nsamples),
                "--seqlen",
                str(seqlen),
                "--tls-ca",
                str(certs / "ca.pem"),
                "--tls-cert",
                str(certs / f"{c}.crt"),
                "--tls-key",
                str(certs / f"{c}.tls.key"),
                "--receipts",
                str(run_dir / "receipts" / f"{c}.json"),
                *(client_args or {}).get(c, []),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        logs[c] = {}
        threading.Thread(target=_pump, args=(procs[c], c, logs[c], echo), daemon=True).start()
    logs["server"] = found
    return server, procs, port, logs


def _traffic_line(mode: str, report: dict) -> str:
    """Bytes each client sent, next to what one-shot voting would send (nodes.traffic)."""
    t = report.get("traffic", {})
    per_round = [max(r["bytes_received"].values()) for r in report["rounds"]]
    one_shot = next(
        (e for e in t.get("expected", []) if e["strategy"] == "one-shot" and e["mode"] == mode), None
    )
    line = (
        f"{mode} {report['config']['strategy']}: {len(per_round)} round(s), at most "
        f"{human_bytes(max(per_round))} per client per round, "
        f"{human_bytes(max(t.get('bytes_received_per_client', {0: 0}).values()))} per client in all"
    )
    if one_shot is not None and report["config"]["strategy"] != "one-shot":
        voting = one_shot["upload_per_client"] + one_shot["key_bytes_per_client"]
        line += f" (one-shot voting would upload {human_bytes(voting)})"
    dp = report.get("statistics", {}).get("dp")
    if dp:
        line += f"; DP (epsilon, delta) = ({dp['epsilon']:g}, {dp['delta']:g}) per client"
    return line


def prepare_workdir(workdir: Path, clients: list[str]) -> None:
    """Identity keys, certificates, and each client's private share of the embedded corpus."""
    (workdir / "keys").mkdir(parents=True, exist_ok=True)
    for c in clients:
        write_identity(workdir / "keys", c)
    make_certificates(workdir / "certs", clients)
    lines = load_text(EMBEDDED_CORPUS, "calibration").splitlines()
    (workdir / "data").mkdir(exist_ok=True)
    per = len(lines) // len(clients)
    for i, c in enumerate(clients):
        (workdir / "data" / f"{c}.txt").write_text("\n".join(lines[i * per : (i + 1) * per]))


def check_demo_args(args) -> None:
    """Every setting checked before the workdir or any process exists."""
    if args.clients < 2:
        raise DemoError(f"a federation needs at least 2 clients, got --clients {args.clients}")
    if args.clients > 64:
        raise DemoError(f"the demo runs every client on this machine: at most 64, got {args.clients}")
    if args.nsamples < 1 or args.seqlen < 2 or args.eval_windows < 0:
        raise DemoError("need --nsamples >= 1, --seqlen >= 2 and --eval-windows >= 0")
    prune_config(sparsity=args.sparsity)  # raises PruningConfigError when out of (0, 1)
    try:
        _statistics_toml(args)
    except NodeConfigError as exc:
        raise DemoError(str(exc).replace("mode = secure", "--mode secure")) from exc
    if args.workdir:
        check_output_dir(args.workdir, "--workdir", create_parents=True)


def _statistics_toml(args) -> list[str]:
    """The server.toml lines of the statistics settings, checked as the server checks them."""
    lines = [f"seqlen = {args.seqlen}"]
    for key in ("stats_clip", "dp_epsilon", "dp_delta"):
        value = getattr(args, key, None)
        if value is not None:
            lines.append(f"{key} = {value!r}")
    dp = getattr(args, "dp_epsilon", None) is not None or getattr(args, "dp_delta", None) is not None
    if dp and args.mode != "secure":
        raise NodeConfigError(
            "differential privacy needs --mode secure (plain aggregation shows each noise share)"
        )
    ServerConfig(
        strategy=args.strategy,
        mode="secure" if args.mode == "both" else args.mode,
        seqlen=args.seqlen,
        stats_clip=getattr(args, "stats_clip", None),
        dp_epsilon=getattr(args, "dp_epsilon", None),
        dp_delta=getattr(args, "dp_delta", None),
    )._check_statistics()
    return lines


def run_demo(args) -> int:
    check_demo_args(args)
    clients = [f"org-{i + 1}" for i in range(args.clients)]
    resolve_spec(args.model)  # fetch and convert the model once, before anything is written
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedprune-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"demo workdir: {workdir}", file=sys.stderr)
    prepare_workdir(workdir, clients)
    modes = ["plain", "secure"] if args.mode == "both" else [args.mode]
    rows = []
    for mode in modes:
        print(
            f"== {mode} federation: 1 server + {len(clients)} clients on 127.0.0.1 (mutual TLS)",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        server, procs, _, _ = start_federation(
            workdir,
            mode=mode,
            strategy=args.strategy,
            clients=clients,
            model=args.model,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            sparsity=args.sparsity,
            eval_windows=args.eval_windows,
            server_toml=_statistics_toml(args),
        )
        codes = {c: p.wait() for c, p in procs.items()}
        server_code = server.wait()
        wall = time.perf_counter() - t0
        if server_code != 0 or any(codes.values()):
            print(f"demo: {mode} run failed (server {server_code}, clients {codes})", file=sys.stderr)
            return 1
        report = json.loads((workdir / mode / "out" / "report.json").read_text())
        _, verdict = audit(workdir / mode / "audit")
        rows.append((mode, report, wall, verdict))
    header = [
        "mode",
        "final mask sha256",
        "server received",
        "key agreement s",
        "federation s",
        "wall s",
        "sparsity",
        "ppl before",
        "ppl after",
        "audit",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for mode, r, wall, verdict in rows:
        ppl_b = next(iter(r.get("perplexity_before", {"-": float("nan")}).values()))
        ppl_a = next(iter(r.get("perplexity_after", {"-": float("nan")}).values()))
        what = "statistics" if args.strategy == "statistics" else "mask"
        audit_text = (
            (
                "PASS: server saw only uniform masked vectors"
                if mode == "secure"
                else f"PASS: chain intact; every client's {what} VISIBLE"
            )
            if verdict
            else "FAIL"
        )
        print(
            f"| {mode} | {r['final_mask_sha256'][:16]}… | {human_bytes(sum(r['bytes_received'].values()))} | "
            f"{r['timings'].get('key_agreement', 0):.2f} | {r['timings']['federation']:.1f} | {wall:.1f} | "
            f"{r['sparsity']:.3f} | {ppl_b:.2f} | {ppl_a:.2f} | {audit_text} |"
        )
    for mode, r, _, _ in rows:
        print(_traffic_line(mode, r))
    if len(rows) == 2:
        same = rows[0][1]["final_mask_sha256"] == rows[1][1]["final_mask_sha256"]
        print(f"\nplain and secure final masks are {'IDENTICAL' if same else 'DIFFERENT'}")
        if not same:
            return 1
    print(f"audit transcripts: {workdir}/<mode>/audit  (inspect with: fedprune audit DIR)")
    return 0
