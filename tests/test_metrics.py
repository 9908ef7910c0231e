"""The Prometheus endpoint, scraped with a real HTTP client after known operations."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

import sdk
from tests.etcd_server import free_port

MIB = 1 << 20


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_after_known_operations(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    models = tmp_path / "models"
    models.mkdir()
    for i in range(2):
        save_file({"w": torch.full((MIB // 4,), float(i))}, models / f"m{i}.safetensors")
    config = (
        f'[memory]\nbudgets = {{ cpu = "3MiB" }}\neviction = "lru"\nhuge_pages = false\n'
        f'[ingest]\nallowed_roots = ["{models}"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    d = start_daemon("scraped", config=config)
    small = {"a": torch.ones(100), "b": torch.zeros(3, 5, dtype=torch.int64)}
    nbytes = 400 + 120
    with d.client() as c:
        first = scrape(port)
        assert value(first, "tensord_versions") == 0 and value(first, "tensord_device_used_bytes", device="cpu") == 0
        assert value(first, "tensord_device_budget_bytes", device="cpu") == 3 * MIB
        assert c.put("m/small", small) == 1
        assert c.put("m/small", small) == 2
        for _ in range(3):
            c.get("m/small")
        with pytest.raises(sdk.NotFound):
            c.info("m/missing")
        r = c.reserve("m/open", {"x": ("float32", (4,))})
        with c.mount("m/small", 1):
            during = scrape(port)
            used = c.status()["devices"]["cpu"]["used"]
        r.abort()

        assert value(during, "tensord_requests_total", op="put_commit", code="ok") == 2
        assert value(during, "tensord_requests_total", op="info", code="not_found") == 1
        assert value(during, "tensord_request_seconds_count", op="open") == 4  # 3 gets, 1 mount
        assert value(during, "tensord_request_seconds_bucket", op="open", le="+Inf") == 4
        assert value(during, "tensord_bytes_total", path="host", direction="write") == 2 * nbytes
        assert value(during, "tensord_bytes_total", path="host", direction="read") == 4 * nbytes
        assert value(during, "tensord_bytes_total", path="transfer_engine", direction="read") == 0
        assert value(during, "tensord_sets") == 1 and value(during, "tensord_versions") == 2
        assert value(during, "tensord_pins") == 1 and value(during, "tensord_reservations") == 1
        assert value(during, "tensord_device_used_bytes", device="cpu") == used > 0

        # a daemon-side load (ingest), then a budget that makes it evict and read back
        c.delete("m/small")
        assert c.load_checkpoint(str(models / "m0.safetensors"), "m/file") == 1
        c.put("m/put", {"w": torch.zeros(MIB // 4)})
        c.put("m/put2", {"w": torch.zeros(MIB // 4)})  # 3 MiB: full
        after = scrape(port)
        assert value(after, "tensord_bytes_total", path="ingest", direction="write") == MIB
        assert value(after, "tensord_evictions_total", device="cpu", reason="checkpoint") == 0
        c.put("m/put3", {"w": torch.ones(MIB // 4)})  # evicts m/file (the one recoverable version)
        evicted = scrape(port)
        assert value(evicted, "tensord_evictions_total", device="cpu", reason="checkpoint") == 1
        assert value(evicted, "tensord_evicted_bytes_total", device="cpu") == MIB
        assert value(evicted, "tensord_versions_evicted") == 1
        c.delete("m/put3")
        assert torch.equal(c.get("m/file")["w"], torch.zeros(MIB // 4))  # comes back from its file
        back = scrape(port)
        assert value(back, "tensord_restores_total", outcome="checkpoint") == 1
        assert value(back, "tensord_bytes_total", path="ingest", direction="write") == 2 * MIB
        assert value(back, "tensord_versions_evicted") == 0
        assert ("tensord_etcd_lease_up", ()) not in back  # no etcd here

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert err.value.code == 404
    err.value.close()


def test_off_by_default(start_daemon) -> None:
    d = start_daemon("quiet")
    log = d.log.read_text()
    assert "metrics on http" not in log
