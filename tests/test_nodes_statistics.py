"""The statistics strategy over the federation: real processes, a tiny random LLaMA, mutual TLS.

Each client's windows are derived here exactly as the client derives them, so that the
federation's final mask can be compared with Wanda computed in process on the pooled
windows (``prune_statistics``: the same fixed-point code when the token bounds agree).
"""

import hashlib

import numpy as np
import pytest

from .test_nodes_federation import CLIENTS, _last_line, _run, make_world

NSAMPLES, SEQLEN = 4, 32  # what _run gives every client
BOUND = ["max_tokens_per_client = 128", "seqlen = 32"]  # N_max = 3 x 128 = the pooled tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("statistics"))


@pytest.fixture(scope="module")
def centralized_sha(world):
    """SHA-256 of the final mask of exact Wanda (row groups) on the clients' pooled windows."""
    from fedprune.config import prune_config
    from fedprune.data import load_text, sample_windows, tokenize
    from fedprune.models import layout, load_model
    from fedprune.statistics import StatisticsConfig
    from fedprune.statistics_run import prune_statistics

    lm = load_model(str(world / "model"))
    windows = [
        sample_windows(
            tokenize(lm.tokenizer, load_text(str(world / "data" / f"{c}.txt"), "calibration")),
            NSAMPLES,
            SEQLEN,
            0,
        )
        for c in CLIENTS
    ]
    result = prune_statistics(
        lm.model, windows, prune_config(sparsity=0.5, group="row"), StatisticsConfig(), progress=False
    )
    final = layout(lm.model).flatten(result.final_masks)
    return hashlib.sha256(np.packbits(final, bitorder="little").tobytes()).hexdigest()


@pytest.mark.parametrize("mode", ["plain", "secure"])
def test_statistics_federation_gives_the_centralized_wanda_mask(world, centralized_sha, mode):
    from nodes.audit import audit

    code, codes, report, logs, run_dir = _run(
        world, f"stats-{mode}", mode=mode, strategy="statistics", server_toml=BOUND
    )
    assert code == 0 and not any(codes.values()), logs["server"].get("lines", [])[-5:]
    assert report["final_mask_sha256"] == centralized_sha
    assert report["sparsity"] == 0.5
    # one round per block; each client uploads in_features + 1 uint64 per layer set
    elements = report["statistics"]["elements_per_block"]
    assert len(report["rounds"]) == len(elements) == 2
    for r, n in zip(report["rounds"], elements, strict=True):
        assert r["vector_length"] == n and r["tokens"] == 3 * NSAMPLES * SEQLEN
        assert all(
            8 * n <= b < 8 * n + 4000 + (60000 if mode == "secure" else 0)
            for b in r["bytes_received"].values()
        )
    traffic = report["traffic"]
    assert {(e["strategy"], e["mode"]) for e in traffic["expected"]} == {
        (s, m) for s in ("statistics", "one-shot") for m in ("plain", "secure")
    }
    stats = next(e for e in traffic["expected"] if e["strategy"] == "statistics" and e["mode"] == mode)
    voting = next(e for e in traffic["expected"] if e["strategy"] == "one-shot" and e["mode"] == mode)
    assert stats["upload_per_client"] == 8 * sum(elements) < voting["upload_per_client"] * 8
    assert (
        sum(traffic["bytes_received_per_client_per_round"]["a"]) <= traffic["bytes_received_per_client"]["a"]
    )
    text, ok = audit(run_dir / "audit")
    assert ok, text
    if mode == "plain":
        assert text.count("VISIBLE: this client's statistics") == 6  # 3 clients x 2 blocks
    else:
        assert "VISIBLE" not in text and text.count("uniform 64-bit lanes") == 6
        assert "only the pooled statistics of each block" in text


def test_statistics_with_differential_privacy(world):
    code, codes, report, logs, _ = _run(
        world,
        "stats-dp",
        strategy="statistics",
        clients=["a", "b"],
        server_toml=[*BOUND, "stats_clip = 1000.0", "dp_epsilon = 8.0", "dp_delta = 1e-5"],
    )
    assert code == 0 and not any(codes.values()), logs["server"].get("lines", [])[-5:]
    dp = report["statistics"]["dp"]
    assert (dp["epsilon"], dp["delta"], dp["per"]) == (8.0, 1e-5, "client")
    assert 0 < dp["epsilon_spent"] <= 8.0 and dp["releases"] == 2
    # each share is sigma / sqrt(t): any t survivors carry the calibrated noise
    t = dp["threshold"]
    for sigma, share in zip(dp["sigma_per_block"], dp["noise_share_std_per_block"], strict=True):
        assert sigma > 0 and share == pytest.approx(sigma / t**0.5)
    assert report["sparsity"] == 0.5
    assert any("DP epsilon 8" in line for line in logs["a"]["lines"])


def test_impossible_statistics_abort_the_round_and_nothing_is_written(world):
    code, codes, report, logs, run_dir = _run(
        world,
        "stats-huge",
        strategy="statistics",
        clients=["a", "c"],
        server_toml=BOUND,
        faults={"c": "huge-statistics"},
    )
    assert code == 2 and report is None
    assert not (run_dir / "out" / "final-mask.bin").exists()
    assert not (run_dir / "out" / "pruned-model").exists()
    last = _last_line(logs, "server")
    assert "round 0 aborted" in last and "statistics" in last, last
    assert codes["a"] != 0 and "aborted" in _last_line(logs, "a")


def _welcome(mode="secure", members=3, threshold=2, **stats):
    from nodes.wire import federation_pb2 as pb

    fields = {"stats_clip": 100.0, "max_tokens_per_client": 128, "seqlen": 32, **stats}
    roster = [pb.RosterEntry(index=i, client_id=f"c{i}") for i in range(members)]
    return pb.Welcome(mode=mode, strategy="statistics", threshold=threshold, roster=roster, **fields)


def test_every_party_derives_the_same_round_parameters_and_a_client_checks_the_noise():
    from fedprune.errors import PrivacyConfigError, StatisticsError
    from fedprune.statistics import BlockLayout, DPConfig, calibrate_noise
    from nodes.statistics_rounds import StatisticsParameters

    dp = calibrate_noise(DPConfig(8.0, 1e-5), 4)
    server = StatisticsParameters.for_server(100.0, 128, 32, 3, 2, 4, dp)
    client = StatisticsParameters.from_welcome(_welcome(**server.to_welcome()), num_blocks=4)
    block = BlockLayout(0, ("q", "k"), (64, 64))
    assert client == server and client.codec(block) == server.codec(block)
    # each share is sigma/sqrt(t); the code leaves room for all m shares
    assert server.share_std(block) == pytest.approx(server.sigma(block) / 2**0.5)
    assert server.codec(block).noise_std == pytest.approx(server.sigma(block) * (3 / 2) ** 0.5)
    too_little = {**server.to_welcome(), "dp_noise_multiplier": server.noise_multiplier / 2}
    with pytest.raises(PrivacyConfigError, match="more than the announced"):
        StatisticsParameters.from_welcome(_welcome(**too_little), num_blocks=4)
    with pytest.raises(PrivacyConfigError, match="plain aggregation"):
        StatisticsParameters.from_welcome(_welcome(mode="plain", **server.to_welcome()), num_blocks=4)
    with pytest.raises(StatisticsError, match="clip"):
        StatisticsParameters.from_welcome(_welcome(stats_clip=0.0), num_blocks=4)


def test_a_client_over_the_token_bound_or_with_other_windows_under_dp_refuses(tiny_model):
    import torch

    from fedprune.errors import StatisticsError
    from fedprune.models import layout
    from nodes.statistics_rounds import StatisticsClient, StatisticsParameters

    windows = torch.randint(0, 128, (4, 32))
    lay = layout(tiny_model)
    plain = StatisticsParameters(100.0, 127, 32, 3, 1, lay.num_blocks)
    with pytest.raises(StatisticsError, match="128 calibration tokens, more than the server's bound of 127"):
        StatisticsClient(tiny_model, windows, lay, plain, 8)
    dp = StatisticsParameters(100.0, 1000, 16, 3, 2, lay.num_blocks, 8.0, 1e-5, 1.0)
    with pytest.raises(StatisticsError, match="windows of 16 tokens"):
        StatisticsClient(tiny_model, windows, lay, dp, 8)
