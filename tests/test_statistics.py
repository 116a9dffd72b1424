"""The statistics strategy: exact federated Wanda from summed activation statistics."""

import copy
import json

import numpy as np
import pytest
import torch

from fedprune.config import PruneConfig
from fedprune.errors import PrivacyConfigError, StatisticsError
from fedprune.models import block_weights, layout
from fedprune.propagation import BlockRunner
from fedprune.statistics import (
    BlockLayout,
    DPConfig,
    FixedPoint,
    StatisticsConfig,
    StatisticsEncoder,
    calibrate_noise,
    decode_block,
    epsilon_spent,
    select_block_masks,
)
from fedprune.statistics_run import plain_vector_sum, prune_statistics
from fedprune.strategies import prune
from nodes.cli import main
from nodes.secure_sum import secure_vector_sum


def _clients(windows):
    return [windows[:3], windows[3:5], windows[5:]]


def _pooled_wanda(model, pooled, config):
    """Centralized Wanda on the pooled windows (its own statistics and propagation), with the
    comparison group of ``config`` applied to its scores."""
    runner = BlockRunner(model, config.batch_size)
    hidden = runner.embed(pooled)
    masks = {}
    for i in range(layout(model).num_blocks):
        stats = runner.collect_stats(i, hidden)
        weights = block_weights(model, i)
        prefix = next(iter(weights)).rsplit(".", 2)[0]  # model.layers.i
        norms = {n: stats[n[len(prefix) + 1 :]].sq_norm for n in weights}
        block = select_block_masks(weights, norms, config)
        for name, mask in block.items():
            weights[name].masked_fill_(mask, 0)
        masks.update(block)
        hidden = runner.forward(i, hidden)
    return masks


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("group", ["row", "layer"])
def test_statistics_masks_equal_centralized_wanda_on_the_pooled_windows(tiny_model, windows, group, secure):
    config = PruneConfig(0.5, comparison_group=group)
    expected = _pooled_wanda(copy.deepcopy(tiny_model), windows, config)
    if group == "row":  # Wanda's own rule: the centralized strategy itself
        central = prune(copy.deepcopy(tiny_model), [windows], config, "centralized", progress=False)
        assert _equal(central.final_masks, expected)
    vector_sum = secure_vector_sum if secure else plain_vector_sum
    model = copy.deepcopy(tiny_model)
    result = prune_statistics(
        model, _clients(windows), config, vector_sum=vector_sum, secure=secure, progress=False
    )
    assert _equal(result.final_masks, expected)
    assert result.sparsity()[0] == 0.5
    assert result.details["clipped_tokens_all_layers"] == 0
    # in_features per layer and a token count per block, 8 bytes each
    assert result.details["elements_per_block"] == [5 * 64 + 64 + 128 + 1] * 2


def _block(tiny_model):
    return BlockLayout.from_slots(layout(tiny_model).block_slots(0))


def test_decode_refuses_impossible_sums(tiny_model):
    lay = _block(tiny_model)
    codec = FixedPoint.derive(clip=4.0, max_tokens=100)
    sums = {n: np.full(w, 2.0) for n, w in zip(lay.names, lay.widths, strict=True)}
    vectors = [StatisticsEncoder(lay, codec).encode(sums, 10) for _ in range(2)]
    pooled = decode_block(plain_vector_sum(vectors), lay, codec, contributors=2)
    assert pooled.tokens == 20
    assert torch.allclose(pooled.sq_norm[lay.names[0]], torch.full((64,), 0.2))
    negative = vectors[0].copy()
    negative[5] = np.int64(-(2**60)).astype(np.uint64)  # the sum decodes below 0
    with pytest.raises(StatisticsError, match="outside"):
        decode_block(plain_vector_sum([negative, vectors[1]]), lay, codec, 2)
    too_big = vectors[0].copy()
    too_big[0] = codec.encode(np.array([20 * 4.0 * 2]))[0]  # twice what 20 tokens at clip 4 allow
    with pytest.raises(StatisticsError, match="outside"):
        decode_block(plain_vector_sum([too_big, vectors[1]]), lay, codec, 2)
    many_tokens = vectors[0].copy()
    many_tokens[-1] = 1000
    with pytest.raises(StatisticsError, match="token count"):
        decode_block(plain_vector_sum([many_tokens, vectors[1]]), lay, codec, 2)
    with pytest.raises(StatisticsError):
        decode_block(vectors[0][:-1], lay, codec, 2)


def test_a_cheating_client_aborts_the_secure_round_and_nothing_is_pruned(tiny_model, windows):
    model = copy.deepcopy(tiny_model)
    dense = {n: w.clone() for n, w in block_weights(model, 0).items()}

    def cheating_sum(vectors):
        vectors = [v.copy() for v in vectors]
        vectors[1][3] = np.uint64(2**63)  # hidden by the masks, caught after unmasking
        return secure_vector_sum(vectors)

    with pytest.raises(StatisticsError, match="round is aborted"):
        prune_statistics(
            model, _clients(windows), PruneConfig(0.5), vector_sum=cheating_sum, secure=True, progress=False
        )
    assert all(torch.equal(w, dense[n]) for n, w in block_weights(model, 0).items())


def test_bad_privacy_settings_are_typed_errors(tiny_model, windows):
    for eps, delta in ((0.0, 1e-5), (-1.0, 1e-5), (1.0, 1.0), (1.0, 0.0), (float("inf"), 1e-5)):
        with pytest.raises(PrivacyConfigError):
            DPConfig(eps, delta)
    with pytest.raises(PrivacyConfigError):
        StatisticsConfig(clip=0.0)
    dp = StatisticsConfig(clip=10.0, dp=DPConfig(1.0, 1e-5))
    with pytest.raises(PrivacyConfigError, match="plain aggregation"):
        prune_statistics(copy.deepcopy(tiny_model), _clients(windows), PruneConfig(0.5), dp, progress=False)


def test_larger_epsilon_needs_less_noise_and_meets_its_target():
    calibrations = [calibrate_noise(DPConfig(eps, 1e-5), releases=30) for eps in (1.0, 4.0, 16.0)]
    z = [c.noise_multiplier for c in calibrations]
    assert z[0] > z[1] > z[2] > 0
    for c in calibrations:
        assert c.epsilon_spent <= c.epsilon * (1 + 1e-6)
        assert epsilon_spent(c.noise_multiplier * 0.9, 30, 1e-5) > c.epsilon  # the smallest noise that fits
    report = calibrations[0].report()
    assert (report["epsilon"], report["delta"], report["per"]) == (1.0, 1e-5, "client")


def test_dp_noise_shares_sum_to_the_calibrated_scale(tiny_model, windows):
    lay = _block(tiny_model)
    sigma = 3.0
    codec = FixedPoint.derive(clip=4.0, max_tokens=10_000, noise_std=sigma)
    zeros = {n: np.zeros(w) for n, w in zip(lay.names, lay.widths, strict=True)}
    rng = np.random.default_rng(0)
    vectors = [StatisticsEncoder(lay, codec, sigma / 2, rng).encode(zeros, 10) for _ in range(4)]
    noise = np.ldexp(plain_vector_sum(vectors)[:-1].view(np.int64).astype(float), -codec.scale_bits)
    assert abs(noise.std() - sigma) < 0.25 * sigma
    pooled = decode_block(plain_vector_sum(vectors), lay, codec, 4)  # negative noisy sums are allowed
    assert pooled.clamped > 0 and all(bool((v >= 0).all()) for v in pooled.sq_norm.values())


def _cli_base(tiny_model_dir, text_file):
    return [
        "simulate", "--model", str(tiny_model_dir), "--calib", str(text_file), "--eval", str(text_file),
        "--clients", "2", "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--no-progress",
        "--strategy", "statistics",
    ]  # fmt: skip


def test_cli_statistics_secure_with_dp_reports_traffic_and_privacy(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "report.json"
    args = _cli_base(tiny_model_dir, text_file) + [
        "--secure", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--dp-clip", "100", "--json", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["label"] == "statistics row dp ε=8 s=0.5"
    dp = run["statistics"]["dp"]
    assert (dp["epsilon"], dp["delta"]) == (8.0, 1e-5) and dp["epsilon_spent"] <= 8.0 + 1e-6
    traffic = run["traffic"]
    assert traffic["mode"] == "secure" and traffic["rounds"] == 2
    assert traffic["upload_per_client"] == 2 * 8 * (5 * 64 + 64 + 128 + 1)
    assert traffic["one_shot_voting"]["upload_per_client"] > traffic["upload_per_client"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dp-epsilon", "1", "--dp-delta", "1e-5", "--dp-clip", "10"], "--secure"),
        (["--secure", "--dp-epsilon", "0", "--dp-delta", "1e-5", "--dp-clip", "10"], "epsilon"),
        (["--secure", "--dp-epsilon", "1", "--dp-delta", "1", "--dp-clip", "10"], "delta"),
        (["--secure", "--dp-epsilon", "1", "--dp-delta", "1e-5"], "--dp-clip"),
        (["--stats-clip", "0"], "clip"),
    ],
)
def test_cli_bad_statistics_input_is_one_line_and_writes_nothing(
    tiny_model_dir, text_file, tmp_path, capsys, extra, message
):
    out = tmp_path / "report.json"
    assert main(_cli_base(tiny_model_dir, text_file) + extra + ["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()
