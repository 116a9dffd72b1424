"""Server and client configuration: TOML files with command-line overrides, validated."""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedprune.config import TIE_BREAKS, PruneConfig, prune_config
from secagg.messages import CHUNK_ALIGN

from .errors import NodeConfigError
from .identity import CLIENT_ID_PATTERN

LOOPBACK_NAMES = {"localhost"}
STRATEGIES = ("one-shot", "iterative", "statistics")


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) -> (host, port); NodeConfigError if malformed."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise NodeConfigError(f"listen address must look like host:port (port 0-65535), got {address!r}")
    return host, int(port)


def check_bindable(address: str) -> None:
    """Fail before loading the model if the server could not listen on ``address``."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NodeConfigError(f"cannot listen on {address}: unknown host {host!r}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            probe.bind(sockaddr)
    except OSError as exc:
        raise NodeConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc


def check_readable_file(path: str, what: str) -> None:
    """The TLS files are read only once serving starts: check them before the model loads."""
    if not Path(path).is_file():
        raise NodeConfigError(f"{what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise NodeConfigError(f"{what} file is not readable: {path}")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    sparsity: float = 0.5
    group: str = ""  # "": layer for the voting strategies, row (Wanda's own rule) for statistics
    strategy: str = "one-shot"  # one-shot | iterative | statistics
    tie_break: str = "random"
    weight_scaling: bool = False
    nm: str = ""
    seed: int = 0
    mode: str = "secure"
    expected_clients: int = 2
    min_clients: int = 2
    threshold: int = 0  # 0: from threat_model, over each sharing group (neighbours + the client)
    threat_model: str = "honest-but-curious"  # t > g/2; "malicious": t > 2g/3
    neighbours: int = 0  # 0: complete graph
    chunk_elems: int = 1 << 20
    roster: dict[str, str] = field(default_factory=dict)  # client id -> Ed25519 public key (hex)
    identity: str = ""  # Ed25519 key (fedprune keys) that signs receipts; "": a fresh one per run
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""
    insecure: bool = False
    join_deadline_s: float = 120.0
    hello_deadline_s: float = 10.0  # a connection must complete admission within this
    max_pending_hellos: int = 8  # connections awaiting admission at once
    round_deadline_s: float = 1800.0
    audit_dir: str = "audit"
    output_dir: str = "out"
    store_payloads: bool = True
    save_model: bool = True
    eval_sources: list[str] = field(default_factory=list)
    eval_windows: int = 8
    eval_seqlen: int = 128
    # The statistics strategy (nodes.statistics_rounds): the clip C (None: 2^32, nothing is
    # clipped; required with DP), each client's token bound, the clients' window length (the
    # DP unit), and optional differential privacy per client (secure mode only).
    stats_clip: float | None = None
    max_tokens_per_client: int = 128 * 2048
    seqlen: int = 128
    dp_epsilon: float | None = None
    dp_delta: float | None = None

    def validate(self) -> ServerConfig:
        if self.insecure:
            if not is_loopback(self.listen):
                raise NodeConfigError("--insecure is allowed only on a loopback address")
        elif not (self.tls_cert and self.tls_key and self.client_ca):
            raise NodeConfigError("TLS needs tls_cert, tls_key and client_ca (or --insecure on loopback)")
        else:
            for path, what in (
                (self.tls_cert, "tls_cert"),
                (self.tls_key, "tls_key"),
                (self.client_ca, "client_ca"),
            ):
                check_readable_file(path, what)
        split_address(self.listen)
        if self.mode not in ("plain", "secure"):
            raise NodeConfigError(f"mode must be plain or secure, got {self.mode!r}")
        if self.threat_model not in ("honest-but-curious", "malicious"):
            raise NodeConfigError(
                f"threat_model must be honest-but-curious or malicious, got {self.threat_model!r}"
            )
        if self.threshold < 0 or self.neighbours < 0:
            raise NodeConfigError("threshold and neighbours must be non-negative")
        if self.strategy not in STRATEGIES:
            raise NodeConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self._check_statistics()
        if self.tie_break not in TIE_BREAKS:
            raise NodeConfigError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}")
        if not 1 <= self.min_clients <= self.expected_clients:
            raise NodeConfigError("need 1 <= min_clients <= expected_clients")
        if not isinstance(self.roster, dict) or not all(isinstance(v, str) for v in self.roster.values()):
            raise NodeConfigError('roster must be a table of "client id" = "public key hex" lines')
        for cid in self.roster:
            if not CLIENT_ID_PATTERN.fullmatch(cid):
                raise NodeConfigError(
                    f"invalid roster id {cid!r}: use 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit"
                )
        if len(self.roster) < self.min_clients:
            raise NodeConfigError(f"the roster lists {len(self.roster)} clients, fewer than min_clients")
        if self.weight_scaling:
            raise NodeConfigError(
                "weight scaling needs every party to know the vote counts; it is a study option of "
                "'fedprune simulate', the federation broadcasts only the final mask"
            )
        if self.max_pending_hellos < 1:
            raise NodeConfigError("max_pending_hellos must be at least 1")
        if self.join_deadline_s <= 0 or self.round_deadline_s <= 0 or self.hello_deadline_s <= 0:
            raise NodeConfigError("deadlines must be positive")
        if (
            isinstance(self.chunk_elems, bool)
            or not isinstance(self.chunk_elems, int)
            or self.chunk_elems < CHUNK_ALIGN
            or self.chunk_elems % CHUNK_ALIGN
        ):
            # Plain mode packs 8 votes per byte and secure mode masks whole AES blocks:
            # a chunk that is not aligned would split bytes (corrupting votes) or blocks.
            raise NodeConfigError(
                f"chunk_elems must be a positive multiple of {CHUNK_ALIGN}, got {self.chunk_elems!r}"
            )
        if self.eval_windows < 0 or self.eval_seqlen < 2:
            raise NodeConfigError("need eval_windows >= 0 and eval_seqlen >= 2")
        self.prune_config()  # the pruning settings, checked before the model loads
        return self

    def _check_statistics(self) -> None:
        """The statistics settings; numbers only, so that a mistake costs no torch import."""
        dp = self.dp_epsilon is not None or self.dp_delta is not None
        if self.strategy != "statistics":
            if dp or self.stats_clip is not None:
                raise NodeConfigError('stats_clip, dp_epsilon and dp_delta apply to strategy = "statistics"')
            return
        if self.stats_clip is not None and not _positive(self.stats_clip):
            raise NodeConfigError(f"stats_clip must be a positive number, got {self.stats_clip!r}")
        if not _integer(self.max_tokens_per_client) or self.max_tokens_per_client < 1:
            raise NodeConfigError(
                f"max_tokens_per_client must be a positive integer, got {self.max_tokens_per_client!r}"
            )
        if not _integer(self.seqlen) or self.seqlen < 2:
            raise NodeConfigError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if not dp:
            return
        if self.dp_epsilon is None or self.dp_delta is None:
            raise NodeConfigError("differential privacy needs both dp_epsilon and dp_delta")
        if not _positive(self.dp_epsilon):
            raise NodeConfigError(f"dp_epsilon must be a positive number, got {self.dp_epsilon!r}")
        if (
            isinstance(self.dp_delta, bool)
            or not isinstance(self.dp_delta, int | float)
            or not 0 < self.dp_delta < 1
        ):
            raise NodeConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta!r}")
        if self.mode != "secure":
            raise NodeConfigError(
                "differential privacy needs mode = secure: with plain aggregation the server sees "
                "each client's noise share, a fraction of the noise"
            )
        if self.stats_clip is None:
            raise NodeConfigError("differential privacy needs stats_clip (the clip sets the noise scale)")

    @property
    def comparison_group(self) -> str:
        return self.group or ("row" if self.strategy == "statistics" else "layer")

    def prune_config(self) -> PruneConfig:
        """The pruning settings of this federation (see ``fedprune.config.prune_config``)."""
        return prune_config(
            sparsity=self.sparsity,
            group=self.comparison_group,
            tie_break=self.tie_break,
            nm=self.nm,
            seed=self.seed,
            weight_scaling=self.weight_scaling,
        )


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def load_server_config(path: str | None, overrides: dict) -> ServerConfig:
    data: dict = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
        except FileNotFoundError as exc:
            raise NodeConfigError(f"config file not found: {path}") from exc
        except OSError as exc:
            raise NodeConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise NodeConfigError(f"{path}: not a UTF-8 text file (TOML expected)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise NodeConfigError(f"{path}: invalid TOML ({exc})") from exc
    known = {f.name for f in fields(ServerConfig)}
    unknown = set(data) - known
    if unknown:
        raise NodeConfigError(f"unknown server config keys: {', '.join(sorted(unknown))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerConfig(**data).validate()
    except TypeError as exc:
        raise NodeConfigError(str(exc)) from exc
