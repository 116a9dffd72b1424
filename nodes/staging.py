"""Each client's masked chunks, staged on disk until its upload completes.

Masked chunks cannot be taken back out of the running sum without unmasking
the client they came from, so a client that dies halfway through its upload
would abort the round. Instead every validated chunk is appended to that
client's staging file; only when the client says its upload is complete (and
every chunk is there) are its chunks added to the sum, one at a time. A client
that vanishes mid-upload leaves only a file to delete: it is treated as a
client that dropped after sharing keys. Memory stays one chunk per client;
disk holds at most every client's packed vector for one round.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct("<QI")  # element offset, data length


class ChunkStaging:
    def __init__(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=".staging-", dir=directory)
        self._files: dict[str, object] = {}
        self._opened = 0  # file names are never reused, even after a client's file is drained
        self.offsets: dict[str, set[int]] = {}

    def add(self, client: str, offset: int, data: bytes) -> None:
        f = self._files.get(client)
        if f is None:
            self._opened += 1
            f = self._files[client] = open(Path(self._dir.name) / f"{self._opened}.bin", "w+b")  # noqa: SIM115
        f.write(_HEADER.pack(offset, len(data)))
        f.write(data)
        self.offsets.setdefault(client, set()).add(offset)

    def drain(self, client: str) -> Iterator[tuple[int, bytes]]:
        """The client's chunks in arrival order; its file is deleted afterwards."""
        f = self._files.pop(client, None)
        self.offsets.pop(client, None)
        if f is None:
            return
        with f:
            f.seek(0)
            while header := f.read(_HEADER.size):
                offset, size = _HEADER.unpack(header)
                yield offset, f.read(size)

    def discard(self, client: str) -> None:
        f = self._files.pop(client, None)
        self.offsets.pop(client, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        for client in list(self._files):
            self.discard(client)
        self._dir.cleanup()
