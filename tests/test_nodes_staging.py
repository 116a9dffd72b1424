"""Chunk staging: each client's chunks come back intact, whatever the interleaving."""

import random

from nodes.staging import ChunkStaging


def test_a_client_that_starts_after_another_finished_does_not_overwrite_a_third(tmp_path):
    staging = ChunkStaging(tmp_path)
    staging.add("a", 0, b"a0")
    staging.add("b", 0, b"b0")
    assert list(staging.drain("a")) == [(0, b"a0")]
    staging.add("c", 0, b"c0")  # opened while b is still uploading
    staging.add("b", 128, b"b1")
    assert list(staging.drain("b")) == [(0, b"b0"), (128, b"b1")]
    assert list(staging.drain("c")) == [(0, b"c0")]
    staging.close()


def test_interleaved_clients_get_their_own_chunks_back(tmp_path):
    staging = ChunkStaging(tmp_path)
    rng = random.Random(0)
    sent = {c: [] for c in "abcde"}
    order = [c for c in "abcde" for _ in range(4)]
    rng.shuffle(order)
    done = set()
    for step, client in enumerate(order):
        data = bytes([step]) * (step + 1)
        staging.add(client, len(sent[client]) * 128, data)
        sent[client].append((len(sent[client]) * 128, data))
        if len(sent[client]) == 4:  # this client's upload is complete: drain it at once
            assert list(staging.drain(client)) == sent[client]
            done.add(client)
    assert done == set("abcde")
    staging.add("f", 0, b"x")
    staging.discard("f")
    assert list(staging.drain("f")) == []
    staging.close()
    assert not list(tmp_path.glob(".staging-*"))
