"""Client settings: the environment is read in one place (`sdk.settings`) and only when a client
is made; arguments win; a client can be handed its transport; transports come from one table."""

from __future__ import annotations

import pytest
import torch

import sdk
from sdk.settings import Settings
from tensord_contract.errors import InvalidArgument
from tensord_dataplane.transport import PROTOCOLS, TRANSPORTS, for_protocol
from tensord_dataplane.transport.memory import MemoryTransport


def test_settings_come_from_the_environment_when_a_client_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORD_SOCKET", "/tmp/nowhere.sock")
    monkeypatch.setenv("TENSORD_TOKEN", "from-env")
    monkeypatch.setenv("TENSORD_TRANSPORT", "tcp")
    monkeypatch.delenv("TENSORD_ADDR", raising=False)
    settings = Settings.from_env()
    assert (settings.socket, settings.token, settings.transport, settings.address) == (
        "/tmp/nowhere.sock",
        "from-env",
        "tcp",
        None,
    )
    client = sdk.CatalogueClient(token="given")
    assert client.endpoint == "unix:/tmp/nowhere.sock" and client.token == "given"  # the argument wins
    monkeypatch.setenv("TENSORD_ADDR", "10.0.0.1:7700")
    assert sdk.CatalogueClient().endpoint == "tcp:10.0.0.1:7700"
    monkeypatch.setenv("TENSORD_ADDR", "no-port")
    with pytest.raises(InvalidArgument, match="host:port"):
        sdk.CatalogueClient()


def test_transports_come_from_one_table() -> None:
    assert set(PROTOCOLS) == set(TRANSPORTS) >= {"tcp", "rdma", "nvlink_intra", "auto"}
    with pytest.raises(InvalidArgument, match="unknown transport protocol"):
        for_protocol("carrier-pigeon", "127.0.0.1")


def test_a_client_uses_the_transport_it_is_handed_and_leaves_it_open(daemon) -> None:
    given = MemoryTransport()
    client = sdk.Client(daemon.socket, transport=given)
    assert client._transport() is given  # no engine of its own is started
    assert client.put("settings/x", {"x": torch.arange(4.0)}) == 1
    assert torch.equal(client.get("settings/x")["x"], torch.arange(4.0))
    client.close()
    buf = torch.zeros(16, dtype=torch.uint8)
    given.register(buf.data_ptr(), 16)  # still open: it belongs to whoever made it
    given.close()
