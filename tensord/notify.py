"""systemd's notify protocol, without libsystemd: READY, STATUS, STOPPING and watchdog pings.

A message is one datagram of newline-separated `KEY=value` lines sent to the Unix socket named
in $NOTIFY_SOCKET (a path, or `@name` for the abstract namespace). Nothing is sent when the
variable is unset (not run by systemd with `Type=notify`), and a failed send is logged once,
never raised: the daemon serves whether or not anyone listens. Sends never block (the socket is
non-blocking): a receiver that does not read costs the message, never the event loop.

The watchdog: with `WatchdogSec=` systemd sets $WATCHDOG_USEC (and $WATCHDOG_PID, the process
meant). `Notifier.watchdog()` is a task on the daemon's event loop that pings every half
period; a loop that stalls stops pinging, and systemd kills and restarts the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Speaks to systemd through $NOTIFY_SOCKET (read once, at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_seconds = _watchdog(env)
        self._sock: socket.socket | None = None
        self._warned: set[str] = set()  # "dropped", "failed": each logged once

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One message, e.g. `send(READY=1, STATUS="serving")`; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto(message, self.address)
        except BlockingIOError:  # the receiver's queue is full: drop it, never wait
            self._warn("dropped", "systemd's notify socket %s does not read: messages are dropped")
            return False
        except OSError as exc:
            self._warn("failed", "cannot notify systemd at %s: %s", exc)
            return False
        return True

    def _warn(self, kind: str, message: str, *extra: object) -> None:
        """Once per kind: a watchdog failing every few seconds would flood the log."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, _shown(self.address), *extra)

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")

    async def watchdog(self) -> None:
        """Ping every half watchdog period, from the event loop, for as long as it runs."""
        if self.watchdog_seconds is None or self.address is None:
            return
        period = self.watchdog_seconds / 2
        log.info("systemd watchdog: %.1f s, pinging every %.1f s from the event loop", self.watchdog_seconds, period)
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _shown(address: str | bytes | None) -> str:
    """The address as $NOTIFY_SOCKET spells it (`@name` for an abstract one)."""
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else str(address)


def _address(value: str) -> str | bytes | None:
    """The socket address in $NOTIFY_SOCKET: a path, or `@name` for an abstract socket."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:  # vsock (`vsock:CID:PORT`) and relative paths are not for a service on a host
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket path: not notifying systemd", value)
    return None


def _watchdog(env: Mapping[str, str]) -> float | None:
    """Seconds of the watchdog period when it is meant for this process, else None."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (a parent that exec-ed us would have set ours)
    return int(usec) / 1e6
