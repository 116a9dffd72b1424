"""Conversions between the protobuf wire messages and secagg's messages or fedprune's settings."""

from __future__ import annotations

from fedprune.config import PruneConfig, prune_config
from secagg import messages as sm
from secagg.shamir import Share

from . import federation_pb2 as pb


def advert_to_pb(m: sm.AdvertiseKeys) -> pb.KeyAdvert:
    return pb.KeyAdvert(
        round=m.round,
        sender=m.sender,
        enc_public=m.enc_public,
        mask_public=m.mask_public,
        seed_commitment=m.seed_commitment,
        signature=m.signature,
    )


def advert_from_pb(p: pb.KeyAdvert, session: bytes) -> sm.AdvertiseKeys:
    return sm.AdvertiseKeys(
        session, p.round, p.sender, p.enc_public, p.mask_public, p.seed_commitment, p.signature
    )


def directory_to_pb(m: sm.KeyDirectory) -> pb.KeyDirectory:
    return pb.KeyDirectory(round=m.round, adverts=[advert_to_pb(a) for a in m.adverts])


def directory_from_pb(p: pb.KeyDirectory, session: bytes) -> sm.KeyDirectory:
    return sm.KeyDirectory(session, p.round, tuple(advert_from_pb(a, session) for a in p.adverts))


def shares_to_pb(m: sm.EncryptedShares) -> pb.EncryptedShares:
    return pb.EncryptedShares(round=m.round, ciphertexts=dict(m.ciphertexts))


def shares_from_pb(p: pb.EncryptedShares, session: bytes, sender: int) -> sm.EncryptedShares:
    return sm.EncryptedShares(session, p.round, sender, dict(p.ciphertexts))


def bundle_to_pb(m: sm.ShareBundle) -> pb.ShareBundle:
    return pb.ShareBundle(round=m.round, ciphertexts=dict(m.ciphertexts))


def bundle_from_pb(p: pb.ShareBundle, session: bytes, receiver: int) -> sm.ShareBundle:
    return sm.ShareBundle(session, p.round, receiver, dict(p.ciphertexts))


def survivors_to_pb(m: sm.SurvivorList) -> pb.SurvivorList:
    return pb.SurvivorList(round=m.round, survivors=list(m.survivors))


def survivors_from_pb(p: pb.SurvivorList, session: bytes) -> sm.SurvivorList:
    return sm.SurvivorList(session, p.round, tuple(p.survivors))


def request_to_pb(m: sm.UnmaskRequest) -> pb.UnmaskRequest:
    return pb.UnmaskRequest(round=m.round, survivors=list(m.survivors), signatures=dict(m.signatures))


def request_from_pb(p: pb.UnmaskRequest, session: bytes) -> sm.UnmaskRequest:
    return sm.UnmaskRequest(session, p.round, tuple(p.survivors), dict(p.signatures))


def unmask_to_pb(m: sm.UnmaskShares) -> pb.UnmaskShares:
    return pb.UnmaskShares(
        round=m.round,
        self_mask_shares={k: pb.Share(x=s.x, y=s.y) for k, s in m.self_mask_shares.items()},
        key_shares={k: pb.Share(x=s.x, y=s.y) for k, s in m.key_shares.items()},
    )


def unmask_from_pb(p: pb.UnmaskShares, session: bytes, sender: int) -> sm.UnmaskShares:
    return sm.UnmaskShares(
        session,
        p.round,
        sender,
        {k: Share(s.x, s.y) for k, s in p.self_mask_shares.items()},
        {k: Share(s.x, s.y) for k, s in p.key_shares.items()},
    )


def prune_to_welcome(cfg: PruneConfig) -> dict:
    """The Welcome fields that carry the pruning settings (N:M as nm_n, nm_m; 0, 0 = none)."""
    nm = cfg.nm or (0, 0)
    return {
        "sparsity": cfg.sparsity,
        "comparison_group": cfg.comparison_group,
        "tie_break": cfg.tie_break,
        "weight_scaling": cfg.weight_scaling,
        "nm_n": nm[0],
        "nm_m": nm[1],
        "seed": cfg.seed,
    }


def prune_from_welcome(w: pb.Welcome, batch_size: int) -> PruneConfig:
    """The server's pruning settings, with this client's own batch size."""
    return prune_config(
        sparsity=w.sparsity,
        group=w.comparison_group,
        tie_break=w.tie_break,
        nm=(w.nm_n, w.nm_m),
        seed=w.seed,
        weight_scaling=w.weight_scaling,
        batch_size=batch_size,
    )
