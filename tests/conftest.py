from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import sdk
from tests.daemons import DaemonProcess
from tests.etcd_server import EtcdServer, etcd_server
from tests.frames import Raw


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") or item.get_closest_marker("multigpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if item.get_closest_marker("multigpu") and torch.cuda.device_count() < 2:
            pytest.skip("needs two CUDA GPUs")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemons (subprocesses) on temporary sockets; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(node: str = "n1", config: str | None = None, **kw: object) -> DaemonProcess:
        d = DaemonProcess(tmp_path / "daemons", node, config, **kw).start()  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon shared by a test module (tests use distinct set names)."""
    d = DaemonProcess(tmp_path_factory.mktemp("shared"), "shared").start()
    yield d
    d.kill()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[sdk.Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[Raw]:
    """A hand-driven connection to the shared daemon, hello said (`tests.frames.Raw`)."""
    r = Raw(daemon.socket)
    yield r
    r.close()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for a test module; its users keep apart by key prefix or node name."""
    with etcd_server(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test alone, to stop and restart."""
    with etcd_server() as server:
        yield server
