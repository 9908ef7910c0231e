"""`Client.watch` stops after `timeout` seconds without a new version, however long its daemon
polls are, and refuses a timeout that is no number of seconds."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import sdk
from sdk import catalogue


def test_a_timeout_longer_than_one_poll_is_kept(client: sdk.Client, daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalogue, "_WATCH_POLL", 0.2)  # polls far shorter than the timeout
    name = "watch/long"
    client.put(name, {"x": torch.ones(1)})

    def later() -> None:
        with daemon.client() as other:
            other.put(name, {"x": torch.ones(1)})

    timer = threading.Timer(0.8, later)  # after several empty polls
    timer.start()
    start = time.monotonic()
    seen = list(client.watch(name, timeout=1.5))
    took = time.monotonic() - start
    timer.join()
    assert seen == [2]  # delivered, though four polls had come back empty before it
    assert 0.7 + 1.5 <= took < 0.8 + 1.5 + 3.0  # then 1.5 s more without one


def test_a_zero_timeout_returns_at_once(client: sdk.Client) -> None:
    client.put("watch/zero", {"x": torch.ones(1)})
    start = time.monotonic()
    assert list(client.watch("watch/zero", timeout=0)) == []
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("timeout", [-1, float("nan"), "10", True, float("-inf")])
def test_a_timeout_that_is_no_number_of_seconds_is_refused(client: sdk.Client, timeout: object) -> None:
    with pytest.raises(sdk.InvalidArgument, match="timeout must be"):
        next(iter(client.watch("watch/bad", timeout=timeout)))  # type: ignore[arg-type]
