"""A hostile server drives real ``ClientSession`` objects and tries to unmask one client.

The server here is not ``ServerSession``: it is an attacker that relays, drops,
forges and splits messages as it likes, keeps everything it is ever sent, and
then tries to rebuild the victim's private vector from that. Every attack must
end either in a typed refusal by the clients or in a reconstruction that is
no better than a guess. Each test also checks that its reconstruction code
works when handed the right key material, so a pass is not an accident.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import (
    ConfigError,
    InvalidAggregateError,
    ProtocolError,
    RefusalError,
    ReplayError,
    SecAggError,
    SignatureError,
    ThresholdError,
    make_session,
    run_round,
    shamir,
)
from secagg.client import pair_seed_info
from secagg.keys import agree, raw_private
from secagg.messages import KeyDirectory, ShareBundle, SurvivorList, UnmaskRequest
from secagg.prg import MaskStream, context
from secagg.ring import add_, sub_, unpack

LENGTH = 512


class Attacker:
    """A lying server: it relays what suits it and records everything clients send."""

    def __init__(self, m: int, neighbours: int | None = None, threshold: int | None = None) -> None:
        self.config, _, self.clients = make_session(
            m, LENGTH, neighbours=neighbours, threshold=threshold, chunk_elems=128
        )
        self.t = self.config.threshold
        self.adverts: dict[int, dict] = {}  # round -> client -> AdvertiseKeys
        self.shares: dict[int, dict] = {}  # round -> client -> EncryptedShares
        self.masked: dict[int, dict[int, bytes]] = defaultdict(dict)  # round -> client -> masked vector
        self.revealed: list = []  # every UnmaskShares ever received

    @property
    def session(self) -> bytes:
        return self.config.session_id

    def open_round(self, rnd: int, show: dict[int, set[int]] | None = None) -> None:
        """Keys and shares; ``show[c]`` limits the adverts client c gets to see."""
        self.adverts[rnd] = {c: cl.advertise(rnd) for c, cl in self.clients.items()}
        for c, cl in self.clients.items():
            visible = show.get(c, set(self.clients)) if show else set(self.clients)
            ads = tuple(a for s, a in self.adverts[rnd].items() if s in visible)
            cl.receive_keys(KeyDirectory(self.session, rnd, ads))
        self.shares[rnd] = {c: cl.share_keys() for c, cl in self.clients.items()}

    def bundle(self, rnd: int, receiver: int, senders) -> ShareBundle:
        cts = {
            s: self.shares[rnd][s].ciphertexts[receiver]
            for s in senders
            if receiver in self.shares[rnd][s].ciphertexts
        }
        return ShareBundle(self.session, rnd, receiver, cts)

    def deliver_shares(self, rnd: int, senders=None) -> None:
        senders = set(self.clients) if senders is None else senders
        for c, cl in self.clients.items():
            cl.receive_shares(self.bundle(rnd, c, senders))

    def collect_input(self, rnd: int, vectors: dict[int, np.ndarray], who=None) -> None:
        for c in self.clients if who is None else who:
            self.masked[rnd][c] = b"".join(ch.data for ch in self.clients[c].masked_chunks(vectors[c]))

    def signatures(self, rnd: int, survivors, signers) -> dict[int, bytes]:
        """Show ``survivors`` to ``signers``; the signatures of those who agree."""
        out = {}
        for c in signers:
            try:
                out[c] = (
                    self.clients[c]
                    .sign_survivors(SurvivorList(self.session, rnd, tuple(survivors)))
                    .signature
                )
            except SecAggError:
                pass
        return out

    def ask(self, rnd: int, survivors, signatures, holders) -> list:
        """Ask ``holders`` to unmask for ``survivors``; keep whatever they reveal."""
        request = UnmaskRequest(self.session, rnd, tuple(survivors), dict(signatures))
        got = []
        for c in holders:
            try:
                got.append(self.clients[c].unmask(request))
            except SecAggError:
                pass
        self.revealed += got
        return got

    # -- what the attacker can rebuild ----------------------------------------
    def recovered(self, owner: int, kind: str) -> dict[int, bytes]:
        """Round -> the owner's secret of ``kind`` ('self' seed or mask 'key'), where t shares exist."""
        by_round: dict[int, dict[int, shamir.Share]] = defaultdict(dict)
        for msg in self.revealed:
            table = msg.self_mask_shares if kind == "self" else msg.key_shares
            if owner in table:
                by_round[msg.round][msg.sender] = table[owner]
        out = {}
        for rnd, shares in by_round.items():
            if len(shares) >= self.t:
                out[rnd] = shamir.combine(list(shares.values()), self.t)
        return out

    def unmask_with(self, rnd: int, victim: int, self_seed: bytes, mask_key: bytes, partners) -> np.ndarray:
        """The victim's input, if ``self_seed`` and ``mask_key`` were its round-``rnd`` secrets."""
        cfg = self.config
        data = np.frombuffer(self.masked[rnd][victim], dtype=np.uint8).copy()
        sub_(
            data,
            MaskStream.derive(self_seed, context(self.session, rnd, "self", victim)).keystream(0, len(data)),
            cfg.lane_bits,
        )
        for w in partners:
            seed = agree(mask_key, self.adverts[rnd][w].mask_public, pair_seed_info(self.session, rnd))
            mask = MaskStream.derive(seed, context(self.session, rnd, "pair", *sorted((victim, w))))
            stream = mask.keystream(0, len(data))
            (sub_ if victim < w else add_)(data, stream, cfg.lane_bits)
        return unpack(data, cfg.lane_bits, LENGTH)

    def best_guess(self, rnd: int, victim: int, truth: np.ndarray) -> float:
        """The best agreement with ``truth`` over every combination of recovered secrets."""
        partners = sorted(self.config.graph[victim])
        seeds = self.recovered(victim, "self")
        mask_keys = self.recovered(victim, "key")
        best = 0.0
        for (_, s), (_, k) in itertools.product(seeds.items(), mask_keys.items()):
            guess = self.unmask_with(rnd, victim, s, k, partners)
            best = max(best, float(np.mean(guess == truth)))
        return best


def _votes(m: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2, LENGTH).astype(np.uint8) for c in range(m)}


def _private_key(client) -> bytes:
    return raw_private(client._mask_key)  # test-only peek, to prove the reconstruction code


# ---- 1. cross-round reconstruction -------------------------------------------------


@pytest.mark.parametrize("m,neighbours", [(5, None), (8, 4)])
def test_a_key_revealed_in_round_1_does_not_unmask_round_0(m, neighbours):
    """Round 0: the victim survives (its self seed is revealed). Round 1: the server claims
    it dropped (its mask key is revealed). Neither secret helps with the other round."""
    att = Attacker(m, neighbours)
    victim, votes = 0, _votes(m)
    att.open_round(0)
    att.deliver_shares(0)
    att.collect_input(0, votes)
    everyone = sorted(att.clients)
    sigs = att.signatures(0, everyone, everyone)
    att.ask(0, everyone, sigs, everyone)
    key_round0 = _private_key(att.clients[victim])

    att.open_round(1)
    att.deliver_shares(1)
    others = [c for c in everyone if c != victim]
    att.collect_input(1, _votes(m, 1), who=others)  # the victim "drops" before its input
    sigs = att.signatures(1, others, others)
    att.ask(1, others, sigs, others)

    assert 0 in att.recovered(victim, "self") and 1 in att.recovered(victim, "key")
    assert att.recovered(victim, "key")[1] != key_round0
    # With the true round-0 key the same code recovers the vector exactly: the code has teeth.
    partners = sorted(att.config.graph[victim])
    exact = att.unmask_with(0, victim, att.recovered(victim, "self")[0], key_round0, partners)
    assert np.array_equal(exact, votes[victim])
    # With what the protocol revealed, the attacker does no better than chance.
    assert att.best_guess(0, victim, votes[victim]) < 0.65


# ---- 2. too few peers ----------------------------------------------------------------


@pytest.mark.parametrize("m,neighbours", [(4, None), (5, None), (8, 4)])
def test_short_and_empty_share_bundles_are_refused(m, neighbours):
    for short in (0, Attacker(m, neighbours).t - 2):  # empty, and one sender short of t - 1
        att = Attacker(m, neighbours)
        victim = 1
        att.open_round(0)
        peers = sorted(att.config.graph[victim])
        with pytest.raises(ThresholdError):
            att.clients[victim].receive_shares(att.bundle(0, victim, peers[:short]))
        with pytest.raises(ProtocolError):  # and it sends no masked input afterwards
            next(att.clients[victim].masked_chunks(np.zeros(LENGTH, dtype=np.uint8)))


def test_a_key_directory_with_too_few_neighbours_is_refused():
    att = Attacker(5)
    victim = 2
    with pytest.raises(ThresholdError):
        att.open_round(0, show={victim: {victim, 0}})  # only one neighbour's keys shown


def test_a_survivor_list_without_enough_masking_partners_is_refused():
    """The server claims the victim's partners dropped, to strip their pair masks off it."""
    att = Attacker(5)
    victim = 0
    att.open_round(0)
    att.deliver_shares(0)
    att.collect_input(0, _votes(5))
    lonely = (victim, 1)  # fewer than t = 3
    with pytest.raises(ThresholdError):
        att.clients[victim].sign_survivors(SurvivorList(att.session, 0, lonely))


# ---- 3. split view -------------------------------------------------------------------


@pytest.mark.parametrize("m,neighbours", [(4, None), (5, None), (6, None), (8, 4), (10, 6)])
def test_split_view_cannot_collect_both_shares_of_the_victim(m, neighbours):
    """Half the victim's group is told it survived (self-mask shares), the other half that it
    dropped (mask-key shares), each half with its own signed list."""
    att = Attacker(m, neighbours)
    victim, votes = 0, _votes(m)
    att.open_round(0)
    att.deliver_shares(0)
    att.collect_input(0, votes)
    group = sorted(att.config.group(victim))
    outside = [c for c in att.clients if c not in group]
    holders = [c for c in group if c != victim]
    half_a = [victim] + holders[: len(holders) // 2]
    half_b = holders[len(holders) // 2 :]
    list_a = sorted(set(half_a) | set(outside))
    list_b = sorted(set(half_b) | set(outside))
    sigs_a = att.signatures(0, list_a, list_a)
    sigs_b = att.signatures(0, list_b, list_b)
    att.ask(0, list_a, sigs_a, list_a)
    att.ask(0, list_b, sigs_b, list_b)
    # t > g/2: at most one half can be large enough
    assert not (att.recovered(victim, "self") and att.recovered(victim, "key"))
    assert att.best_guess(0, victim, votes[victim]) == 0.0  # nothing to combine at all


def test_a_threshold_of_half_the_group_is_refused():
    for m in (4, 6, 8):
        with pytest.raises(ConfigError, match="more than half"):
            make_session(m, LENGTH, threshold=m // 2)


def test_two_lists_to_one_client_or_a_second_request_are_refused():
    att = Attacker(5)
    att.open_round(0)
    att.deliver_shares(0)
    att.collect_input(0, _votes(5))
    everyone = sorted(att.clients)
    sigs = att.signatures(0, everyone, everyone)
    assert len(sigs) == 5
    with pytest.raises(RefusalError):
        att.clients[0].sign_survivors(SurvivorList(att.session, 0, (0, 1, 2, 3)))
    forged = UnmaskRequest(att.session, 0, (0, 1, 2, 3), sigs)
    with pytest.raises(RefusalError):
        att.clients[0].unmask(forged)
    att.clients[0].unmask(UnmaskRequest(att.session, 0, tuple(everyone), sigs))
    with pytest.raises(RefusalError):
        att.clients[0].unmask(UnmaskRequest(att.session, 0, tuple(everyone), sigs))


def test_forged_or_foreign_signatures_do_not_count():
    att = Attacker(5)
    att.open_round(0)
    att.deliver_shares(0)
    att.collect_input(0, _votes(5))
    everyone = sorted(att.clients)
    sigs = att.signatures(0, everyone, everyone[:2])  # only two real signers, t = 3
    stolen = {**sigs, 3: sigs[0]}  # client 0's signature relabelled as client 3's
    with pytest.raises(SignatureError):
        att.clients[1].unmask(UnmaskRequest(att.session, 0, tuple(everyone), stolen))
    with pytest.raises(ThresholdError):
        att.clients[1].unmask(UnmaskRequest(att.session, 0, tuple(everyone), sigs))


# ---- replays across rounds --------------------------------------------------------------


def test_keys_and_directories_from_another_round_are_refused():
    att = Attacker(4)
    att.open_round(0)
    old = att.adverts[0]
    att.deliver_shares(0)
    att.collect_input(0, _votes(4))
    everyone = sorted(att.clients)
    att.ask(0, everyone, att.signatures(0, everyone, everyone), everyone)
    for cl in att.clients.values():
        cl.advertise(1)
    stale = KeyDirectory(att.session, 0, tuple(old.values()))
    with pytest.raises(ReplayError):
        att.clients[0].receive_keys(stale)
    relabelled = KeyDirectory(att.session, 1, tuple(dataclasses.replace(a, round=1) for a in old.values()))
    with pytest.raises(SignatureError):  # the round is inside what each client signed
        att.clients[0].receive_keys(relabelled)


# ---- 4. malicious client input ----------------------------------------------------------


@pytest.mark.parametrize("evil_value", ["minus-one", "six-votes"])
def test_out_of_range_input_aborts_the_round(evil_value):
    """A lane no honest inputs can reach (above the number of survivors) aborts the round.

    With the smallest lane width a malicious value can also land inside the bound; the
    pruning layer's exact per-row totals catch those (tests/test_nodes_federation.py).
    """
    config, server, clients = make_session(5, LENGTH, chunk_elems=128)
    votes = _votes(5)
    bits = config.lane_bits
    evil = votes[4].copy()
    zero = int(np.flatnonzero(sum(votes[c] for c in range(4)) == 0)[0])
    evil[zero] = (1 << bits) - 1 if evil_value == "minus-one" else 6  # -1 wraps to 2^b - 1

    original = clients[4].masked_chunks

    def cheat(values):  # a client that skips its own range check
        loose = copy.copy(clients[4].round_config)
        object.__setattr__(loose, "input_bound", (1 << bits) - 1)
        clients[4].round_config = loose
        return original(values)

    clients[4].masked_chunks = cheat
    with pytest.raises(InvalidAggregateError, match=f"element {zero} "):
        run_round(server, clients, {**votes, 4: evil}, 0)
    with pytest.raises(SecAggError):
        server.finish()  # nothing comes out of an aborted round


# ---- property: nothing any server collects holds both shares of a client in a round ----


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_server_strategy_collects_both_shares_of_one_client_in_one_round(data):
    m = data.draw(st.integers(3, 7), label="clients")
    k = data.draw(st.sampled_from([None] + [x for x in (2, 4) if x < m - 1]), label="k")
    att = Attacker(m, k)
    everyone = sorted(att.clients)
    for rnd in range(data.draw(st.integers(1, 3), label="rounds")):
        try:
            att.open_round(rnd)
        except SecAggError:
            continue
        sharing = data.draw(st.sets(st.sampled_from(everyone), min_size=1), label="share senders")
        for c in everyone:
            try:
                att.clients[c].receive_shares(att.bundle(rnd, c, sharing | {c}))
            except SecAggError:
                pass
        for c in everyone:
            try:
                att.collect_input(rnd, _votes(m, rnd), who=[c])
            except SecAggError:
                pass
        # Any number of survivor lists, each shown to any subset, then unmask requests.
        lists = data.draw(
            st.lists(st.sets(st.sampled_from(everyone), min_size=1), min_size=1, max_size=3), label="lists"
        )
        for survivors in lists:
            shown = data.draw(st.sets(st.sampled_from(everyone)), label="shown to")
            sigs = att.signatures(rnd, sorted(survivors), sorted(shown))
            att.ask(rnd, sorted(survivors), sigs, everyone)
    for owner in everyone:
        both = set(att.recovered(owner, "self")) & set(att.recovered(owner, "key"))
        assert not both, f"client {owner}: both secrets of round(s) {sorted(both)}"
