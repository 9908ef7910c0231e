"""Defaults both sides must agree on."""

#: Where the daemon listens and the SDK connects when nothing else is configured
#: (`daemon.socket`, `TENSORD_SOCKET`); the systemd unit's RuntimeDirectory.
DEFAULT_SOCKET = "/run/tensord/tensord.sock"
