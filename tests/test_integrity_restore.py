"""A checkpoint file changed after its version was recorded is never restored as that version
(after a restart or an eviction), even where the change keeps every 256-byte block's word sum:
rows swapped, compensating sign flips, swapped bf16 groups. Versions recorded under the old
fingerprint definition keep verifying under it. One node, real daemons, a state directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tensord.state import Catalogue
from tensord_contract.errors import NotFound
from tensord_dataplane.fingerprint import fingerprint
from tests.data import same_bits
from tests.test_restore import wait_restored

MIB = 1 << 20


def _config(tmp_path: Path, extra: str = "") -> str:
    return f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[ingest]\nallowed_roots = ["{tmp_path / "models"}"]\n{extra}'


def _swap_rows(t: dict[str, torch.Tensor]) -> None:
    t["w"][[0, 1]] = t["w"][[1, 0]].clone()


def _flip_signs(t: dict[str, torch.Tensor]) -> None:
    t["w"][[1, 3]] = -t["w"][[1, 3]]


def _swap_groups(t: dict[str, torch.Tensor]) -> None:
    w = t["w"]
    w[0:4], w[4:8] = w[4:8].clone(), w[0:4].clone()


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], torch.dtype, tuple[int, ...]]] = {
    "rows": (_swap_rows, torch.float32, (64, 2)),
    "signs": (_flip_signs, torch.float32, (64,)),
    "groups": (_swap_groups, torch.bfloat16, (64,)),
}


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    paths = {}
    for i, (kind, (_, dtype, shape)) in enumerate(CORRUPTIONS.items()):
        g = torch.Generator().manual_seed(i)
        tensors = {"w": torch.randn(shape, generator=g).to(dtype), "other": torch.randn(1000, generator=g)}
        paths[kind] = models / f"{kind}.safetensors"
        save_file(tensors, paths[kind])
    return paths


def _corrupt(path: Path, kind: str) -> None:
    """Change the file in place: same names, dtypes and shapes; the old definition's
    fingerprint of every tensor unchanged."""
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    before = fingerprint(tensors["w"], version=2)
    CORRUPTIONS[kind][0](tensors)
    assert fingerprint(tensors["w"], version=2) == before  # what definition 2 let through
    save_file(tensors, path)


def test_a_changed_checkpoint_is_not_restored_after_a_restart(start_daemon, tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    d = start_daemon("changed", config=_config(tmp_path))
    with d.client() as c:
        for kind, path in paths.items():
            assert c.load_checkpoint(str(path), f"ck/{kind}") == 1
            assert same_bits(c.get(f"ck/{kind}", verify=True)["w"], load_file(path)["w"])
    for kind, path in paths.items():
        _corrupt(path, kind)
    d.kill()
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["lost"] == 3 and restore["restored"] == 0, restore
        for kind in paths:
            with pytest.raises(NotFound, match="changed since it was loaded"):
                c.get(f"ck/{kind}", verify=True)


def test_a_changed_checkpoint_is_not_read_again_after_an_eviction(start_daemon, tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    extra = '[memory]\nbudgets = { cpu = "1MiB" }\neviction = "lru"\nhuge_pages = false\n'
    d = start_daemon("evicting", config=_config(tmp_path, extra))
    with d.client() as c:
        assert c.load_checkpoint(str(paths["rows"]), "ev/rows") == 1
        _corrupt(paths["rows"], "rows")
        filler = tmp_path / "models" / "filler.safetensors"
        save_file({"x": torch.zeros(MIB // 4)}, filler)
        assert c.load_checkpoint(str(filler), "ev/filler") == 1  # the whole budget: ev/rows goes
        assert c.info("ev/rows")["evicted"]
        with pytest.raises(NotFound, match="changed since it was loaded"):  # read again: refused
            c.get("ev/rows", verify=True)
        assert torch.equal(c.get("ev/filler", verify=True)["x"], torch.zeros(MIB // 4))


def test_a_version_recorded_under_the_old_definition_keeps_verifying(start_daemon, tmp_path: Path) -> None:
    """A state directory written by a daemon of definition 2: restored and read with verify."""
    paths = _checkpoints(tmp_path)
    d = start_daemon("old", config=_config(tmp_path))
    with d.client() as c:
        assert c.load_checkpoint(str(paths["groups"]), "old/set") == 1
    assert d.stop() == 0
    record = tmp_path / "state" / "held" / Catalogue.filename("old/set", 1)
    data = msgpack.unpackb(record.read_bytes(), raw=False)
    manifest = data["manifest"]
    assert manifest["fp"] == 3
    on_file = load_file(paths["groups"])
    table = msgpack.unpackb((record.parent / "tables" / f"{manifest['table']}.tbl").read_bytes(), raw=False)
    names = [n.decode() for n in table["names"].split(b"\0")]  # the table lies apart (held_tables)
    old = np.array([fingerprint(on_file[k], version=2) for k in names], dtype=np.uint64)
    manifest["fp"], manifest["fingerprints"] = 2, old.astype("<u8").tobytes()
    record.write_bytes(msgpack.packb(data, use_bin_type=True))
    d.start()
    with d.client() as c:
        restore = wait_restored(c)
        assert restore["restored"] == 1 and restore["lost"] == 0, restore
        got = c.get("old/set", verify=True)
        assert all(same_bits(got[k], on_file[k]) for k in on_file)
        assert c.info("old/set")["lost"] is None
