"""Publishing without a copy on a GPU: readers in other processes read the publisher's own
memory bit-exactly through get, mount and load_into; unpublish waits for them; a killed
publisher's version goes; memory CUDA IPC cannot export is refused. Run with `pytest -m gpu`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import sdk
from sdk.engines import Derivation, EngineOptions, WeightUpdater, load_set, publish_params, rank_set, unpublish_params
from tensord_dataplane.fingerprint import fingerprint
from tests.daemons import child_env, wait_gone
from tests.engine_models import EngineModel, checkpoint

pytestmark = pytest.mark.gpu


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    """Engine-like memory: large tensors in their own allocations, small ones sharing segments,
    a tied weight, an empty tensor and a slice of a larger buffer."""
    g = torch.Generator(device="cuda:0").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(6):
        out[f"layers.{i}.w"] = torch.randn(1024, 1536, generator=g, device="cuda:0").bfloat16()
    for i in range(300):
        out[f"layers.{i}.norm"] = torch.randn(64 + i, generator=g, device="cuda:0")
    out["embed"] = torch.randn(512, 256, generator=g, device="cuda:0").half()
    out["lm_head"] = out["embed"]  # tied
    out["empty"] = torch.empty(0, 3, device="cuda:0")
    buf = torch.randint(0, 1 << 30, (4096,), generator=g, device="cuda:0")
    out["part"] = buf[1000:3000]  # contiguous, in the middle of another tensor's memory
    out["scale"] = torch.tensor(0.25, device="cuda:0").to(torch.float8_e4m3fn)
    return out


def _prints(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: fingerprint(t) for k, t in tensors.items()}


READER = """
import json, sys, torch, sdk
from tensord_dataplane.fingerprint import fingerprint
c = sdk.Client(sys.argv[1]); name = sys.argv[2]
out = {}
got = c.get(name, verify=True)
out["get"] = {k: fingerprint(t) for k, t in got.items()}
out["get_device"] = str(next(iter(got.values())).device)
out["cpu"] = {k: fingerprint(t) for k, t in c.get(name, device="cpu", verify=True).items()}
some = sorted(got)[::7]
out["names"] = {k: fingerprint(t) for k, t in c.get(name, names=some).items()}
target = {k: torch.empty_like(t) for k, t in got.items()}
c.load_into(target, name, verify=True)
out["load_into"] = {k: fingerprint(t) for k, t in target.items()}
with c.mount(name) as m:
    m.verify()
    out["mount"] = {k: fingerprint(t) for k, t in m.tensors.items()}
    if len(sys.argv) > 3:
        print(json.dumps(out), flush=True)
        sys.stdin.readline()
print(json.dumps(out), flush=True)
"""


def _reader(socket: str, name: str, hold: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", READER, socket, name] + (["hold"] if hold else [])
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())


def test_other_processes_read_the_publishers_memory(daemon, client: sdk.Client) -> None:
    params = _params()
    used = client.status()["devices"].get("cuda:0", {}).get("used", 0)
    with client.publish("zc/model", params) as pub:
        assert pub.published and client.info("zc/model")["version"] == pub.version
        [entry] = [e for e in client.status()["published"] if e["name"] == "zc/model"]
        assert entry["device"] == "cuda:0" and entry["bytes"] >= sum(t.nbytes for t in params.values())
        assert client.status()["devices"].get("cuda:0", {}).get("used", 0) == used  # no daemon copy
        with _reader(daemon.socket, "zc/model") as child:
            out, _ = child.communicate(timeout=180)
        assert child.returncode == 0
        seen = json.loads(out)
        expected = _prints(params)
        for how in ("get", "cpu", "load_into", "mount"):
            assert seen[how] == expected, how
        assert seen["names"] == {k: expected[k] for k in sorted(params)[::7]}
        assert seen["get_device"] == "cuda:0"
        # this process reads its own publication too (CUDA cannot open its own handles)
        assert _prints(dict(client.get("zc/model", verify=True).items())) == expected
    assert not pub.published
    with pytest.raises(sdk.NotFound):
        client.info("zc/model")


def test_unpublish_waits_for_a_mount_in_another_process(daemon, client: sdk.Client) -> None:
    params = _params(seed=1)
    pub = client.publish("zc/held", params)
    with _reader(daemon.socket, "zc/held", hold=True) as child:
        _wait_for_unpublish(pub, child, params)
    for t in params.values():  # the publisher may write now
        t.zero_()


def _wait_for_unpublish(pub: sdk.Publication, child: subprocess.Popen[str], params: dict[str, torch.Tensor]) -> None:
    try:
        assert child.stdout is not None and json.loads(child.stdout.readline())["mount"] == _prints(params)
        done: list[bool] = []
        waiter = threading.Thread(target=lambda: done.append(pub.unpublish(timeout=60)))
        waiter.start()
        time.sleep(0.5)
        assert not done  # the mount is still open
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        waiter.join(60)
        assert done == [True]
        child.wait(60)
        assert child.returncode == 0
    finally:
        child.kill()
        child.wait()


def test_a_killed_publisher_takes_its_version_with_it(daemon, client: sdk.Client) -> None:
    script = (
        "import sys, sdk\nfrom tests.test_publish_gpu import _params\n"
        "c = sdk.Client(sys.argv[1]); p = c.publish('zc/killed', _params(seed=2))\n"
        "print(p.version, flush=True)\nimport time; time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, daemon.socket], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert child.stdout is not None
        version = int(child.stdout.readline())
        got = client.get("zc/killed", version, verify=True)
        assert _prints(dict(got.items())) == _prints(_params(seed=2))
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_gone(client, "zc/killed")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


def test_memory_cuda_ipc_cannot_export_is_refused(daemon) -> None:
    script = (
        "import sys, torch, sdk\n"
        "try:\n    sdk.Client(sys.argv[1]).publish('zc/exp', {'x': torch.ones(1 << 20, device='cuda:0')})\n"
        "except sdk.InvalidArgument as e:\n    print('refused:', e)\nelse:\n    print('published')\n"
    )
    env = child_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    out = subprocess.run([sys.executable, "-c", script, daemon.socket], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused:") and "put a copy" in out.stdout, out.stdout


def test_non_contiguous_tensors_are_refused(client: sdk.Client) -> None:
    with pytest.raises(sdk.InvalidArgument, match="not contiguous"):
        client.publish("zc/strided", {"t": torch.ones(8, 8, device="cuda:0").t()})
    assert client.ls("zc/strided") == []


def test_engine_publishes_its_parameters_and_unpublishes_before_an_update(daemon) -> None:
    """An engine-style model published without a copy: a second engine copies it straight in;
    the first one's RL update withdraws the publication before writing its parameters."""
    ckpt = checkpoint(seed=7, device="cuda:0")
    first = EngineModel(tp=2, rank=0, device="cuda:0")
    first.load_weights(ckpt.items())
    with sdk.Client(daemon.socket) as engine_client, sdk.Client(daemon.socket) as trainer:
        version = publish_params(
            first, "zc/engine", rank=0, client=engine_client, derived_from=Derivation("zc/engine", 1), zero_copy=True
        )
        assert version == 1 and trainer.info(rank_set("zc/engine", 0))["version"] == 1
        second = EngineModel(tp=2, rank=0, device="cuda:0")
        found = load_set(second, EngineOptions(name="zc/engine", socket=daemon.socket), rank=0, device="cuda:0")
        assert found.kind == "rank" and second.equals(ckpt)
        trainer.put("zc/policy", checkpoint(seed=8, device="cuda:0"))
        updater = WeightUpdater(first, engine_client, device="cuda:0", name="zc/policy")
        updater.start()  # unpublishes first
        with pytest.raises(sdk.NotFound):
            trainer.info(rank_set("zc/engine", 0))
        updater.update()
        updater.finish()
        assert first.equals(checkpoint(seed=8, device="cuda:0"))
        assert unpublish_params(first)  # nothing left to withdraw


def test_a_descriptor_claiming_more_than_the_allocation_is_refused(client: sdk.Client) -> None:
    """What a lying daemon could send: allocation sizes larger than the memory the handles map."""
    import dataclasses

    from tensord_contract.manifest import Manifest, Table
    from tensord_dataplane.published_ipc import PublishedIpcAccess, export
    from tensord_dataplane.sources import places
    from tensord_dataplane.tensors import describe

    params = {"w": torch.ones(1 << 20, device="cuda:0")}
    d = describe(params.values(), copy_sparse=False)
    replica = export(places(d, list(params)))
    table = Table.of_columns(list(params), d.dtypes, d.ndims, d.dims)
    offsets, nbytes = table.layout()
    manifest = Manifest("zc/lie", 1, table, offsets, nbytes)
    PublishedIpcAccess(dataclasses.replace(replica, nbytes=nbytes), manifest).close()  # the truth reads
    lie = dataclasses.replace(replica, nbytes=nbytes, sizes=tuple(s * 4 for s in replica.sizes))
    with pytest.raises(sdk.ProtocolError, match="allocation"):
        PublishedIpcAccess(lie, manifest)


OTHER_GPU_READER = """
import json, sys, torch, sdk
from tensord_dataplane.fingerprint import fingerprint
c = sdk.Client(sys.argv[1])
got = c.get(sys.argv[2], device="cuda:0", verify=True)
target = {k: torch.empty_like(t) for k, t in got.items()}
c.load_into(target, sys.argv[2], verify=True)
print(json.dumps({"devices": sorted({str(t.device) for t in got.values()}),
                  "get": {k: fingerprint(t) for k, t in got.items()},
                  "load_into": {k: fingerprint(t) for k, t in target.items()}}), flush=True)
"""


@pytest.mark.multigpu
def test_a_publication_on_one_gpu_read_onto_the_other(daemon, client: sdk.Client) -> None:
    """Published on cuda:1, read into cuda:0 memory by another process (peer access)."""
    with torch.cuda.device(1):
        g = torch.Generator(device="cuda:1").manual_seed(5)
        params = {f"t{i}": torch.randn(1000 + i, 64, generator=g, device="cuda:1") for i in range(40)}
    with client.publish("zc/other-gpu", params):
        assert client.info("zc/other-gpu")["device"] == "cuda:1"
        args = [sys.executable, "-c", OTHER_GPU_READER, daemon.socket, "zc/other-gpu"]
        out = subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout)
    assert seen["devices"] == ["cuda:0"]
    assert seen["get"] == _prints(params) and seen["load_into"] == _prints(params)
