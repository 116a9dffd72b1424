"""The protocol end to end in process: correctness under dropouts, refusals, rejections."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import (
    ConfigError,
    DecryptionError,
    ProtocolError,
    RefusalError,
    ReplayError,
    SecAggError,
    SignatureError,
    ThresholdError,
    UnknownSenderError,
    make_session,
    run_round,
    simulate,
)
from secagg.messages import UnmaskRequest
from secagg.ring import LANE_BITS


def _expected_ok(config, dropouts, num_clients):
    """Whether a round with these dropouts completes: every set any party checks holds >= t."""
    t = config.threshold
    u1 = {c for c in range(num_clients) if dropouts.get(c) != "before_advertising"}
    u2 = {c for c in u1 if dropouts.get(c) != "before_key_sharing"}
    u3 = {c for c in u2 if dropouts.get(c) != "after_key_sharing"}
    u4 = {c for c in u3 if dropouts.get(c) != "after_masked_input"}
    if min(len(u1), len(u2), len(u3), len(u4)) < t:
        return False, u3
    for users, who in ((u1, u1), (u2, u2), (u3, u3), (u4, u4), (u4, u2)):
        if any(len(config.group(v) & users) < t for v in who):
            return False, u3
    return True, u3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unmasked_result_equals_plain_sum_over_survivors(data):
    m = data.draw(st.integers(2, 20), label="clients")
    bits = data.draw(st.sampled_from([b for b in LANE_BITS if (1 << b) > m]), label="bits")
    length = data.draw(st.integers(1, 700), label="length")
    chunk = data.draw(st.sampled_from([128, 256, 384]), label="chunk")
    k = data.draw(st.sampled_from([None] + [x for x in (2, 4, 6) if x < m - 1]), label="k")
    group = (m - 1 if k is None else k) + 1
    t = data.draw(st.integers(group // 2 + 1, group), label="t")
    points = st.sampled_from(
        ["before_advertising", "before_key_sharing", "after_key_sharing", "after_masked_input"]
    )
    dropouts = data.draw(st.dictionaries(st.integers(0, m - 1), points, max_size=m), label="dropouts")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    vectors = {c: rng.integers(0, 2, length) for c in range(m)}  # binary masks, as in pruning

    config, server, clients = make_session(
        m, length, threshold=t, neighbours=k, lane_bits=bits, chunk_elems=chunk
    )
    ok, u3 = _expected_ok(config, dropouts, m)
    if ok:
        result = run_round(server, clients, vectors, 0, dropouts)
        assert set(result.survivors) == u3
        assert np.array_equal(result.total, sum(vectors[c] for c in u3))
    else:
        with pytest.raises(ThresholdError):
            run_round(server, clients, vectors, 0, dropouts)
        with pytest.raises(SecAggError):
            server.finish()  # aborted: no result can be taken out


def _session(m=5, length=300, **kw):
    return make_session(m, length, chunk_elems=128, **kw)


def _open_round(server, clients, round_number=0):
    """Round 0 and 1 for every client: fresh signed keys, then shares; returns the shares."""
    server.begin_round(round_number)
    for c in clients:
        server.receive_advertisement(clients[c].advertise(round_number))
    directory = server.key_directory()
    shares = {}
    for c in clients:
        clients[c].receive_keys(directory)
        shares[c] = clients[c].share_keys()
    return shares


def _through_input(server, clients, vectors, round_number=0, skip=()):
    for s in _open_round(server, clients, round_number).values():
        server.receive_shares(s)
    for c, bundle in server.share_bundles().items():
        clients[c].receive_shares(bundle)
        if c not in skip:
            for chunk in clients[c].masked_chunks(vectors[c]):
                server.receive_chunk(chunk)


def test_client_refuses_to_reveal_both_shares_of_a_peer():
    config, server, clients = _session()
    vectors = {c: np.ones(300, dtype=np.uint8) for c in clients}
    _through_input(server, clients, vectors, skip={4})
    survivors = server.survivor_list()
    for c in survivors.survivors:
        server.receive_signature(clients[c].sign_survivors(survivors))
    request = server.unmask_request()
    first = clients[0].unmask(request)
    assert 4 in first.key_shares and 1 in first.self_mask_shares
    # A lying server now claims client 4 survived and 1 dropped: that would unmask them.
    forged = UnmaskRequest(request.session, request.round, (0, 2, 3, 4), request.signatures)
    with pytest.raises(RefusalError):
        clients[0].unmask(forged)
    with pytest.raises(RefusalError):
        clients[0].unmask(request)  # and it answers only once per round


def test_a_client_dropped_in_one_round_takes_part_in_the_next_with_fresh_keys():
    config, server, clients = _session(m=5)
    rng = np.random.default_rng(0)
    v0 = {c: rng.integers(0, 2, 300) for c in clients}
    r0 = run_round(server, clients, v0, 0, {3: "after_key_sharing"})
    assert r0.dropped == (3,) and np.array_equal(r0.total, sum(v0[c] for c in (0, 1, 2, 4)))
    v1 = {c: rng.integers(0, 2, 300) for c in clients}
    r1 = run_round(server, clients, v1, 1)
    assert set(r1.survivors) == {0, 1, 2, 3, 4}
    assert np.array_equal(r1.total, sum(v1.values()))


def test_fresh_self_mask_each_round():
    config, server, clients = _session(m=3, threshold=2)
    vectors = {c: np.zeros(300, dtype=np.uint8) for c in clients}
    a = run_round(server, clients, vectors, 0, record=True)
    b = run_round(server, clients, vectors, 1, record=True)
    assert a.masked_inputs[0] != b.masked_inputs[0]
    assert np.array_equal(b.total, np.zeros(300))


def test_replayed_forged_and_malformed_messages_are_rejected_and_round_still_completes():
    config, server, clients = _session()
    rng = np.random.default_rng(1)
    vectors = {c: rng.integers(0, 2, 300) for c in clients}
    shares = _open_round(server, clients)
    for s in shares.values():
        server.receive_shares(s)
    with pytest.raises(ProtocolError, match="duplicate"):
        server.receive_shares(shares[0])
    bundles = server.share_bundles()
    with pytest.raises(ProtocolError):  # share phase is closed
        server.receive_shares(shares[1])
    for c, bundle in bundles.items():
        clients[c].receive_shares(bundle)
    chunks = {c: list(clients[c].masked_chunks(vectors[c])) for c in clients}
    good = chunks[0][0]
    bad = [
        (dataclasses.replace(good, round=1), ReplayError),
        (dataclasses.replace(good, session=b"x" * 16), ProtocolError),
        (dataclasses.replace(good, sender=99), UnknownSenderError),
        (dataclasses.replace(good, offset=5), ProtocolError),
        (dataclasses.replace(good, offset=1024), ProtocolError),
        (dataclasses.replace(good, data=good.data[:-1]), ProtocolError),
    ]
    for msg, error in bad:
        with pytest.raises(error):
            server.receive_chunk(msg)
    for c in clients:
        for chunk in chunks[c]:
            server.receive_chunk(chunk)
    with pytest.raises(ProtocolError, match="duplicate chunk"):
        server.receive_chunk(good)
    survivors = server.survivor_list()
    sigs = {c: clients[c].sign_survivors(survivors) for c in clients}
    forged = dataclasses.replace(sigs[1], signature=sigs[2].signature)
    with pytest.raises(SignatureError):
        server.receive_signature(forged)
    for s in sigs.values():
        server.receive_signature(s)
    request = server.unmask_request()
    for c in clients:
        server.receive_unmask(clients[c].unmask(request))
    assert np.array_equal(server.finish(), sum(vectors.values()))
    assert server.rejected["ProtocolError"] >= 5 and server.rejected["SignatureError"] == 1


def test_tampered_share_ciphertext_is_rejected():
    config, server, clients = _session()
    for s in _open_round(server, clients).values():
        server.receive_shares(s)
    bundle = server.share_bundles()[0]
    sender, sealed = next(iter(bundle.ciphertexts.items()))
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptionError):
        clients[0].receive_shares(dataclasses.replace(bundle, ciphertexts={sender: flipped}))
    # a share sealed for client 0, re-addressed to client 1, does not open
    with pytest.raises(DecryptionError):
        clients[1].receive_shares(
            dataclasses.replace(
                bundle, receiver=1, ciphertexts={s: c for s, c in bundle.ciphertexts.items() if s != 1}
            )
        )


def test_forged_key_advertisement_is_rejected():
    config, server, clients = make_session(3, 100, chunk_elems=128)
    server.begin_round(0)
    ad = clients[0].advertise(0)
    forged = dataclasses.replace(ad, mask_public=clients[1].advertise(0).mask_public)
    with pytest.raises(SignatureError):
        server.receive_advertisement(forged)
    with pytest.raises(UnknownSenderError):
        server.receive_advertisement(dataclasses.replace(ad, sender=7))
    server.receive_advertisement(ad)  # the genuine one is still accepted


def test_fewer_than_threshold_aborts_with_nothing_out():
    vectors = [np.ones(200, dtype=np.uint8) for _ in range(4)]
    with pytest.raises(ThresholdError, match="at least t = 3"):
        simulate(
            vectors, threshold=3, chunk_elems=128, dropouts={0: "after_key_sharing", 1: "after_key_sharing"}
        )
    with pytest.raises(ConfigError, match="more than half"):  # half the group is refused outright
        make_session(4, 100, threshold=2)


def test_partial_masked_vector_aborts_the_round():
    config, server, clients = _session(m=3, threshold=2)
    for s in _open_round(server, clients).values():
        server.receive_shares(s)
    for c, bundle in server.share_bundles().items():
        clients[c].receive_shares(bundle)
        for i, chunk in enumerate(clients[c].masked_chunks(np.ones(300, dtype=np.uint8))):
            if c != 2 or i == 0:
                server.receive_chunk(chunk)
    from secagg import IncompleteInputError

    with pytest.raises(IncompleteInputError, match=r"\[2\]"):
        server.survivor_list()


def test_client_rejects_wrong_round_bundle():
    config, server, clients = _session(m=3, threshold=2)
    for s in _open_round(server, clients).values():
        server.receive_shares(s)
    bundle = server.share_bundles()[0]
    with pytest.raises(ReplayError):
        clients[0].receive_shares(dataclasses.replace(bundle, round=1))


def test_bytes_on_the_wire_are_lane_width_per_element():
    vectors = [np.ones(1 << 12, dtype=np.uint8) for _ in range(8)]
    result = simulate(vectors, chunk_elems=1024, record=True)
    assert all(len(v) == (1 << 12) * 4 // 8 for v in result.masked_inputs.values())


def _corrupt(share):
    return dataclasses.replace(share, y=share.y[:-1] + bytes([share.y[-1] ^ 1]))


def test_corrupted_unmask_shares_are_found_excluded_and_named():
    """One holder lies about every share it reveals; with more than t shares the round completes."""
    config, server, clients = _session(m=5)  # t = 3, 5 holders per secret
    rng = np.random.default_rng(3)
    vectors = {c: rng.integers(0, 2, 300) for c in clients}
    _through_input(server, clients, vectors, skip={4})  # 4 drops: its mask key is rebuilt too
    survivors = server.survivor_list()
    for c in survivors.survivors:
        server.receive_signature(clients[c].sign_survivors(survivors))
    request = server.unmask_request()
    for c in survivors.survivors:
        msg = clients[c].unmask(request)
        if c == 2:
            msg = dataclasses.replace(
                msg,
                self_mask_shares={o: _corrupt(s) for o, s in msg.self_mask_shares.items()},
                key_shares={o: _corrupt(s) for o, s in msg.key_shares.items()},
            )
        server.receive_unmask(msg)
    assert np.array_equal(server.finish(), sum(vectors[c] for c in (0, 1, 2, 3)))
    assert set(server.bad_shares) == {2} and set(server.bad_shares[2]) == {0, 1, 2, 3, 4}  # its own share too


def test_too_many_corrupted_shares_abort_without_a_wrong_result():
    from secagg import ShareError

    config, server, clients = _session(m=3, threshold=2)
    vectors = {c: np.ones(300, dtype=np.uint8) for c in clients}
    _through_input(server, clients, vectors)
    survivors = server.survivor_list()
    for c in survivors.survivors:
        server.receive_signature(clients[c].sign_survivors(survivors))
    request = server.unmask_request()
    for c in survivors.survivors:
        msg = clients[c].unmask(request)
        if c != 0:  # two of three holders lie: no two good shares remain
            msg = dataclasses.replace(
                msg, self_mask_shares={o: _corrupt(s) for o, s in msg.self_mask_shares.items()}
            )
        server.receive_unmask(msg)
    with pytest.raises(ShareError, match="commitment"):
        server.finish()


def test_ring_inputs_on_64_bit_lanes_sum_modulo_2_to_the_64_with_a_dropout():
    """Fixed-point statistics (negative values in two's complement) sum exactly, mod 2^64."""
    rng = np.random.default_rng(3)
    signed = [rng.integers(-(2**62), 2**62, 300) for _ in range(5)]
    vectors = [v.view(np.uint64) for v in signed]
    result = simulate(
        vectors, lane_bits=64, input_bound=2**64 - 1, chunk_elems=128, dropouts={4: "after_key_sharing"}
    )
    expected = [sum(int(v[i]) for v in signed[:4]) for i in range(300)]
    assert [int(x) for x in result.total.view(np.int64)] == [((e + 2**63) % 2**64) - 2**63 for e in expected]
    with pytest.raises(ConfigError):  # ring inputs are for wide lanes; votes keep their capacity check
        make_session(5, 10, lane_bits=16, input_bound=2**16 - 1)
