"""`fedprune simulate` on a tiny local model: outputs, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from nodes.cli import main


def _base(tiny_model_dir, text_file, tmp_path):
    return [
        "simulate",
        "--model",
        str(tiny_model_dir),
        "--calib",
        str(text_file),
        "--eval",
        str(text_file),
        "--clients",
        "2",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-windows",
        "2",
        "--no-progress",
    ]


def test_simulate_writes_report_and_model(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out.json"
    saved = tmp_path / "pruned"
    args = _base(tiny_model_dir, text_file, tmp_path) + [
        "--strategy",
        "iterative",
        "--json",
        str(out),
        "--save-model",
        str(saved),
    ]
    proc = subprocess.run([sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| iterative layer s=0.5 |" in proc.stdout
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["sparsity"] == 0.5
    assert run["sparsity_all_block_matrices"] == 0.5  # a LLaMA block is all linears
    assert set(run["perplexity"]) == {"private"}
    assert run["timings"]["prune_total"] > 0
    assert (saved / "model.safetensors.index.json").exists()  # written block by block
    assert not list(tmp_path.glob(".*tmp*"))


def test_study_writes_table_plot_and_json(tiny_model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "study"
    args = _base(tiny_model_dir, text_file, tmp_path) + [
        "--study",
        "--strategies",
        "centralized,local-only,one-shot",
        "--groups",
        "layer,row",
        "--scalings",
        "off,on",
        "--sparsities",
        "0.3,0.5",
        "--out-dir",
        str(out_dir),
    ]
    assert main(args) == 0
    table = (out_dir / "study.md").read_text()
    # 2 sparsities x (centralized + local-only + one-shot x 2 groups x 2 scalings) + dense
    assert table.count("\n") == 2 + 1 + 2 * 6
    assert "local-only s=0.3" in table and "±" in table
    assert (out_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out_dir / "study.json").read_text())["runs"]) == 12


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], "sparsity must be in (0, 1)"),
        (["--nm", "2:8"], "N:M 2:8"),
        (["--clients", "8", "--nsamples", "4"], "cannot be split"),
        (["--seqlen", "4096"], "exceeds the model's context"),
        (["--calib", "/nonexistent/data.txt"], "data file not found"),
        (["--model", "not-a-model"], "unknown model spec"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_model_dir, text_file, tmp_path, capsys, extra, message
):
    out = tmp_path / "out.json"
    code = main(_base(tiny_model_dir, text_file, tmp_path) + ["--json", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_seqlen_longer_than_text(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code = main(
        [
            "simulate",
            "--model",
            str(tiny_model_dir),
            "--calib",
            str(short),
            "--eval",
            str(short),
            "--clients",
            "1",
            "--nsamples",
            "1",
            "--seqlen",
            "32",
            "--no-progress",
        ]
    )
    assert code == 2 and "too short for windows" in capsys.readouterr().err


def test_empty_data_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["simulate", "--model", str(tiny_model_dir), "--calib", str(empty), "--no-progress"])
    assert code == 2 and "empty" in capsys.readouterr().err


def test_missing_output_directory(tiny_model_dir, text_file, tmp_path, capsys):
    code = main(_base(tiny_model_dir, text_file, tmp_path) + ["--json", str(tmp_path / "no" / "x.json")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_reference_options_run_and_are_reported(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out.json"
    args = _base(tiny_model_dir, text_file, tmp_path) + [
        "--nsamples",
        "5",
        "--strategy",
        "one-shot",
        "--tie-break",
        "reference",
        "--partition",
        "reference",
        "--stats",
        "reference",
        "--batch-size",
        "1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["config"]["tie_break"] == "reference" and run["config"]["stats"] == "reference"
    assert run["sparsity"] == 0.5


def test_unknown_tie_break_is_refused(tiny_model_dir, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_base(tiny_model_dir, text_file, tmp_path) + ["--tie-break", "lowest"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
