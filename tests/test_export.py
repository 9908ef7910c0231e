"""Streaming safetensors export: bit-exact round trips, atomic replacement, bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tensord.checkpoint import read_checkpoint, read_header, read_header_and_metadata
from tensord.export import write_safetensors
from tensord_contract.errors import InvalidArgument, NotFound, Unauthorized
from tensord_contract.manifest import TensorSpec
from tests.daemons import WEIGHTS, needs_minilm
from tests.data import random_tensor


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert raw(loaded[name]) == raw(t), name


# Mixed widths in an order that leaves wide tensors at odd offsets.
MANY = {
    "b": (torch.bool, (3, 5)),
    "f64": (torch.float64, (3,)),
    "u8": (torch.uint8, (7,)),
    "bf16": (torch.bfloat16, (8, 3)),
    "i8": (torch.int8, (2, 3)),
    "f32": (torch.float32, (6, 2)),
    "f8e4m3": (torch.float8_e4m3fn, (16,)),
    "f8e5m2": (torch.float8_e5m2, (4, 4)),
    "f8e8m0": (torch.float8_e8m0fnu, (9,)),
    "f8e4m3fnuz": (torch.float8_e4m3fnuz, (5,)),
    "i16": (torch.int16, (4, 1)),
    "u16": (torch.uint16, (3,)),
    "i32": (torch.int32, (2, 2, 2)),
    "u32": (torch.uint32, (5,)),
    "i64": (torch.int64, (3, 1)),
    "u64": (torch.uint64, (2,)),
    "f16": (torch.float16, (4, 4)),
    "c64": (torch.complex64, (2, 2)),
    "scalar": (torch.float32, ()),
    "scalar_i64": (torch.int64, ()),
    "empty": (torch.float32, (0, 3)),
    "empty_bf16": (torch.bfloat16, (4, 0, 2)),
}


@pytest.fixture
def many() -> dict[str, torch.Tensor]:
    return {name: random_tensor(dt, shape, seed=i) for i, (name, (dt, shape)) in enumerate(MANY.items())}


def test_round_trip_many_dtypes(tmp_path: Path, many: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "out.safetensors"
    written = write_safetensors(path, list(many.items()), metadata={"format": "pt"})
    assert [t.name for t in written] == list(many)  # data in the order given
    assert_same(load_file(str(path)), many)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    got, metadata = read_header_and_metadata(path)
    assert got == written
    assert metadata == {"format": "pt"}
    assert len(path.read_bytes()) == got[-1].offset + got[-1].nbytes


def test_four_tuples_with_bytes_and_tensors(tmp_path: Path, many: dict[str, torch.Tensor]) -> None:
    items = []
    for i, (name, t) in enumerate(many.items()):
        dtype = str(t.dtype).removeprefix("torch.")
        data: object = t if i % 3 == 0 else (raw(t) if i % 3 == 1 else bytearray(raw(t)))
        items.append((name, dtype, list(t.shape) if i % 2 else tuple(t.shape), data))
    path = tmp_path / "out.safetensors"
    write_safetensors(path, items)
    assert_same(load_file(str(path)), many)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() is None


def test_numpy_buffer(tmp_path: Path) -> None:
    import numpy as np

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "np.safetensors"
    write_safetensors(path, [("a", "float32", (3, 4), arr)])
    assert torch.equal(load_file(str(path))["a"], torch.from_numpy(arr))


def test_streaming_callable_walked_twice(tmp_path: Path, many: dict[str, torch.Tensor]) -> None:
    calls, live = [], []

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        calls.append(1)
        for name, t in many.items():
            copy = t.clone()  # a fresh tensor per step, as a GPU-to-host copy would be
            live.append(name)
            yield name, copy

    path = tmp_path / "stream.safetensors"
    write_safetensors(path, source)
    assert len(calls) == 2  # once for the header, once for the data
    assert_same(load_file(str(path)), many)
    specs = [TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in many.items()]
    calls.clear()
    write_safetensors(path, source, specs=specs)
    assert len(calls) == 1
    assert_same(load_file(str(path)), many)


def test_one_shot_iterator(tmp_path: Path, many: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "gen.safetensors"
    write_safetensors(path, ((n, t) for n, t in many.items()))
    assert_same(load_file(str(path)), many)


def test_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "t": base.t(),
        "strided": base[:, ::2],
        "grad": torch.ones(3, requires_grad=True),
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
    }
    path = tmp_path / "nc.safetensors"
    write_safetensors(path, lambda: iter(tensors.items()))
    loaded = load_file(str(path))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.detach().resolve_conj()), name


@needs_minilm
def test_minilm_reexport_is_bit_exact(tmp_path: Path) -> None:
    src = WEIGHTS
    original = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        names = list(f.keys())
        metadata = f.metadata()

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(src), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)

    out = tmp_path / "minilm.safetensors"
    written = write_safetensors(out, source, metadata=metadata)
    assert_same(load_file(str(out)), original)
    assert read_checkpoint(out) == sorted(written, key=lambda t: t.offset)
    assert sum(t.nbytes for t in written) == sum(t.nbytes for t in read_header(src))


@pytest.mark.parametrize("name", ["a" * n for n in range(1, 10)])
def test_header_padded_to_eight_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / "p.safetensors"
    (t,) = write_safetensors(path, [(name, torch.ones(1, dtype=torch.float64))])
    assert t.offset % 8 == 0
    assert path.read_bytes()[8 : t.offset].rstrip(b" ").endswith(b"}")
    assert load_file(str(path))[name].item() == 1.0


def test_empty_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    assert write_safetensors(path, []) == []
    assert load_file(str(path)) == {}


def test_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"old": torch.ones(2)}, str(path))
    write_safetensors(path, [("new", torch.zeros(3))])
    assert list(load_file(str(path))) == ["new"]
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o644


def failing_source(case: str):
    """A callable source that breaks on its second walk, after the header is written."""
    walks = {"n": 0}

    def source():
        walks["n"] += 1
        second = walks["n"] == 2
        yield "a", torch.ones(2)
        if case == "raises" and second:
            raise RuntimeError("producer failed")
        if case == "changes":
            yield "b", torch.ones(3 if second else 2)
        if case == "shorter" and not second:
            yield "b", torch.ones(2)
        if case == "longer" and second:
            yield "b", torch.ones(2)

    return source


@pytest.mark.parametrize("case", ["raises", "changes", "shorter", "longer"])
def test_failure_mid_stream_leaves_target_alone(tmp_path: Path, case: str) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"old": torch.ones(2)}, str(path))
    before = path.read_bytes()
    expected = RuntimeError if case == "raises" else InvalidArgument
    with pytest.raises(expected):
        write_safetensors(path, failing_source(case))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_specs_disagree_with_data(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    specs = [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (2,))]
    with pytest.raises(InvalidArgument, match=r"'b'.*planned 'a'"):
        write_safetensors(path, [("b", torch.ones(2)), ("a", torch.ones(2))], specs=specs)
    with pytest.raises(InvalidArgument, match="yielded more than 1"):
        write_safetensors(path, [("a", torch.ones(2)), ("b", torch.ones(2))], specs=specs[:1])
    with pytest.raises(InvalidArgument, match="yielded 1 tensors, expected 2"):
        write_safetensors(path, [("a", torch.ones(2))], specs=specs)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a", torch.ones(1)), ("a", torch.ones(1))], "appears twice"),
        ([("__metadata__", torch.ones(1))], "reserved"),
        ([("", torch.ones(1))], "non-empty"),
        ([("a", torch.ones(1, dtype=torch.complex128))], "complex128 has no safetensors code"),
        ([("a", "float32", (2,), b"\0" * 7)], "7 bytes of data"),
        ([("a", "float32", (2,), torch.ones(3))], "declared float32"),
        ([("a", "float33", (2,), b"\0" * 8)], "unknown dtype"),
        ([("a", "float32", (-2,), b"")], "non-negative"),
        ([("a", "float32", (2,), memoryview(bytes(16))[::2])], "C-contiguous"),
        ([("a", "float32", (2,), 12345)], "bytes-like"),
        ([("a",)], "each tensor must be"),
        ([("a", [1.0, 2.0])], "each tensor must be"),
        ([("a", torch.ones(2, device="meta"))], "dense"),
        ([("a", torch.ones(2).to_sparse())], "dense"),
        ([("\ud800", torch.ones(1))], "UTF-8"),
    ],
)
def test_bad_input(tmp_path: Path, items: list[object], message: str) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(InvalidArgument, match=message):
        write_safetensors(path, items)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata", [{"a": 1}, {1: "a"}, ["format"], "pt"])
def test_bad_metadata(tmp_path: Path, metadata: object) -> None:
    with pytest.raises(InvalidArgument, match="metadata"):
        write_safetensors(tmp_path / "m.safetensors", [("a", torch.ones(1))], metadata=metadata)  # type: ignore[arg-type]


def test_bad_target(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        write_safetensors(tmp_path / "no" / "such.safetensors", [("a", torch.ones(1))])
    with pytest.raises(InvalidArgument, match="directory"):
        write_safetensors(tmp_path, [("a", torch.ones(1))])
    # a directory that takes no new files: a clear error (root too), not an OSError from inside
    with pytest.raises(InvalidArgument, match=r"/proc/x\.safetensors: cannot write"):
        write_safetensors("/proc/x.safetensors", [("a", torch.ones(1))])
    def failing_source():  # type: ignore[no-untyped-def]
        yield ("a", torch.ones(1))
        raise ConnectionError("the daemon went away")

    spec = [TensorSpec("a", "float32", (1,)), TensorSpec("b", "float32", (1,))]
    with pytest.raises(ConnectionError, match="went away"):  # the source's error, not a write error
        write_safetensors(tmp_path / "partial.safetensors", failing_source(), specs=spec)
    assert not any(tmp_path.glob("*partial*"))
    if os.path.isdir("/sys"):
        with pytest.raises(Unauthorized, match="cannot write: Permission denied"):
            write_safetensors("/sys/x.safetensors", [("a", torch.ones(1))])
