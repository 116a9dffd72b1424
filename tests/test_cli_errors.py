"""Every user mistake ends in one line on stderr, exit status 2, and nothing written.

The key cases run as real processes (``python -m nodes.cli ...``), a few at a
time so that the torch imports overlap; the rest run in process through
``main``. Every case runs in its own directory, which must be unchanged
afterwards: the check comes before any model runs or any output is written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nodes.cli import main
from tests.conftest import PROSE

ROOT = Path(__file__).resolve().parents[1]
HEX_KEY = "ab" * 32


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


def _text(d: Path) -> str:
    path = d / "private.txt"
    path.write_text(PROSE)
    return str(path)


def _server_toml(d: Path, model: Path, *lines: str, roster: tuple[str, ...] = ("org-1", "org-2")) -> str:
    body = [
        f'model = "{model}"',
        f'audit_dir = "{d / "out" / "audit"}"',
        f'output_dir = "{d / "out" / "out"}"',
        *lines,
        "[roster]",
        *(f'"{cid}" = "{HEX_KEY}"' for cid in roster),
    ]
    path = d / "server.toml"
    path.write_text("\n".join(body) + "\n")
    return str(path)


def _dummy_tls(d: Path) -> list[str]:
    names = [d / "server.crt", d / "server.tls.key", d / "ca.pem"]
    for p in names:
        p.write_text("placeholder\n")
    return [f'tls_cert = "{names[0]}"', f'tls_key = "{names[1]}"', f'client_ca = "{names[2]}"']


def _identity(d: Path) -> str:
    from nodes.identity import write_identity

    write_identity(d, "org-1")
    return str(d / "org-1.key")


def _transcript(d: Path, payload: bytes) -> Path:
    """A well-formed audit directory (intact chain) whose one chunk payload is ``payload``."""
    from nodes.audit import Transcript

    audit_dir = d / "audit"
    transcript = Transcript(audit_dir)
    transcript.record("org-1", 0, "chunk", payload)
    transcript.close()
    return audit_dir


# ---- the cases: name -> setup(case_dir, ctx) returning the argv ------------------------------

Setup = Callable[[Path, dict], list[str]]


def _simulate(d: Path, ctx: dict, model: str | None = None) -> list[str]:
    return ["simulate", "--model", model or str(ctx["model"]), "--calib", _text(d), "--no-progress"]


def _binary_toml(d, ctx):
    (d / "server.toml").write_bytes(bytes(range(256)) * 4)
    return ["server", "--config", str(d / "server.toml")]


def _missing_tls(d, ctx):
    lines = [f'tls_cert = "{d / "no.crt"}"', f'tls_key = "{d / "no.key"}"', f'client_ca = "{d / "no.pem"}"']
    return ["server", "--config", _server_toml(d, ctx["model"], *lines)]


def _listen_in_use(d, ctx):
    toml = _server_toml(d, ctx["model"], "insecure = true", f'listen = "127.0.0.1:{ctx["busy_port"]}"')
    return ["server", "--config", toml]


def _json_is_dir(d, ctx):
    return [*_simulate(d, ctx), "--json", "."]


def _random_gguf(d, ctx):
    (d / "model.gguf").write_bytes(os.urandom(4096))
    return [*_simulate(d, ctx, str(d / "model.gguf")), "--json", str(d / "out.json")]


def _broken_config(d, ctx):
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    return [*_simulate(d, ctx, str(d / "model")), "--json", str(d / "out.json")]


def _study_without_eval(d, ctx):
    return [*_simulate(d, ctx), "--study", "--eval", "", "--out-dir", str(d / "study")]


def _keys_out_is_file(d, ctx):
    (d / "keys").write_text("not a directory\n")
    return ["keys", "--out", str(d / "keys"), "org-1"]


def _keys_id_escapes(d, ctx):
    (d / "keys").mkdir()
    return ["keys", "--out", str(d / "keys"), "org-1", "../x"]


def _demo_no_clients(d, ctx):
    return ["demo", "--clients", "0", "--workdir", str(d / "demo"), "--model", str(ctx["model"])]


def _audit_not_utf8(d, ctx):
    audit_dir = _transcript(d, b"\x00")
    with open(audit_dir / "transcript.jsonl", "ab") as f:
        f.write(b"\xff\xfe\xfa not text\n")
    return ["audit", str(audit_dir)]


def _client_seqlen_zero(d, ctx):
    return [
        "client",
        "--server",
        "127.0.0.1:9",
        "--insecure",
        "--id",
        "org-1",
        "--identity",
        _identity(d),
        "--data",
        _text(d),
        "--model",
        str(ctx["model"]),
        "--seqlen",
        "0",
        "--save-model",
        str(d / "pruned"),
    ]


PROCESS_CASES: dict[str, Setup] = {
    "server --config <binary file>": _binary_toml,
    "server: TLS files missing": _missing_tls,
    "server --listen <port in use>": _listen_in_use,
    "simulate --json .": _json_is_dir,
    "simulate --model <random .gguf>": _random_gguf,
    "simulate --study --eval ''": _study_without_eval,
    "keys --out <file>": _keys_out_is_file,
    "keys ../x": _keys_id_escapes,
    "demo --clients 0": _demo_no_clients,
    "audit <non-UTF-8 transcript>": _audit_not_utf8,
    "client --seqlen 0": _client_seqlen_zero,
}


def _certs_out_is_file(d, ctx):
    (d / "certs").write_text("not a directory\n")
    return ["certs", "--out", str(d / "certs"), "org-1"]


def _certs_id_with_slash(d, ctx):
    return ["certs", "--out", str(d / "certs"), "org/1"]


def _certs_id_server(d, ctx):
    return ["certs", "--out", str(d / "certs"), "server"]


def _keys_id_with_slash(d, ctx):
    return ["keys", "--out", str(d / "keys"), "org/1"]


def _demo_sparsity(d, ctx):
    return ["demo", "--sparsity", "2", "--workdir", str(d / "demo"), "--model", str(ctx["model"])]


def _audit_bad_blob(d, ctx):
    return ["audit", str(_transcript(d, b"\xff\xff\xff\xff garbage"))]


def _audit_broken_session(d, ctx):
    audit_dir = _transcript(d, b"")
    (audit_dir / "session.json").write_text('{"mode": "secure", "lane_bits": ')
    return ["audit", str(audit_dir)]


def _audit_bad_lane_bits(d, ctx):
    audit_dir = _transcript(d, b"")
    (audit_dir / "session.json").write_text('{"mode": "secure", "lane_bits": 3}')
    return ["audit", str(audit_dir)]


def _audit_no_dir(d, ctx):
    return ["audit", str(d / "missing")]


def _server_chunk(value):
    def setup(d, ctx):
        toml = _server_toml(d, ctx["model"], "insecure = true", 'mode = "plain"', f"chunk_elems = {value}")
        return ["server", "--config", toml]

    return setup


def _server_non_toml(d, ctx):
    (d / "server.toml").write_text("this is = = not toml\n")
    return ["server", "--config", str(d / "server.toml")]


def _server_config_is_dir(d, ctx):
    return ["server", "--config", str(d)]


def _server_roster_id(d, ctx):
    toml = _server_toml(d, ctx["model"], "insecure = true", roster=("org-1", "../org-2"))
    return ["server", "--config", toml]


def _server_listen_foreign(d, ctx):
    toml = _server_toml(d, ctx["model"], *_dummy_tls(d), 'listen = "192.0.2.1:50051"')
    return ["server", "--config", toml]


def _server_listen_malformed(d, ctx):
    return ["server", "--config", _server_toml(d, ctx["model"], "insecure = true", 'listen = "127.0.0.1"')]


def _server_audit_dir_is_file(d, ctx):
    (d / "audit").write_text("a file\n")
    toml = _server_toml(d, ctx["model"], "insecure = true", f'audit_dir = "{d / "audit"}"')
    return ["server", "--config", toml, "--listen", "127.0.0.1:0"]


def _save_model_is_file(d, ctx):
    (d / "pruned").write_text("a file\n")
    return [*_simulate(d, ctx), "--save-model", str(d / "pruned")]


def _out_dir_is_file(d, ctx):
    (d / "study").write_text("a file\n")
    return [*_simulate(d, ctx), "--study", "--eval", _text(d), "--out-dir", str(d / "study")]


def _json_missing_dir(d, ctx):
    return [*_simulate(d, ctx), "--json", str(d / "no" / "out.json")]


def _study_empty_grid(d, ctx):
    return [*_simulate(d, ctx), "--study", "--eval", _text(d), "--strategies", "", "--out-dir", str(d / "s")]


def _client_args(d, ctx, *extra):
    return [
        "client",
        "--server",
        "127.0.0.1:9",
        "--id",
        "org-1",
        "--identity",
        _identity(d),
        "--data",
        _text(d),
        "--model",
        str(ctx["model"]),
        *extra,
    ]


def _client_id_with_slash(d, ctx):
    args = _client_args(d, ctx, "--insecure")
    args[args.index("--id") + 1] = "org/1"
    return args


def _client_missing_tls(d, ctx):
    return _client_args(d, ctx, "--tls-ca", str(d / "ca.pem"), "--tls-cert", "x.crt", "--tls-key", "x.key")


def _client_missing_data(d, ctx):
    args = _client_args(d, ctx, "--insecure")
    args[args.index("--data") + 1] = str(d / "missing.txt")
    return args


def _client_bad_identity(d, ctx):
    args = _client_args(d, ctx, "--insecure")
    (d / "bad.key").write_bytes(b"\xff\x00 not a key")
    args[args.index("--identity") + 1] = str(d / "bad.key")
    return args


def _server_statistics(*lines, flags=(), strategy="statistics"):
    def setup(d, ctx):
        toml = _server_toml(d, ctx["model"], "insecure = true", f'strategy = "{strategy}"', *lines)
        return ["server", "--config", toml, *flags]

    return setup


def _demo_dp_both_modes(d, ctx):
    return [
        "demo",
        "--strategy",
        "statistics",
        "--dp-epsilon",
        "8",
        "--dp-delta",
        "1e-5",
        "--stats-clip",
        "100",
        "--workdir",
        str(d / "demo"),
        "--model",
        str(ctx["model"]),
    ]


IN_PROCESS_CASES: dict[str, Setup] = {
    "server statistics, DP with mode plain": _server_statistics(
        'mode = "plain"', "stats_clip = 100.0", flags=("--dp-epsilon", "8", "--dp-delta", "1e-5")
    ),
    "server statistics --dp-epsilon 0": _server_statistics(
        "stats_clip = 100.0", flags=("--dp-epsilon", "0", "--dp-delta", "1e-5")
    ),
    "server statistics dp_delta = 1": _server_statistics(
        "stats_clip = 100.0", "dp_epsilon = 8.0", "dp_delta = 1.0"
    ),
    "server statistics --stats-clip 0": _server_statistics(flags=("--stats-clip", "0")),
    "server statistics DP without a clip": _server_statistics("dp_epsilon = 8.0", "dp_delta = 1e-5"),
    "server one-shot --dp-epsilon 8": _server_statistics(
        flags=("--dp-epsilon", "8", "--dp-delta", "1e-5"), strategy="one-shot"
    ),
    "demo --strategy statistics --dp-epsilon (mode both)": _demo_dp_both_modes,
    "simulate --model <dir with broken config.json>": _broken_config,
    "certs --out <file>": _certs_out_is_file,
    "certs org/1": _certs_id_with_slash,
    "certs server (reserved)": _certs_id_server,
    "keys org/1": _keys_id_with_slash,
    "demo --sparsity 2": _demo_sparsity,
    "audit <blob that is not a message>": _audit_bad_blob,
    "audit <broken session.json>": _audit_broken_session,
    "audit <session.json lane_bits 3>": _audit_bad_lane_bits,
    "audit <missing dir>": _audit_no_dir,
    "server chunk_elems = 100 (plain)": _server_chunk(100),
    "server chunk_elems = 0": _server_chunk(0),
    "server chunk_elems = 7": _server_chunk(7),
    "server --config <not TOML>": _server_non_toml,
    "server --config <a directory>": _server_config_is_dir,
    "server roster id ../org-2": _server_roster_id,
    "server --listen <foreign address>": _server_listen_foreign,
    "server --listen <no port>": _server_listen_malformed,
    "server audit_dir <file>": _server_audit_dir_is_file,
    "simulate --save-model <file>": _save_model_is_file,
    "simulate --study --out-dir <file>": _out_dir_is_file,
    "simulate --json <missing dir>/x": _json_missing_dir,
    "simulate --study --strategies ''": _study_empty_grid,
    "client --id org/1": _client_id_with_slash,
    "client: TLS files missing": _client_missing_tls,
    "client --data <missing>": _client_missing_data,
    "client --identity <not a key>": _client_bad_identity,
}


def _assert_one_line_exit_2(code: int, stderr: str, before: dict, after: dict) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fedprune: error: "), stderr
    assert after == before, f"files changed: {set(after) ^ set(before) or 'contents'}"


@pytest.fixture(scope="module")
def ctx(tiny_model_dir):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"model": tiny_model_dir, "busy_port": busy.getsockname()[1]}
    busy.close()


@pytest.fixture(scope="module")
def process_results(ctx, tmp_path_factory):
    """Run every process case (a few at a time); name -> (exit code, stderr, before, after)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(item):
        name, setup = item
        d = tmp_path_factory.mktemp("case")
        argv = setup(d, ctx)
        before = _snapshot(d)
        proc = subprocess.run(
            [sys.executable, "-m", "nodes.cli", *argv],
            cwd=d,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return name, (proc.returncode, proc.stderr, before, _snapshot(d))

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, PROCESS_CASES.items()))


@pytest.mark.parametrize("name", list(PROCESS_CASES))
def test_process_case(name, process_results):
    _assert_one_line_exit_2(*process_results[name])


@pytest.mark.parametrize("name", list(IN_PROCESS_CASES))
def test_in_process_case(name, ctx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = IN_PROCESS_CASES[name](tmp_path, ctx)
    before = _snapshot(tmp_path)
    code = main(argv)
    _assert_one_line_exit_2(code, capsys.readouterr().err, before, _snapshot(tmp_path))


def test_chunk_elems_must_be_aligned():
    from nodes.config import NodeConfigError, ServerConfig

    roster = {"org-1": HEX_KEY, "org-2": HEX_KEY}
    ServerConfig(insecure=True, roster=roster, chunk_elems=256).validate()
    for bad in (0, -128, 8, 100, 129, True, "128"):
        with pytest.raises(NodeConfigError, match="multiple of 128"):
            ServerConfig(insecure=True, roster=roster, chunk_elems=bad).validate()


def test_the_command_line_catches_the_package_roots_and_nothing_else():
    """Every nodes error is a NodesError; the CLI treats the roots as user errors, bugs as bugs."""
    import nodes.errors
    from fedprune.errors import VoteCountError
    from nodes.cli import is_user_error
    from secagg.errors import ReplayError

    tree = [c for c in vars(nodes.errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(tree) >= 10 and all(issubclass(c, nodes.errors.NodesError) for c in tree)
    assert all(is_user_error(c("x")) for c in tree)
    assert is_user_error(VoteCountError("x")) and is_user_error(ReplayError("x"))
    assert not is_user_error(ValueError("a bug")) and not is_user_error(KeyError("a bug"))
