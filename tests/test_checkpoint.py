"""Checkpoint headers: agreement with safetensors on real and generated files, and every bad file."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tensord.checkpoint import (
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    TENSORD_TO_SAFETENSORS,
    FileTensor,
    read_checkpoint,
    read_header,
    read_header_and_metadata,
)
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.manifest import DTYPE_SIZES
from tests.daemons import WEIGHTS, needs_minilm
from tests.data import random_tensor


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def file_bytes(t: FileTensor) -> bytes:
    with open(t.path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


MANY = {
    "b": (torch.bool, (3, 5)),
    "u8": (torch.uint8, (7,)),
    "i8": (torch.int8, (2, 3)),
    "i16": (torch.int16, (4, 1)),
    "u16": (torch.uint16, (3,)),
    "i32": (torch.int32, (2, 2, 2)),
    "u32": (torch.uint32, (5,)),
    "i64": (torch.int64, (3, 1)),
    "u64": (torch.uint64, (2,)),
    "f16": (torch.float16, (4, 4)),
    "bf16": (torch.bfloat16, (8, 3)),
    "f32": (torch.float32, (6, 2)),
    "f64": (torch.float64, (3,)),
    "c64": (torch.complex64, (2, 2)),
    "f8e4m3": (torch.float8_e4m3fn, (16,)),
    "f8e5m2": (torch.float8_e5m2, (4, 4)),
    "f8e4m3fnuz": (torch.float8_e4m3fnuz, (5,)),
    "f8e5m2fnuz": (torch.float8_e5m2fnuz, (5,)),
    "f8e8m0": (torch.float8_e8m0fnu, (9,)),
    "scalar": (torch.float32, ()),
    "scalar_bf16": (torch.bfloat16, ()),
    "empty": (torch.float32, (0, 3)),
    "empty_bf16": (torch.bfloat16, (4, 0, 2)),
}


@pytest.fixture
def many(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {name: random_tensor(dt, shape, seed=i) for i, (name, (dt, shape)) in enumerate(MANY.items())}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "generated"})
    return path, tensors


def check_against_safetensors(path: Path, got: list[FileTensor]) -> None:
    loaded = load_file(str(path))
    assert sorted(t.name for t in got) == sorted(loaded)
    with safe_open(str(path), framework="pt") as f:
        for t in got:
            sl = f.get_slice(t.name)
            assert SAFETENSORS_DTYPES[sl.get_dtype()] == t.dtype
            assert list(t.shape) == sl.get_shape()
            assert t.path == str(path)
            assert t.nbytes == t.numel * DTYPE_SIZES[t.dtype]
            assert file_bytes(t) == tensor_bytes(loaded[t.name]), t.name


def test_dtype_table_is_complete_and_consistent() -> None:
    assert set(SAFETENSORS_DTYPES.values()) <= set(DTYPE_SIZES)
    assert {v: k for k, v in TENSORD_TO_SAFETENSORS.items()} == SAFETENSORS_DTYPES
    # Every tensord dtype that torch can save has a code; only complex32/128 have none.
    assert set(DTYPE_SIZES) - set(TENSORD_TO_SAFETENSORS) == {"complex32", "complex128"}


@needs_minilm
def test_minilm_header_matches_safetensors() -> None:
    path = WEIGHTS
    got = read_header(path)
    assert len(got) > 50
    check_against_safetensors(path, got)
    offsets = [t.offset for t in got]
    assert offsets == sorted(offsets)
    assert got[-1].offset + got[-1].nbytes == path.stat().st_size


@needs_minilm
def test_minilm_read_checkpoint_file_and_directory(tmp_path: Path) -> None:
    path = WEIGHTS
    assert read_checkpoint(path) == read_header(path)
    # The package's model directory holds exactly one .safetensors file.
    assert read_checkpoint(path.parent) == read_header(path)


def test_many_dtypes(many: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = many
    got, metadata = read_header_and_metadata(path)
    assert metadata == {"format": "pt", "note": "generated"}
    assert {t.name for t in got} == set(tensors)
    check_against_safetensors(path, got)
    by_name = {t.name: t for t in got}
    assert (by_name["scalar"].shape, by_name["scalar"].nbytes) == ((), 4)
    assert (by_name["empty"].shape, by_name["empty"].nbytes) == ((0, 3), 0)
    assert by_name["f8e8m0"].dtype == "float8_e8m0fnu"
    assert by_name["bf16"].spec().nbytes == 8 * 3 * 2


def test_empty_file_has_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    save_file({}, str(path))
    assert read_header(path) == []


def write_sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]], index: object = None) -> None:
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    if index is None:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index))


SHARDS = {
    "model-00001-of-00003.safetensors": {"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(4)},
    "model-00002-of-00003.safetensors": {"c.weight": torch.arange(6, dtype=torch.int64)},
    "model-00003-of-00003.safetensors": {
        "d.weight": torch.ones(1, dtype=torch.bfloat16),
        "e": torch.tensor(2.0),
    },
}


def test_indexed_directory(tmp_path: Path) -> None:
    write_sharded(tmp_path, SHARDS)
    (tmp_path / "unrelated.safetensors").write_bytes(b"not read: the index decides")
    got = read_checkpoint(tmp_path)
    expected = [t for shard in sorted(SHARDS) for t in read_header(tmp_path / shard)]
    assert got == expected
    # File-name order, then offset (safetensors puts wider dtypes first: "e" before "d.weight").
    assert [t.name for t in got] == ["a.weight", "b.bias", "c.weight", "e", "d.weight"]
    assert read_checkpoint(tmp_path) == got  # stable
    for t in got:
        loaded = load_file(t.path)
        assert file_bytes(t) == tensor_bytes(loaded[t.name])


def test_directory_without_index_reads_every_file(tmp_path: Path) -> None:
    for shard, tensors in SHARDS.items():
        save_file(tensors, str(tmp_path / shard))
    got = read_checkpoint(tmp_path)
    assert sorted(t.name for t in got) == sorted(n for ts in SHARDS.values() for n in ts)
    assert [Path(t.path).name for t in got] == sorted(Path(t.path).name for t in got)


def test_directory_without_index_duplicate_names(tmp_path: Path) -> None:
    save_file({"x": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(InvalidArgument, match=r"'x'.*also used in .*a\.safetensors"):
        read_checkpoint(tmp_path)


def test_symlinked_shards_inside_root(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot: shards link to ../../blobs; allowed with root= the repo."""
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(blobs / "1234"))
    (snap / "model.safetensors").symlink_to("../../blobs/1234")
    with pytest.raises(InvalidArgument, match="outside"):
        read_checkpoint(snap)
    got = read_checkpoint(snap, root=repo)
    assert [t.name for t in got] == ["w"]


# ---------------------------------------------------------------------------------------------
# Hand-made bad files.


def raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file byte by byte: 8-byte length, header (JSON unless bytes), data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def test_hand_made_good_file(tmp_path: Path) -> None:
    header = {"b": entry(offsets=(8, 16)), "a": entry()}
    path = raw_file(tmp_path / "ok.safetensors", header, bytes(range(16)))
    start = 8 + len(json.dumps(header))
    got = read_header(path)
    assert [(t.name, t.offset, t.nbytes) for t in got] == [("a", start, 8), ("b", start + 8, 8)]
    assert file_bytes(got[1]) == bytes(range(8, 16))


BAD_HEADERS = {
    "unknown_dtype": ({"t": entry(dtype="F7")}, 8, "unknown dtype 'F7'"),
    "sub_byte_dtype": ({"t": entry(dtype="F4")}, 8, "sub-byte"),
    "lowercase_dtype": ({"t": entry(dtype="f32")}, 8, "unknown dtype"),
    "dtype_not_str": ({"t": entry(dtype=3)}, 8, "unknown dtype"),
    "dtype_list": ({"t": entry(dtype=["F32"])}, 8, "unknown dtype"),
    "shape_bytes_disagree": ({"t": entry(shape=(3,))}, 12, "needs 12"),
    "shape_bytes_disagree_bigger": ({"t": entry(shape=(2,), offsets=(0, 12))}, 12, "needs 8"),
    "negative_shape": ({"t": entry(shape=[-2])}, 8, "non-negative"),
    "float_shape": ({"t": entry(shape=[2.0])}, 8, "non-negative ints"),
    "bool_shape": ({"t": entry(shape=[True, True])}, 8, "non-negative ints"),
    "shape_not_list": ({"t": entry(shape="2")}, 8, "shape"),
    "too_many_dims": ({"t": entry(shape=[1] * 17, offsets=(0, 4))}, 8, "at most 16"),
    "bad_shape_among_good": (
        {"a": entry(), "t": entry(shape=[2, -1], offsets=(8, 16)), "z": entry(offsets=(16, 24))},
        24,
        "non-negative",
    ),
    "bad_size_among_good": ({"a": entry(), "t": entry(shape=(3,), offsets=(8, 16))}, 16, "needs 12"),
    "offsets_past_end": ({"t": entry(offsets=(8, 16))}, 8, "past the data area"),
    "offsets_reversed": ({"t": entry(offsets=(8, 0))}, 8, "begin <= end"),
    "offsets_negative": ({"t": entry(offsets=(-8, 0))}, 8, "begin <= end"),
    "offsets_three": ({"t": entry(offsets=[0, 4, 8])}, 8, r"\[begin, end\]"),
    "offsets_float": ({"t": entry(offsets=[0, 8.0])}, 8, r"\[begin, end\]"),
    "offsets_string": ({"t": entry(offsets="0-8")}, 8, r"\[begin, end\]"),
    "overlap": ({"t": entry(offsets=(0, 8)), "u": entry(offsets=(4, 12))}, 12, "overlap tensor 't'"),
    "overlap_same": ({"t": entry(offsets=(0, 8)), "u": entry(offsets=(0, 8))}, 8, "overlap"),
    "missing_key": ({"t": {"dtype": "F32", "shape": [2]}}, 8, "lacks data_offsets"),
    "entry_not_object": ({"t": [1, 2]}, 8, "must be an object"),
    "empty_name": ({"": entry()}, 8, "non-empty"),
    "header_is_list": ([entry()], 8, "JSON object"),
    "metadata_not_str": ({"__metadata__": {"a": 1}, "t": entry()}, 8, "__metadata__"),
    "metadata_not_map": ({"__metadata__": "x", "t": entry()}, 8, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header(tmp_path: Path, case: str) -> None:
    header, data_len, message = BAD_HEADERS[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, bytes(data_len))
    with pytest.raises(InvalidArgument, match=message) as info:
        read_header(path)
    text = str(info.value)
    assert str(path) in text
    assert "\n" not in text
    if isinstance(header, dict) and "t" in header and "overlap" not in case and "metadata" not in case:
        assert "tensor 't'" in text
    assert info.value.details["path"] == str(path)


def test_overlap_names_both_tensors(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "o.safetensors",
        {"first": entry(offsets=(0, 8)), "second": entry(offsets=(4, 12))},
        bytes(12),
    )
    with pytest.raises(InvalidArgument, match=r"tensor 'second'.*overlap tensor 'first'"):
        read_header(path)


def test_empty_tensor_may_sit_anywhere_in_range(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "e.safetensors", {"t": entry(), "z": entry(shape=(0,), offsets=(4, 4))}, bytes(8))
    assert [t.name for t in read_header(path)] == ["t", "z"]


def test_truncated_file(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.ones(10)}, str(good))
    blob = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-1])
    with pytest.raises(InvalidArgument, match="truncated") as info:
        read_header(cut)
    assert "tensor 'b'" in str(info.value) or "tensor 'a'" in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_shorter_than_length_prefix(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x02" * size)
    with pytest.raises(InvalidArgument, match="truncated"):
        read_header(path)


def test_header_length_past_end(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "h.safetensors", {"t": entry()}, bytes(8), length=10_000)
    with pytest.raises(InvalidArgument, match="header length 10000 runs past the end"):
        read_header(path)


def test_header_length_huge(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "h.safetensors", {"t": entry()}, bytes(8), length=2**63)
    with pytest.raises(InvalidArgument, match="exceeds the limit"):
        read_header(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"not json at all!", "not valid JSON"),
        (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "not valid JSON"),
        (
            b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            b' "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            "appears twice",
        ),
        (b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
)
def test_bad_json(tmp_path: Path, header: bytes, message: str) -> None:
    path = raw_file(tmp_path / "j.safetensors", header, bytes(8))
    with pytest.raises(InvalidArgument, match=message):
        read_header(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(NotFound):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="directory"):
        read_header(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_header(fifo)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"no \.safetensors files"):
        read_checkpoint(tmp_path)


def test_index_missing_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(NotFound, match=r"shard 's2\.safetensors'.*'b'"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "..", "sub/s.safetensors", "/etc/passwd", "", ".", 3, None]
)
def test_index_bad_shard_name(tmp_path: Path, shard: object) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "sub").mkdir()
    save_file({"a": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    save_file({"a": torch.ones(1)}, str(ckpt / "sub" / "s.safetensors"))
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(InvalidArgument, match="plain file name"):
        read_checkpoint(ckpt)


def test_index_symlink_escape(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    os.symlink(tmp_path / "outside.safetensors", ckpt / "s.safetensors")
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s.safetensors"}}))
    with pytest.raises(InvalidArgument, match="outside"):
        read_checkpoint(ckpt)
    assert [t.name for t in read_checkpoint(ckpt, root=tmp_path)] == ["a"]


def test_index_tensor_missing_from_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}}))
    with pytest.raises(InvalidArgument, match=r"'ghost'.*not found in its shard s1\.safetensors"):
        read_checkpoint(tmp_path)


def test_shard_tensor_missing_from_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1), "extra": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(InvalidArgument, match=r"'extra'.*does not list it"):
        read_checkpoint(tmp_path)


def test_index_maps_tensor_to_wrong_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path, SHARDS)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["e"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="'e'"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "index",
    [
        b"{not json",
        b"[]",
        b'{"weight_map": []}',
        b'{"metadata": {}}',
        b'{"weight_map": {"a": "s.safetensors"}, "weight_map": {}}',
    ],
)
def test_bad_index(tmp_path: Path, index: bytes) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s.safetensors"))
    (tmp_path / INDEX_NAME).write_bytes(index)
    with pytest.raises(InvalidArgument, match=INDEX_NAME.replace(".", r"\.")):
        read_checkpoint(tmp_path)


def test_bad_shard_reported_with_its_path(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    raw_file(tmp_path / "s2.safetensors", {"b": entry(dtype="F7")}, bytes(8))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(InvalidArgument, match=r"s2\.safetensors: tensor 'b': unknown dtype"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [0, 637, 999])
def test_a_bad_entry_among_many_is_named(tmp_path: Path, bad: int) -> None:
    header = {f"t{i:04d}": entry(offsets=(8 * i, 8 * i + 8)) for i in range(1000)}
    header[f"t{bad:04d}"] = entry(shape=[1, -2], offsets=(8 * bad, 8 * bad + 8))
    path = raw_file(tmp_path / "many.safetensors", header, bytes(8000))
    with pytest.raises(InvalidArgument, match=rf"tensor 't{bad:04d}': invalid entry: .*non-negative"):
        read_header(path)
