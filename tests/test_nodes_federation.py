"""The federation with real processes on loopback ports: a tiny random LLaMA, mutual TLS.

Each test starts a real server and real client processes (python -m nodes.cli).
"""

import json
import signal
import time

import pytest

from nodes.demo import start_federation
from nodes.identity import make_certificates, write_identity

from .conftest import PROSE, save_tiny_model_dir

CLIENTS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys and certificates for a, b, c (+ a stranger 'x'), private texts, a tiny model."""
    root = tmp_path_factory.mktemp("federation")
    (root / "keys").mkdir()
    for c in CLIENTS + ["x"]:
        write_identity(root / "keys", c)
    make_certificates(root / "certs", CLIENTS + ["x"])
    (root / "data").mkdir()
    for i, c in enumerate(CLIENTS + ["x"]):
        (root / "data" / f"{c}.txt").write_text(PROSE[i * 97 :] + PROSE)
    save_tiny_model_dir(root / "model", seed=0)
    save_tiny_model_dir(root / "other-model", seed=1)
    return root


def _workdir(world, name):
    """A run directory sharing the world's keys, certificates and private texts."""
    work = world / name
    work.mkdir()
    for sub in ("keys", "certs", "data"):
        (work / sub).symlink_to(world / sub)
    return work


def _run(
    world,
    name,
    *,
    mode="secure",
    strategy="one-shot",
    clients=CLIENTS,
    roster=None,
    client_env=None,
    client_args=None,
    server_toml=None,
    round_deadline_s=60.0,
):
    work = _workdir(world, name)
    server, procs, _, logs = start_federation(
        work,
        mode=mode,
        strategy=strategy,
        clients=clients,
        model=str(world / "model"),
        nsamples=4,
        seqlen=32,
        sparsity=0.5,
        eval_windows=0,
        echo=False,
        roster_clients=roster,
        client_env=client_env,
        client_args=client_args,
        server_toml=server_toml,
        round_deadline_s=round_deadline_s,
    )
    codes = {c: p.wait(timeout=240) for c, p in procs.items()}
    server_code = server.wait(timeout=120)
    out = work / mode / "out"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return server_code, codes, report, logs, work / mode


def _last_line(logs, who):
    lines = [line for line in logs[who].get("lines", []) if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("strategy", ["one-shot", "iterative"])
def test_plain_and_secure_give_identical_final_masks(world, strategy):
    results = {}
    for mode in ("plain", "secure"):
        server_code, codes, report, logs, run_dir = _run(
            world, f"same-{strategy}-{mode}", mode=mode, strategy=strategy
        )
        assert server_code == 0 and not any(codes.values()), logs["server"].get("lines", [])[-5:]
        assert report["sparsity"] == 0.5
        results[mode] = report
        # what the server received: 1 bit per weight in plain mode, the lane width in secure mode
        total = sum(
            s["numel"] if "numel" in s else s["shape"][0] * s["shape"][1]
            for s in json.loads((run_dir / "out" / "manifest.json").read_text())["layout"]
        )
        chunk_bytes = results[mode]["bytes_received"]["a"]
        bits = 1 if mode == "plain" else 2  # 3 clients -> 2-bit lanes
        assert total * bits / 8 <= chunk_bytes < total * bits / 8 * 1.2 + 20000
        assert (run_dir / "out" / "pruned-model" / "model.safetensors").exists()
    assert results["plain"]["final_mask_sha256"] == results["secure"]["final_mask_sha256"]


def test_audit_shows_plain_masks_visible_and_secure_vectors_uniform(world):
    from nodes.audit import audit

    for mode in ("plain", "secure"):
        code, codes, report, logs, run_dir = _run(world, f"audit-{mode}", mode=mode)
        assert code == 0
        text, ok = audit(run_dir / "audit")
        assert ok and "hash chain: intact" in text
        if mode == "plain":
            assert text.count("VISIBLE") == 3
        else:
            assert "VISIBLE" not in text and text.count("uniform 2-bit lanes") == 3
            assert "only the aggregate vote counts" in text
    # tampering with the transcript breaks the chain
    path = run_dir / "audit" / "transcript.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"size": ', '"size": 1')
    path.write_text("\n".join(lines) + "\n")
    text, ok = audit(run_dir / "audit")
    assert not ok and "BROKEN" in text


def test_client_killed_after_masked_input_and_refused_impostors(world):
    """c vanishes after sending its masked input; x is not on the roster; b2 signs with a's key...

    The round completes from the survivors' shares and equals the plain sum over all of a, b, c.
    """
    _, _, plain, _, _ = _run(world, "ref-abc", mode="plain")
    code, codes, report, logs, _ = _run(
        world,
        "killed-after",
        clients=CLIENTS + ["x"],
        roster=CLIENTS,
        client_env={"c": {"FEDPRUNE_FAULT": "exit-after-input"}, "b": {"FEDPRUNE_FAULT": "bad-chunk"}},
    )
    assert code == 0 and codes["a"] == 0 and codes["b"] == 0 and codes["c"] == 3
    assert codes["x"] != 0 and "not on the roster" in _last_line(logs, "x")
    assert report["final_mask_sha256"] == plain["final_mask_sha256"]
    assert report["rejected"].get("ProtocolError", 0) >= 2  # b's off-grid and duplicate chunks
    assert any("x" in r for r in report["refused"])


def test_client_killed_before_input_is_dropped(world):
    _, _, plain_ab, _, _ = _run(world, "ref-ab", mode="plain", clients=["a", "b"])
    code, codes, report, logs, _ = _run(
        world,
        "killed-before",
        client_env={"c": {"FEDPRUNE_FAULT": "exit-before-input"}},
    )
    assert code == 0 and codes["c"] == 3
    assert report["rounds"][0]["contributors"] == ["a", "b"]
    assert report["final_mask_sha256"] == plain_ab["final_mask_sha256"]


def test_fewer_than_threshold_aborts_and_writes_nothing(world):
    code, codes, report, logs, run_dir = _run(
        world,
        "too-few",
        client_env={"c": {"FEDPRUNE_FAULT": "exit-before-input"}},
        server_toml=["threshold = 3"],
    )
    assert code == 2 and report is None
    assert not (run_dir / "out" / "final-mask.bin").exists()
    assert "at least t = " in _last_line(logs, "server") or "aborted" in _last_line(logs, "server")
    assert codes["a"] != 0 and "aborted" in _last_line(logs, "a")


def test_bad_signature_wrong_fingerprint_and_wrong_certificate_are_refused(world):
    keys, certs = world / "keys", world / "certs"
    code, codes, report, logs, _ = _run(
        world,
        "refusals",
        clients=["a", "b", "c"],
        roster=["a", "b"],
        client_args={
            "c": [
                "--id",
                "b",
                "--identity",
                str(keys / "a.key"),
                "--tls-cert",
                str(certs / "b.crt"),
                "--tls-key",
                str(certs / "b.tls.key"),
            ],
        },
    )
    assert code == 0 and codes["a"] == 0 and codes["b"] == 0
    assert codes["c"] != 0 and ("signature" in _last_line(logs, "c") or "already" in _last_line(logs, "c"))
    code, codes, report, logs, _ = _run(
        world,
        "fingerprint",
        clients=["a", "b", "c"],
        client_args={"c": ["--model", str(world / "other-model")]},
        server_toml=["join_deadline_s = 15"],
    )
    assert codes["c"] != 0 and "fingerprint" in _last_line(logs, "c")
    code, codes, report, logs, _ = _run(
        world,
        "tls",
        clients=["a", "b", "c"],
        client_args={"c": ["--tls-cert", str(certs / "x.crt"), "--tls-key", str(certs / "x.tls.key")]},
        server_toml=["join_deadline_s = 15"],
    )
    assert codes["c"] != 0 and "TLS certificate" in _last_line(logs, "c")


def test_server_killed_mid_round_clients_exit_with_a_clear_message(world):
    work = _workdir(world, "server-killed")
    server, procs, _, logs = start_federation(
        work,
        mode="secure",
        strategy="iterative",
        clients=CLIENTS,
        model=str(world / "model"),
        nsamples=4,
        seqlen=32,
        sparsity=0.5,
        eval_windows=0,
        echo=False,
        round_deadline_s=60.0,
        client_args={c: ["--save-model", str(work / f"{c}-model")] for c in CLIENTS},
        client_env={"c": {"FEDPRUNE_FAULT": "stall-before-input"}},  # holds round 0 open
    )
    deadline = time.monotonic() + 120
    while not all(any("local masks ready" in line for line in logs[c].get("lines", [])) for c in CLIENTS):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)  # a and b send their masked input; the server waits for c
    assert server.poll() is None
    server.send_signal(signal.SIGKILL)
    server.wait()
    start = time.monotonic()
    try:
        codes = {c: procs[c].wait(timeout=90) for c in ("a", "b")}
    finally:
        procs["c"].kill()
    assert time.monotonic() - start < 90
    assert all(code != 0 for code in codes.values())
    for c in ("a", "b"):
        assert "server" in _last_line(logs, c) and "Traceback" not in "\n".join(logs[c]["lines"])
        assert not (work / f"{c}-model").exists()
    assert not (work / "secure" / "out" / "report.json").exists()


def test_committed_stubs_match_the_proto(tmp_path):
    from nodes.wire.generate import ROOT, generate

    generate(tmp_path)
    for name in ("federation_pb2.py", "federation_pb2_grpc.py"):
        assert (tmp_path / "nodes" / "wire" / name).read_text() == (
            ROOT / "nodes" / "wire" / name
        ).read_text()


def test_insecure_is_only_for_loopback(tmp_path, capsys):
    from nodes.cli import main

    code = main(["server", "--insecure", "--listen", "0.0.0.0:5000", "--model", "x"])
    assert code == 2 and "loopback" in capsys.readouterr().err


def test_reference_tie_break_runs_in_the_federation(world):
    """One fill generator across the server's rounds (one per block), layers in order."""
    server_code, codes, report, logs, _ = _run(
        world, "ties-reference", mode="plain", strategy="iterative", server_toml=['tie_break = "reference"']
    )
    assert server_code == 0 and not any(codes.values()), logs["server"].get("lines", [])[-5:]
    assert report["sparsity"] == 0.5
