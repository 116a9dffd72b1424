"""The federation with real processes on loopback ports: a tiny random LLaMA, mutual TLS.

Each test starts a real server and real client processes (python -m nodes.cli).
"""

import json
import signal
import sys
import time

import numpy as np
import pytest

from nodes.demo import start_federation
from nodes.identity import make_certificates, write_identity

from .conftest import PROSE, save_tiny_model_dir

CLIENTS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("federation"))


def make_world(root):
    """Keys and certificates for a, b, c (+ a stranger 'x'), private texts, a tiny model."""
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
    faults=None,
    client_args=None,
    server_toml=None,
    round_deadline_s=120.0,
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
        client_launcher=_launchers(faults),
        client_args=client_args,
        server_toml=server_toml,
        round_deadline_s=round_deadline_s,
    )
    codes = {c: p.wait(timeout=240) for c, p in procs.items()}
    server_code = server.wait(timeout=120)
    out = work / mode / "out"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return server_code, codes, report, logs, work / mode


_PLAIN_REFERENCES: dict = {}


def _plain_reference(world, clients):
    """A plain one-shot run over ``clients`` (the mask to compare against), run once per module."""
    key = tuple(clients)
    if key not in _PLAIN_REFERENCES:
        _PLAIN_REFERENCES[key] = _run(world, "ref-" + "".join(clients), mode="plain", clients=list(clients))
    return _PLAIN_REFERENCES[key]


def _launchers(faults):
    """Start client c as ``python -m tests.fault_client FAULT`` for each c -> FAULT."""
    return {c: [sys.executable, "-m", "tests.fault_client", f] for c, f in (faults or {}).items()}


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
        assert (run_dir / "out" / "pruned-model" / "model.safetensors.index.json").exists()  # block shards
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
    _, _, plain, _, _ = _plain_reference(world, CLIENTS)
    code, codes, report, logs, _ = _run(
        world,
        "killed-after",
        clients=CLIENTS + ["x"],
        roster=CLIENTS,
        faults={"c": "exit-after-input", "b": "bad-chunk"},
    )
    assert code == 0 and codes["a"] == 0 and codes["b"] == 0 and codes["c"] == 3
    assert codes["x"] != 0 and "not on the roster" in _last_line(logs, "x")
    assert report["final_mask_sha256"] == plain["final_mask_sha256"]
    assert report["rejected"].get("ProtocolError", 0) >= 2  # b's off-grid and duplicate chunks
    assert any("x" in r for r in report["refused"])


def test_client_killed_before_input_is_dropped(world):
    _, _, plain_ab, _, _ = _plain_reference(world, ["a", "b"])
    code, codes, report, logs, _ = _run(
        world,
        "killed-before",
        faults={"c": "exit-before-input"},
    )
    assert code == 0 and codes["c"] == 3
    assert report["rounds"][0]["contributors"] == ["a", "b"]
    assert report["final_mask_sha256"] == plain_ab["final_mask_sha256"]


def test_fewer_than_threshold_aborts_and_writes_nothing(world):
    code, codes, report, logs, run_dir = _run(
        world,
        "too-few",
        faults={"c": "exit-before-input"},
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
        faults={"a": "late-join", "b": "late-join"},  # c tries first, before the session starts
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
    # One federation for two more refusals (each refused client costs a join deadline):
    # x brings another model, c presents x's (valid) certificate under its own name.
    code, codes, report, logs, _ = _run(
        world,
        "fingerprint-and-tls",
        clients=["a", "b", "c", "x"],
        client_args={
            "x": ["--model", str(world / "other-model")],
            "c": ["--tls-cert", str(certs / "x.crt"), "--tls-key", str(certs / "x.tls.key")],
        },
        server_toml=["join_deadline_s = 25"],
    )
    assert code == 0 and codes["a"] == 0 and codes["b"] == 0 and report["members"] == ["a", "b"]
    assert codes["x"] != 0 and "fingerprint" in _last_line(logs, "x")
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
        client_launcher=_launchers({"c": "stall-before-input"}),  # holds round 0 open
    )
    deadline = time.monotonic() + 120
    while not all(any("ready in" in line for line in logs[c].get("lines", [])) for c in CLIENTS):
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


def _records(run_dir, sender=None, rnd=None, kind=None):
    """(record, parsed ClientMessage) pairs from a run's audit directory."""
    from nodes.audit import read_records
    from nodes.wire import federation_pb2 as pb

    records, error = read_records(run_dir / "audit")
    assert error is None
    out = []
    for rec in records:
        if (sender, rnd, kind) != (None, None, None) and (
            (sender is not None and rec["sender"] != sender)
            or (rnd is not None and rec["round"] != rnd)
            or (kind is not None and rec["kind"] != kind)
        ):
            continue
        blob = run_dir / "audit" / "blobs" / f"{rec['seq']:09d}.bin"
        out.append((rec, pb.ClientMessage.FromString(blob.read_bytes())))
    return out


def test_a_client_killed_after_sharing_keys_in_round_1_cannot_be_unmasked_from_the_audit(world):
    """The cross-round attack, offline, on everything an iterative secure server kept.

    c survives round 0 (its self-mask seed is revealed) and dies after sharing its keys in
    round 1 (its mask key is rebuilt). With one key for the whole session those two secrets
    unmasked c's round-0 vector; with per-round keys they do not.
    """
    from secagg import shamir
    from secagg.client import pair_seed_info
    from secagg.keys import agree, raw_public
    from secagg.prg import MaskStream, context
    from secagg.ring import add_, sub_, unpack

    _, _, _, _, plain_dir = _run(world, "xr-plain", mode="plain", strategy="iterative")
    truth_bits = b"".join(m.chunk.data for _, m in _records(plain_dir, "c", 0, "chunk"))
    code, codes, report, logs, run_dir = _run(
        world, "xr-secure", strategy="iterative", faults={"c": "exit-after-shares-round-1"}
    )
    assert code == 0 and codes["c"] == 3 and codes["a"] == 0 and codes["b"] == 0
    assert report["rounds"][1]["dropped"] == ["c"] and report["rounds"][1]["contributors"] == ["a", "b"]
    from nodes.audit import audit

    text, ok = audit(run_dir / "audit")
    assert ok and "dropout: c left round 1" in text

    meta = json.loads((run_dir / "audit" / "session.json").read_text())
    session, bits, t = bytes.fromhex(meta["session_id"]), meta["lane_bits"], meta["threshold"]
    victim = meta["members"].index("c")
    chunks = sorted((m.chunk.offset, m.chunk.data) for _, m in _records(run_dir, "c", 0, "chunk"))
    masked = np.frombuffer(b"".join(d for _, d in chunks), dtype=np.uint8)
    truth = np.unpackbits(np.frombuffer(truth_bits, dtype=np.uint8), bitorder="little")
    truth = truth[: len(masked) * 8 // bits]

    def secret(rnd, kind):
        shares = [
            (m.unmask_shares.self_mask_shares if kind == "self" else m.unmask_shares.key_shares)[victim]
            for _, m in _records(run_dir, rnd=rnd, kind="unmask_shares")
            if victim in (m.unmask_shares.self_mask_shares if kind == "self" else m.unmask_shares.key_shares)
        ]
        return shamir.combine([shamir.Share(s.x, s.y) for s in shares], t)

    seed0, key1 = secret(0, "self"), secret(1, "key")
    adverts = {
        (rec["round"], meta["members"].index(rec["sender"])): m.key_advert
        for rec, m in _records(run_dir, kind="key_advert")
    }
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    # The attacker really did rebuild c's round-1 mask key: it matches c's signed advert.
    assert (
        raw_public(X25519PrivateKey.from_private_bytes(key1).public_key()) == adverts[(1, victim)].mask_public
    )
    best = 0.0
    for info_round in (0, 1):
        data = masked.copy()
        sub_(
            data, MaskStream.derive(seed0, context(session, 0, "self", victim)).keystream(0, len(data)), bits
        )
        for w in (i for i in range(len(meta["members"])) if i != victim):
            seed = agree(key1, adverts[(0, w)].mask_public, pair_seed_info(session, info_round))
            stream = MaskStream.derive(seed, context(session, 0, "pair", *sorted((victim, w)))).keystream(
                0, len(data)
            )
            (sub_ if victim < w else add_)(data, stream, bits)
        guess = unpack(data, bits, len(truth))
        best = max(best, float(np.mean(guess == truth)))
    assert len(truth) > 1000
    assert best < 0.6  # chance level for 2-bit lanes against 0/1 votes is about 0.25


def test_a_client_voting_twice_aborts_the_round_and_nothing_is_written(world):
    code, codes, report, logs, run_dir = _run(world, "extra-votes", faults={"c": "extra-votes"})
    assert code == 2 and report is None
    assert not (run_dir / "out" / "final-mask.bin").exists()
    assert not (run_dir / "out" / "pruned-model").exists()
    last = _last_line(logs, "server")
    assert "votes" in last and "aborted" in last, last
    assert all(codes[c] != 0 for c in ("a", "b")) and "aborted" in _last_line(logs, "a")


def test_corrupted_unmask_shares_are_excluded_and_the_sender_named(world):
    code, codes, report, logs, _ = _run(world, "bad-shares", faults={"b": "corrupt-unmask-shares"})
    assert code == 0 and not any(codes.values())
    assert report["sparsity"] == 0.5 and report["rounds"][0]["contributors"] == ["a", "b", "c"]
    assert set(report["rounds"][0]["bad_shares"]) == {"b"}
    assert any("b sent corrupted unmask shares" in line for line in logs["server"]["lines"])


def _open_stream(port, certs, who, messages=()):
    """A raw stream to the server with ``who``'s TLS certificate: send ``messages``, then stay
    silent. Returns (thread collecting the responses, their list, the channel)."""
    import queue
    import threading

    import grpc

    from nodes.wire import federation_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{who}.tls.key").read_bytes(),
        certificate_chain=(certs / f"{who}.crt").read_bytes(),
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    outgoing = queue.Queue()
    for m in messages:
        outgoing.put(m)
    got = []

    def pump():
        try:
            for msg in pb_grpc.FederationStub(channel).Session(iter(outgoing.get, None)):
                got.append(msg.WhichOneof("body"))
        except grpc.RpcError as exc:
            got.append(exc.code().name)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread, got, channel, outgoing


def test_silent_streams_and_replayed_hellos_do_not_keep_honest_clients_out(world):
    """11 silent streams from a stranger's CA-signed certificate, and a Hello + proof copied
    from an earlier run's audit: none is admitted, and the honest federation completes."""
    _, _, _, _, old = _plain_reference(world, CLIENTS)
    recorded = {rec["kind"]: m for rec, m in _records(old, "a") if rec["kind"] in ("hello", "hello_proof")}
    work = _workdir(world, "lockout")
    server, procs, port, logs = start_federation(
        work,
        mode="secure",
        strategy="one-shot",
        clients=CLIENTS,
        model=str(world / "model"),
        nsamples=4,
        seqlen=32,
        sparsity=0.5,
        eval_windows=0,
        echo=False,
        client_launcher=_launchers(dict.fromkeys(CLIENTS, "late-join")),
        server_toml=["hello_deadline_s = 3", "max_pending_hellos = 4"],
    )
    replay = _open_stream(port, world / "certs", "a", [recorded["hello"], recorded["hello_proof"]])
    replay[0].join(timeout=30)
    silent = [_open_stream(port, world / "certs", "x") for _ in range(11)]
    codes = {c: p.wait(timeout=240) for c, p in procs.items()}
    assert server.wait(timeout=120) == 0 and not any(codes.values())
    assert replay[1] == ["challenge", "PERMISSION_DENIED"]  # the old proof signs an old nonce
    for thread, got, channel, _ in silent:
        thread.join(timeout=30)
        assert got and got[-1] in ("CANCELLED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"), got
        channel.close()
    report = json.loads((work / "secure" / "out" / "report.json").read_text())
    assert report["members"] == CLIENTS
    refused = "\n".join(report["refused"])
    assert "bad identity signature" in refused and "awaiting authentication" in refused
    transcript = (work / "secure" / "audit" / "transcript.jsonl").read_text()
    assert '"sender": "x"' not in transcript  # refused attempts are not filed under a name


def test_a_client_killed_mid_upload_is_dropped_and_the_round_completes(world):
    small = ["chunk_elems = 1024"]  # several chunks per client
    _, _, plain_ab, _, _ = _plain_reference(world, ["a", "b"])  # the chunk size does not change it
    code, codes, report, logs, run_dir = _run(
        world, "mid-upload", faults={"c": "exit-mid-upload"}, server_toml=small
    )
    assert code == 0 and codes["c"] == 3 and codes["a"] == 0 and codes["b"] == 0
    assert report["rounds"][0]["contributors"] == ["a", "b"] and report["rounds"][0]["dropped"] == ["c"]
    assert report["final_mask_sha256"] == plain_ab["final_mask_sha256"]
    assert not list((run_dir / "out").glob(".staging-*"))  # staged chunks are cleaned up


def _rechain(audit_dir, keep):
    """Rewrite a transcript keeping the records ``keep`` selects, with a fresh valid chain and
    its blobs renumbered to match: what a careful forger would do."""
    from nodes.audit import GENESIS, _record_hash

    path, blobs = audit_dir / "transcript.jsonl", audit_dir / "blobs"
    kept = [r for r in map(json.loads, path.read_text().splitlines()) if keep(r)]
    payloads = [(blobs / f"{r['seq']:09d}.bin").read_bytes() for r in kept]
    for blob in blobs.glob("*.bin"):
        blob.unlink()
    prev, out = GENESIS, []
    for i, (rec, payload) in enumerate(zip(kept, payloads, strict=True)):
        rec.update(seq=i, prev=prev)
        rec["hash"] = _record_hash(rec)
        prev = rec["hash"]
        out.append(json.dumps(rec, sort_keys=True))
        (blobs / f"{i:09d}.bin").write_bytes(payload)
    path.write_text("".join(line + "\n" for line in out))


def test_receipts_catch_what_the_chain_alone_cannot(world):
    import shutil

    from nodes.audit import audit

    code, codes, report, logs, run_dir = _run(world, "receipts", strategy="iterative")
    assert code == 0 and not any(codes.values())
    receipts = sorted(str(p) for p in (run_dir / "receipts").glob("*.json"))
    assert len(receipts) == 3 and len(json.loads(open(receipts[0]).read())) == 2  # one per round
    assert audit(run_dir / "audit", receipts)[1]

    def tampered(name, change):
        copy = run_dir.parent / f"tampered-{name}"
        shutil.copytree(run_dir / "audit", copy)
        change(copy)
        return audit(copy)[1], audit(copy, receipts)[1]

    def cut(n):
        """Drop the last ``n`` records, then restore session.json from the last chained copy
        left (its blob holds the exact bytes): what a careful forger would do."""

        def change(d):
            p = d / "transcript.jsonl"
            kept = p.read_text().splitlines()[:-n]
            p.write_text("".join(line + "\n" for line in kept))
            last_meta = [json.loads(line) for line in kept if '"session-meta"' in line][-1]
            (d / "session.json").write_bytes((d / "blobs" / f"{last_meta['seq']:09d}.bin").read_bytes())

        return change

    def remove_a_chunk(d):
        _rechain(d, lambda r: not (r["kind"] == "chunk" and r["sender"] == "a"))

    cases = {  # name: (detected without receipts, detected with receipts)
        "cut-tail": (cut(12), False, True),
        "delete-last-record": (cut(1), False, True),
        "rechain-without-a-record": (remove_a_chunk, False, True),
        "empty": (lambda d: (d / "transcript.jsonl").write_text(""), True, True),
        "delete-blob": (lambda d: next((d / "blobs").glob("*.bin")).unlink(), True, True),
        "edit-session-json": (
            lambda d: (d / "session.json").write_text(
                (d / "session.json").read_text().replace("secure", "plain")
            ),
            True,
            True,
        ),
    }
    for name, (change, without, with_receipts) in cases.items():
        ok_plain, ok_receipts = tampered(name, change)
        assert ok_plain is not without, f"{name} without receipts"
        assert ok_receipts is not with_receipts, f"{name} with receipts"


def test_reference_tie_break_runs_in_the_federation(world):
    """One fill generator across the server's rounds (one per block), layers in order."""
    server_code, codes, report, logs, _ = _run(
        world, "ties-reference", mode="plain", strategy="iterative", server_toml=['tie_break = "reference"']
    )
    assert server_code == 0 and not any(codes.values()), logs["server"].get("lines", [])[-5:]
    assert report["sparsity"] == 0.5
