"""Regenerate the gRPC stubs from protos/: ``python -m nodes.wire.generate``.

The .proto lives at protos/nodes/wire/federation.proto so that the generated
modules import each other as ``nodes.wire.federation_pb2`` (no clash with the
``fedprune`` package; the wire package itself is ``fedprune.v1``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "nodes/wire/federation.proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / "protos" / PROTO),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with status {code}")


if __name__ == "__main__":
    generate(ROOT)
    sys.exit(0)
