"""The server process: the gRPC endpoint (TLS, worker threads) around the coordinator.

The parts, each in its own module:

- nodes.admission: who may join (roster, TLS identity, challenge-response);
- nodes.coordinator: streams, membership, phases and deadlines, the round loop;
- nodes.aggregators: one round's sum, plain or under secure aggregation;
- nodes.outputs: final mask, manifest, pruned model, report.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc

from .config import ServerConfig
from .coordinator import Coordinator
from .errors import FederationAborted
from .wire import federation_pb2_grpc as pb_grpc

__all__ = ["FederationAborted", "FederationServer"]


class FederationServer:
    """Serve one federation: load the model, listen, coordinate, write the outputs."""

    def __init__(self, cfg: ServerConfig, log=print) -> None:
        self.cfg = cfg
        self.log = log
        self.coordinator = Coordinator(cfg, log)
        self.port: int | None = None

    def run(self) -> dict:
        """Serve, run the federation, write the outputs; return the report."""
        cfg = self.cfg
        server = grpc.server(
            # every admitted client holds a worker; unauthenticated streams hold at most
            # max_pending_hellos more, so honest clients always find one free
            futures.ThreadPoolExecutor(max_workers=cfg.expected_clients + cfg.max_pending_hellos + 4),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        pb_grpc.add_FederationServicer_to_server(self.coordinator, server)
        if cfg.insecure:
            self.port = server.add_insecure_port(cfg.listen)
        else:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.client_ca).read_bytes(),
                require_client_auth=True,
            )
            self.port = server.add_secure_port(cfg.listen, creds)
        server.start()
        self.log(f"listening on {cfg.listen.rsplit(':', 1)[0]}:{self.port} ({cfg.mode} mode)")
        try:
            return self.coordinator.federate()
        finally:
            self.coordinator.hang_up()
            server.stop(grace=2)
            self.coordinator.close()
