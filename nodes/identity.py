"""Identity keys (Ed25519) and a local certificate authority for demos and tests (x509)."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from .errors import IdentityError, OutputPathError
from .files import atomic_write_bytes, atomic_write_text, check_output_dir

# Client ids become file names (<id>.key, <id>.crt) and certificate common names:
# no path separators, no leading dot or dash, bounded length.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = {"server", "ca"}  # file names that 'fedprune certs' writes for itself


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is a safe id, else raise IdentityError."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise IdentityError(
            f"invalid client id {client_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return client_id


def check_output_directory(directory: str | Path, client_ids: Iterable[str], *, certs: bool = False) -> None:
    """Validate every id and the output directory before anything is written."""
    ids = list(client_ids)
    for cid in ids:
        check_client_id(cid)
        if certs and cid.lower() in RESERVED_NAMES:
            raise IdentityError(f"client id {cid!r} is reserved for the CA and server files")
    if len(set(ids)) != len(ids):
        raise IdentityError("client ids must be distinct")
    try:
        check_output_dir(directory, "--out", create_parents=True)
    except OutputPathError as exc:
        raise IdentityError(str(exc)) from exc


def write_identity(directory: Path, client_id: str) -> str:
    """Create ``<id>.key`` (Ed25519, PEM) in ``directory``; return the public key as hex."""
    check_client_id(client_id)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(directory / f"{client_id}.key", pem)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    atomic_write_text(directory / f"{client_id}.pub", public.hex() + "\n")
    return public.hex()


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 private key")
    return key


def parse_public_hex(text: str, who: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise IdentityError(f"roster entry for {who!r} is not a 32-byte hex Ed25519 public key")
    return raw


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(subject: str, public_key, issuer_name, signing_key, *, ca: bool, server: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def make_certificates(directory: Path, client_ids: list[str], ca_name: str = "fedprune demo CA") -> None:
    """A CA, a loopback server certificate, and one client certificate per id (CN = id)."""
    check_output_directory(directory, client_ids, certs=True)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = _cert(ca_name, ca_key.public_key(), ca_subject, ca_key, ca=True, server=False)
    atomic_write_bytes(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    for name, server in [("server", True)] + [(c, False) for c in client_ids]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key.public_key(), ca_subject, ca_key, ca=False, server=server)
        atomic_write_bytes(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(directory / f"{name}.tls.key", _pem_key(key))
