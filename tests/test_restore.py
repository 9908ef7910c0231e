"""A daemon restarted (SIGKILL or SIGTERM) restores what it held from its state directory:
checkpoints are read again (bit-exact, or the version is lost), puts are reported lost, versions
keep their numbers and `latest` never goes back. One node, the embedded registry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tensord.cli.checkpoints import load_checkpoint
from tensord_contract.errors import NotFound
from tests.daemons import MINILM_DIR, WEIGHTS, needs_minilm, tensord
from tests.data import random_tensor, same_bits


def _config(tmp_path: Path, roots: list[Path], extra: str = "") -> str:
    listed = ", ".join(f'"{r}"' for r in roots)
    return f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[ingest]\nallowed_roots = [{listed}]\n{extra}'


def _checkpoint(path: Path, seed: int, n: int = 5) -> dict[str, torch.Tensor]:
    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float16, torch.int64]
    tensors = {f"layer.{i}.w": random_tensor(dtypes[i % len(dtypes)], (64 + i, 33), seed=seed + i) for i in range(n)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.empty(0, 4)
    save_file(tensors, path)
    return load_file(path)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)


def wait_restored(c: sdk.Client, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        restore = c.status()["restore"]
        if restore is not None and restore["state"] in ("done", "none"):
            return restore
        if time.monotonic() > deadline:
            raise TimeoutError(f"restore did not finish: {restore}")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_restart_restores_checkpoints_and_reports_puts_lost(start_daemon, tmp_path: Path, how: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    a = _checkpoint(models / "a.safetensors", seed=1)
    b = _checkpoint(models / "b.safetensors", seed=2)
    _checkpoint(models / "changed.safetensors", seed=3)
    d = start_daemon("keeper", config=_config(tmp_path, [models]))
    with d.client() as c:
        assert c.load_checkpoint(str(models / "a.safetensors"), "file/a") == 1  # the daemon reads it
        assert c.load_checkpoint(str(models / "a.safetensors"), "file/a") == 2
        assert c.delete("file/a", 1) == 1  # deleted versions stay deleted
        assert load_checkpoint(c, models / "b.safetensors", "file/b")[0] == 1  # the client reads it
        assert c.put("mixed", {"x": torch.arange(10)}) == 1
        assert c.load_checkpoint(str(models / "b.safetensors"), "mixed") == 2
        assert c.put("mixed", {"x": torch.arange(20)}) == 3  # the newest one is a put
        assert c.load_checkpoint(str(models / "changed.safetensors"), "changed") == 1
        assert c.put("put/only", {"x": torch.ones(3)}) == 1
    _checkpoint(models / "changed.safetensors", seed=99)  # same names and shapes, other bytes

    if how == "SIGKILL":
        d.kill()
    else:
        assert d.stop() == 0
    d.start()
    with d.client() as c:
        # reads do not wait for the whole restore: each waits for its own version
        assert _same(c.get("file/a", verify=True), a)
        restore = wait_restored(c)
        assert restore["total"] == 7 and restore["restored"] == 3 and restore["lost"] == 4, restore
        lost = {(x["name"], x["version"]): x["reason"] for x in restore["lost_versions"]}
        assert set(lost) == {("mixed", 1), ("mixed", 3), ("put/only", 1), ("changed", 1)}
        assert "put by" in lost[("put/only", 1)] and "changed since it was loaded" in lost[("changed", 1)]

        assert c.info("file/a")["versions"] == [2]  # v1 stays deleted, v2 keeps its number
        assert _same(c.get("file/a", 2, verify=True), a)
        assert _same(c.get("file/b", verify=True), b)
        assert c.info("file/b")["origin"] == f"file:{models / 'b.safetensors'}"
        info = c.info("mixed")
        assert info["versions"] == [1, 2, 3] and info["latest"] == 3  # latest does not go back
        with pytest.raises(NotFound, match="mixed v3 was lost when node keeper restarted"):
            c.get("mixed")  # latest names v3, which is lost: an error, never v2 instead
        assert _same(c.get("mixed", 2, verify=True), b)
        assert c.info("mixed", 3)["lost"] is not None and c.info("mixed", 2)["lost"] is None
        with pytest.raises(NotFound, match="changed since it was loaded"):
            c.get("changed")
        assert c.put("mixed", {"x": torch.zeros(2)}) == 4  # versions go on
        assert c.put("file/a", {"x": torch.zeros(2)}) == 3
        assert c.delete("put/only") == 1  # an operator removes what is lost
        assert [s["name"] for s in c.ls()] == ["changed", "file/a", "file/b", "mixed"]
    out = tensord("status", socket=d.socket)
    assert "restore: done" in out.stdout and "4 lost" in out.stdout, out.stdout

    d.kill()  # and once more: only what is still held comes back
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        # file/a v3 and mixed v4 were puts: lost too; mixed v1 and v3 and changed v1 still are
        assert restore["restored"] == 3 and restore["lost"] == 5, restore
        assert c.info("mixed")["latest"] == 4 and c.info("file/a")["versions"] == [2, 3]


@needs_minilm
def test_real_weights_come_back_bit_exact_with_the_cli(start_daemon, tmp_path: Path) -> None:
    assert MINILM_DIR is not None
    d = start_daemon("minilm", config=_config(tmp_path, [MINILM_DIR.resolve()]))
    out = tensord("load", str(WEIGHTS), "--name", "minilm", "--quiet", socket=d.socket)
    assert out.returncode == 0, out.stderr
    d.kill()
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["restored"] == 1 and restore["bytes"] == os.path.getsize(WEIGHTS) - _header_bytes(WEIGHTS)
        assert c.info("minilm")["version"] == 1
        assert _same(c.get("minilm", verify=True), load_file(WEIGHTS))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _llama_like(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """Row-split, column-split and replicated tensors under the built-in llama rules."""
    p = "model.layers.0."
    shapes = {
        p + "self_attn.q_proj.weight": ((8, 6), torch.bfloat16),  # rows
        p + "self_attn.o_proj.weight": ((6, 8), torch.float32),  # columns: strided runs
        p + "mlp.down_proj.weight": ((5, 12), torch.float16),  # columns
        p + "input_layernorm.weight": ((6,), torch.float32),  # replicated
        "model.embed_tokens.weight": ((10, 6), torch.bfloat16),  # default: replicated
        p + "mlp.gate_proj.weight": ((0, 6), torch.bfloat16),  # empty
    }
    tensors = {k: random_tensor(dtype, shape, seed=seed + i) for i, (k, (shape, dtype)) in enumerate(shapes.items())}
    save_file(tensors, path)
    return load_file(path)


def test_ranks_of_a_sharded_load_come_back_from_their_file(start_daemon, tmp_path: Path) -> None:
    """`tensord load --tp` rank sets are read again from their file after a restart: each rank's
    shards found again from its recorded shapes, bit-exact, or lost if the file changed."""
    models = tmp_path / "models"
    models.mkdir()
    _llama_like(models / "m.safetensors", seed=10)
    _llama_like(models / "changed.safetensors", seed=20)
    d = start_daemon("ranks", config=_config(tmp_path, [models]))
    for file, name in (("m", "tp/m"), ("changed", "tp/changed")):
        out = tensord(
            "load", str(models / f"{file}.safetensors"), "--name", name, "--tp", "2", "--quiet", socket=d.socket
        )
        assert out.returncode == 0, out.stderr
    with d.client() as c:
        before = {r: dict(c.get(f"tp/m/tp{r}", verify=True).items()) for r in range(2)}
        origin = c.info("tp/m/tp1")["origin"]
    assert origin == f"file:{models / 'm.safetensors'}#rank=1&tp=2"
    _llama_like(models / "changed.safetensors", seed=21)  # same names and shapes, other bytes
    d.kill()
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["restored"] == 2 and restore["lost"] == 2, restore
        for r in range(2):
            got = dict(c.get(f"tp/m/tp{r}", verify=True).items())
            assert _same(got, before[r]) and list(got) == list(before[r])
        q = "model.layers.0.self_attn.q_proj.weight"
        assert before[0][q].shape == (4, 6) and not torch.equal(before[0][q], before[1][q])
        reasons = {x["name"]: x["reason"] for x in restore["lost_versions"]}
        assert set(reasons) == {"tp/changed/tp0", "tp/changed/tp1"}
        assert all("changed since it was loaded" in r for r in reasons.values())


def test_a_rank_whose_file_no_longer_fits_its_shapes_is_lost_saying_why(start_daemon, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    path = models / "m.safetensors"
    _llama_like(path, seed=30)
    d = start_daemon("reshaped", config=_config(tmp_path, [models]))
    out = tensord("load", str(path), "--name", "tp/r", "--tp", "2", "--quiet", socket=d.socket)
    assert out.returncode == 0, out.stderr
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 3, dtype=torch.bfloat16)  # other shape
    save_file(tensors, path)
    d.kill()
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["lost"] == 2 and restore["restored"] == 0, restore
        assert all("no tp=2 shard" in x["reason"] for x in restore["lost_versions"]), restore


def test_without_allowed_roots_a_checkpoint_is_not_read_again(start_daemon, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "m.safetensors", seed=5)
    d = start_daemon("closed", config=f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    with d.client() as c:
        assert load_checkpoint(c, models / "m.safetensors", "m")[0] == 1  # client-side: no root needed
    d.kill()
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["lost"] == 1 and "allowed_roots" in restore["lost_versions"][0]["reason"]


def test_a_damaged_record_is_skipped_naming_it(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("damaged", config=f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    with d.client() as c:
        c.put("x", {"a": torch.ones(2)})
    d.kill()
    (record,) = (tmp_path / "state" / "held").glob("*.rec")
    record.write_bytes(b"\x93not a record")
    d.start(timeout=20)  # serves what it can; that version is not restored, its number not reused
    assert f"skipped: state file {record}" in d.log.read_text()
    with d.client() as c:
        assert c.ls() == [] and c.put("x", {"a": torch.ones(2)}) == 2


def test_a_record_that_cannot_be_written_fails_the_commit_cleanly(start_daemon, tmp_path: Path) -> None:
    from tensord.state import Catalogue

    d = start_daemon("unrecorded", config=f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    with d.client() as c:
        assert c.put("r", {"x": torch.ones(1)}) == 1
        blocker = tmp_path / "state" / "held" / Catalogue.filename("r", 2)
        blocker.mkdir()  # the rename onto it fails
        used = c.status()["devices"]["cpu"]["used"]
        with pytest.raises(sdk.Unavailable, match="cannot record r v2"):
            c.put("r", {"x": torch.ones(1)})
        assert c.info("r")["versions"] == [1] and c.status()["devices"]["cpu"]["used"] == used
        blocker.rmdir()
        assert c.put("r", {"x": torch.ones(1)}) == 3  # v2 was handed out, never visible: not reused
    d.kill()
    d.start()
    with d.client() as c:
        assert c.info("r")["versions"] == [1, 3]
