"""The daemon's typed configuration: TOML file, TENSORD_* environment, defaults.

Precedence: command-line argument > environment > file > default. Every key is documented in
configs/tensord.toml. Unknown keys and bad values are errors, reported with their place.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tensord_contract.checks import is_device_name, is_int
from tensord_contract.defaults import DEFAULT_SOCKET
from tensord_contract.errors import InvalidArgument
from tensord_dataplane.transport import PROTOCOLS as TRANSPORTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: object, where: str) -> int:
    """Bytes from an int or a string like "60GiB", "512 MB", "1.5GB"."""
    if is_int(value, 0):
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidArgument(f'{where}: {value!r} is not a size (e.g. 4096, "512MiB", "60GiB")')
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclass(frozen=True)
class Config:
    node: str = field(default_factory=lambda: check_node_id(socket.gethostname()))
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    log_level: str = "info"
    state_dir: str = ""  # "" = none: without etcd, version counters go to default_state_dir()
    hello_timeout: float = 10.0  # a new connection must say hello within this
    frame_timeout: float = 60.0  # a frame once started must arrive (a reply be read) within this
    budgets: dict[str, int | None] = field(default_factory=lambda: {"cpu": None})  # None: auto
    retention: int = 0
    eviction: str = "none"  # "lru": evict recoverable, unpinned versions under budget pressure
    huge_pages: bool = True  # host slabs of huge pages where the kernel has them
    pinned_host: int | None = None  # bytes of host slabs clients may page-lock; None: the cpu budget
    listen: str = ""  # "host:port" of the TCP control listener; "" = none
    token: str = ""
    token_reads: bool = False
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/tensord/"
    lease_ttl: float = 10.0
    etcd_ca_cert: str | None = None
    etcd_cert_key: str | None = None
    etcd_cert_cert: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    transport: str = ""  # "" = tcp when etcd is configured, off otherwise
    transport_host: str = ""
    nics: tuple[str, ...] = ()
    pull_through: bool = False
    allowed_roots: tuple[str, ...] = ()  # directories a daemon-side load may read
    metrics_listen: str = ""  # "host:port" of the Prometheus endpoint; "" = none
    # [fleet]: streaming pulls (tensord.fleet); configs/tensord.toml says what each does
    fleet_chunk: int = 0  # bytes per chunk; 0 = auto (by set size)
    fleet_batch: int = 0  # 0 = auto: 2, or 8 with transport.protocol = "nccl" (pushes over pair groups)
    fleet_window: int = 0  # 0 = auto: 8, or 32 with nccl
    fleet_slots: int = 0  # 0 = auto: 8, or 32 with nccl
    fleet_sources: int = 32
    fleet_wait: float = 1.0
    fleet_stall: float = 5.0
    fleet_advertise: float = 0.5
    fleet_rate: int = 0  # bytes/s per pull; 0 = no limit
    fleet_pairs: bool = True  # NCCL/gloo pair groups where the Transfer Engine cannot reach a peer

    @property
    def transport_protocol(self) -> str:
        """The Transfer Engine protocol in effect, or "off"."""
        if self.transport:
            return self.transport
        return "tcp" if self.etcd_endpoints else "off"

    def with_overrides(self, **kw: Any) -> Config:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def check_node_id(node: str, where: str = "node id") -> str:
    node = node.lower()
    if not re.fullmatch(r"[a-z0-9._-]{1,64}", node):
        raise InvalidArgument(f"{where}: {node!r} must be 1-64 chars of [a-z0-9._-]")
    return node


# (section, key) -> (Config field, parser). One table for the file; ENV for the environment.
def _str(v: object, where: str) -> str:
    if not isinstance(v, str):
        raise InvalidArgument(f"{where}: expected a string, not {v!r}")
    return v


def _mode(v: object, where: str) -> int:
    try:
        return int(_str(v, where), 8)
    except ValueError:
        raise InvalidArgument(f'{where}: {v!r} is not an octal mode like "0660"') from None


def _level(v: object, where: str) -> str:
    level = _str(v, where).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"{where}: log level must be debug, info, warning or error")
    return level


def _count(v: object, where: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if not is_int(v, 0):
        raise InvalidArgument(f"{where}: expected a non-negative integer, not {v!r}")
    return v


def _seconds(v: object, where: str) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: expected seconds, not {v!r}") from None
    if not 1.0 <= x <= 3600:
        raise InvalidArgument(f"{where}: must lie between 1 and 3600 seconds")
    return x


def _endpoints(v: object, where: str) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(e, str) for e in items):
        raise InvalidArgument(f'{where}: expected a list of "host:port" strings')
    out = tuple(e.strip() for e in items if e.strip())
    for e in out:
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", e):
            raise InvalidArgument(f"{where}: {e!r} is not host:port")
    return out


def _bool(v: object, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
        return v.lower() in ("1", "true", "yes")
    raise InvalidArgument(f"{where}: expected true or false, not {v!r}")


def _address(v: object, where: str) -> str:
    text = _str(v, where)
    if text and not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}", text):
        raise InvalidArgument(f"{where}: {text!r} is not host:port")
    return text


def _protocol(v: object, where: str) -> str:
    text = _str(v, where).lower()
    allowed = ("off", *TRANSPORTS, "nccl")  # nccl: daemons move bytes in pair groups only
    if text not in ("", *allowed):
        raise InvalidArgument(f"{where}: protocol must be one of {', '.join(allowed)}")
    return text


def _directory(v: object, where: str) -> str:
    text = _str(v, where)
    if text and not os.path.isabs(text):
        raise InvalidArgument(f"{where}: {text!r} must be an absolute path")
    return text


def _eviction(v: object, where: str) -> str:
    text = _str(v, where).lower()
    if text not in ("lru", "none"):
        raise InvalidArgument(f'{where}: eviction must be "lru" or "none"')
    return text


def _interval(v: object, where: str) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: expected seconds, not {v!r}") from None
    if not 0.01 <= x <= 3600:
        raise InvalidArgument(f"{where}: must lie between 0.01 and 3600 seconds")
    return x


def _positive(v: object, where: str) -> int:
    n = _count(v, where)
    if not 1 <= n <= 4096:
        raise InvalidArgument(f"{where}: must lie between 1 and 4096")
    return n


def _positive_or_auto(v: object, where: str) -> int:
    return 0 if v == "auto" else _positive(v, where)


def _chunk(v: object, where: str) -> int:
    if v == "auto":
        return 0
    n = parse_size(v, where)
    if n < (64 << 10) or n % 256:
        raise InvalidArgument(f'{where}: a chunk is "auto" or at least 64 KiB, a multiple of 256 bytes')
    return n


def _names(v: object, where: str) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(e, str) and e for e in items):
        raise InvalidArgument(f"{where}: expected a list of names")
    return tuple(items)


def _roots(v: object, where: str) -> tuple[str, ...]:
    roots = _names(v, where) if v else ()
    if not all(os.path.isabs(r) for r in roots):
        raise InvalidArgument(f"{where}: allowed roots must be absolute paths")
    return tuple(os.path.realpath(r) for r in roots)


def _budgets(v: object, where: str) -> dict[str, int | None]:
    if not isinstance(v, Mapping):
        raise InvalidArgument(f"{where}: expected a table of device = size")
    out: dict[str, int | None] = {}
    for device, size in v.items():
        if not is_device_name(device):
            raise InvalidArgument(f'{where}: device {device!r} must be "cpu" or "cuda:N"')
        out[device] = None if size == "auto" else parse_size(size, f"{where}.{device}")
    return out


def _size_or_auto(v: object, where: str) -> int | None:
    return None if v == "auto" else parse_size(v, where)


FILE_KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("daemon", "node"): ("node", lambda v, w: check_node_id(_str(v, w), w)),
    ("daemon", "socket"): ("socket", _str),
    ("daemon", "socket_mode"): ("socket_mode", _mode),
    ("daemon", "log_level"): ("log_level", _level),
    ("daemon", "listen"): ("listen", _address),
    ("daemon", "token"): ("token", _str),
    ("daemon", "token_reads"): ("token_reads", _bool),
    ("daemon", "state_dir"): ("state_dir", _directory),
    ("daemon", "hello_timeout"): ("hello_timeout", _seconds),
    ("daemon", "frame_timeout"): ("frame_timeout", _seconds),
    ("memory", "budgets"): ("budgets", _budgets),
    ("memory", "retention"): ("retention", _count),
    ("memory", "huge_pages"): ("huge_pages", _bool),
    ("memory", "pinned_host"): ("pinned_host", lambda v, w: _size_or_auto(v, w)),
    ("memory", "eviction"): ("eviction", _eviction),
    ("registry", "etcd_endpoints"): ("etcd_endpoints", _endpoints),
    ("registry", "prefix"): ("etcd_prefix", _str),
    ("registry", "lease_ttl"): ("lease_ttl", _seconds),
    ("registry", "ca_cert"): ("etcd_ca_cert", _str),
    ("registry", "cert_key"): ("etcd_cert_key", _str),
    ("registry", "cert_cert"): ("etcd_cert_cert", _str),
    ("registry", "user"): ("etcd_user", _str),
    ("registry", "password"): ("etcd_password", _str),
    ("transport", "protocol"): ("transport", _protocol),
    ("transport", "hostname"): ("transport_host", _str),
    ("transport", "nics"): ("nics", _names),
    ("cache", "pull_through"): ("pull_through", _bool),
    ("ingest", "allowed_roots"): ("allowed_roots", lambda v, w: _roots(v, w)),
    ("metrics", "listen"): ("metrics_listen", _address),
    ("fleet", "chunk_bytes"): ("fleet_chunk", _chunk),
    ("fleet", "batch"): ("fleet_batch", _positive_or_auto),
    ("fleet", "window"): ("fleet_window", _positive_or_auto),
    ("fleet", "upload_slots"): ("fleet_slots", _positive_or_auto),
    ("fleet", "max_sources"): ("fleet_sources", _positive),
    ("fleet", "wait_seconds"): ("fleet_wait", _interval),
    ("fleet", "stall_seconds"): ("fleet_stall", _interval),
    ("fleet", "advertise_seconds"): ("fleet_advertise", _interval),
    ("fleet", "rate_limit"): ("fleet_rate", lambda v, w: parse_size(v, w)),
    ("fleet", "pair_groups"): ("fleet_pairs", _bool),
}
ENV: dict[str, tuple[str, Any]] = {
    "TENSORD_NODE": ("node", lambda v, w: check_node_id(v, w)),
    "TENSORD_SOCKET": ("socket", _str),
    "TENSORD_LOG_LEVEL": ("log_level", _level),
    "TENSORD_STATE_DIR": ("state_dir", _directory),
    "TENSORD_RETENTION": ("retention", _count),
    "TENSORD_HUGE_PAGES": ("huge_pages", _bool),
    "TENSORD_PINNED_HOST": ("pinned_host", lambda v, w: _size_or_auto(v, w)),
    "TENSORD_EVICTION": ("eviction", _eviction),
    "TENSORD_METRICS_LISTEN": ("metrics_listen", _address),
    "TENSORD_ETCD": ("etcd_endpoints", _endpoints),
    "TENSORD_ETCD_PASSWORD": ("etcd_password", _str),
    "TENSORD_LISTEN": ("listen", _address),
    "TENSORD_TOKEN": ("token", _str),
    "TENSORD_TRANSPORT": ("transport", _protocol),
    "TENSORD_TRANSPORT_HOST": ("transport_host", _str),
    "TENSORD_PULL_THROUGH": ("pull_through", _bool),
    "TENSORD_ALLOWED_ROOTS": ("allowed_roots", lambda v, w: _roots(v.split(":"), w)),
    "TENSORD_CPU_BUDGET": ("cpu_budget", lambda v, w: None if v == "auto" else parse_size(v, w)),
    "TENSORD_FLEET_CHUNK": ("fleet_chunk", _chunk),
    "TENSORD_FLEET_RATE": ("fleet_rate", lambda v, w: parse_size(v, w)),
}


def default_state_dir(socket_path: str, env: Mapping[str, str] | None = None) -> Path:
    """Where a daemon with neither `daemon.state_dir` nor etcd keeps its version counters, so
    that a restart never hands out a version again: per user ($XDG_STATE_HOME, else
    ~/.local/state) and per control socket, `tensord/<hash of the socket path>`."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # unset or relative: the XDG default
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    key = hashlib.blake2b(os.path.abspath(socket_path).encode(), digest_size=8).hexdigest()
    return Path(base) / "tensord" / key


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then the environment."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config file {path}: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise InvalidArgument(f"{path}: [{section}] must be a table")
            for key, raw in table.items():
                if (section, key) not in FILE_KEYS:
                    raise InvalidArgument(f"{path}: unknown key {section}.{key}")
                attr, parse = FILE_KEYS[(section, key)]
                values[attr] = parse(raw, f"{path}: {section}.{key}")
    env = os.environ if env is None else env
    for var, (attr, parse) in ENV.items():
        if env.get(var):
            values[attr] = parse(env[var], var)
    if "state_dir" not in values and env.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        values["state_dir"] = _directory(env["STATE_DIRECTORY"].split(":")[0], "STATE_DIRECTORY")
    if "cpu_budget" in values:
        values["budgets"] = {**values.get("budgets", {"cpu": None}), "cpu": values.pop("cpu_budget")}
    return Config(**values)
