"""Integer settings of the data plane from the environment: bad values are refused by name."""

from __future__ import annotations

import pytest

from tensord_contract.errors import InvalidArgument
from tensord_dataplane import remote
from tensord_dataplane.env import env_int
from tensord_dataplane.transport.base import advertised_ranges


def test_unset_or_empty_gives_the_default(monkeypatch) -> None:
    monkeypatch.delenv("TENSORD_X", raising=False)
    assert env_int("TENSORD_X", 7, 1, 9) == 7
    monkeypatch.setenv("TENSORD_X", "")
    assert env_int("TENSORD_X", 7, 1, 9) == 7
    monkeypatch.setenv("TENSORD_X", "9")
    assert env_int("TENSORD_X", 7, 1, 9) == 9


@pytest.mark.parametrize("value", ["0", "10", "-3", "1e3", "lots", "2.5"])
def test_bad_values_name_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv("TENSORD_X", value)
    with pytest.raises(InvalidArgument, match="TENSORD_X"):
        env_int("TENSORD_X", 7, 1, 9)


def test_the_data_plane_settings_are_checked(monkeypatch) -> None:
    monkeypatch.setenv("TENSORD_ENGINE_BUFFERS", "0")
    with pytest.raises(InvalidArgument, match="TENSORD_ENGINE_BUFFERS"):
        advertised_ranges()
    monkeypatch.setenv("TENSORD_ENGINE_BUFFERS", "16")
    assert advertised_ranges() == 16
    monkeypatch.setenv("TENSORD_REMOTE_WINDOW_MB", "big")
    with pytest.raises(InvalidArgument, match="TENSORD_REMOTE_WINDOW_MB"):
        remote.window_for(1 << 30)
