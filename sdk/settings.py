"""The client's settings from the environment, read in one place (and only when a client is made:
importing `sdk` reads nothing). Arguments to `sdk.Client` win over these.

    TENSORD_SOCKET          the local daemon's Unix socket (default /run/tensord/tensord.sock)
    TENSORD_ADDR            host:port of a daemon's TCP listener, for a node without a daemon
    TENSORD_TOKEN           the token a TCP listener asks for
    TENSORD_TRANSPORT       the Transfer Engine protocol to read other nodes with (default: the
                            daemon's; see tensord_dataplane.transport.PROTOCOLS)
    TENSORD_TRANSPORT_HOST  the address this process's engine advertises (default: the daemon's
                            host on a local socket, else 127.0.0.1)

Data-plane settings and diagnostics (TENSORD_COPY_ENGINE, TENSORD_HOST_COPY, TENSORD_IPC_KEEP_SECONDS,
TENSORD_ENGINE_BUFFERS, TENSORD_REMOTE_WINDOW_MB, TENSORD_ENTRY_BYTES) are read
by the `tensord_dataplane` modules they steer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    socket: str | None
    address: str | None
    token: str | None
    transport: str | None
    transport_host: str | None

    @classmethod
    def from_env(cls) -> Settings:
        def get(key: str) -> str | None:
            return os.environ.get(key) or None

        return cls(
            get("TENSORD_SOCKET"),
            get("TENSORD_ADDR"),
            get("TENSORD_TOKEN"),
            get("TENSORD_TRANSPORT"),
            get("TENSORD_TRANSPORT_HOST"),
        )
