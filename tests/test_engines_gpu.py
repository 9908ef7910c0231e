"""The engine integrations through GPU slabs (run on a GPU host with `pytest -m gpu`).

vLLM is too large to carry to the GPU host, so these drive what the vLLM loader and transfer
backend delegate to (`load_set`, `WeightUpdater`, `publish_params`; sdk/engines/common.py) and,
where vLLM is installed, the vLLM classes themselves, against engine-style torch modules on the
GPU with sets held in GPU memory.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sdk
from sdk.engines import Derivation, EngineOptions, WeightUpdater, load_set, publish_params, rank_set
from tests.engine_models import BufferingModel, EngineModel, LoaderStyleModel, checkpoint

pytestmark = pytest.mark.gpu
DEV = "cuda:0" if torch.cuda.is_available() else "cpu"  # cpu: to try the file without a GPU


def test_whole_gpu_set_loads_through_load_weights_from_views(daemon, client) -> None:
    ckpt = checkpoint(seed=1, device=DEV)
    client.put("gpu-eng/whole", ckpt)
    assert client.info("gpu-eng/whole")["device"] == DEV
    model = EngineModel(tp=2, rank=1, device=DEV)
    found = load_set(model, EngineOptions(name="gpu-eng/whole", socket=daemon.socket), rank=1, device=DEV)
    assert found.kind == "whole" and model.equals(ckpt)
    assert model.qkv.device == torch.device(DEV)


def test_gpu_rank_set_is_published_and_copied_straight_in(daemon, client) -> None:
    ckpt = checkpoint(seed=2, device=DEV)
    first = EngineModel(tp=2, rank=0, device=DEV)
    first.load_weights(ckpt.items())
    assert (
        publish_params(first, "gpu-eng/ranked", rank=0, client=client, derived_from=Derivation("gpu-eng/ranked", 1))
        == 1
    )
    assert client.info(rank_set("gpu-eng/ranked", 0))["device"] == DEV
    model = BufferingModel(tp=2, rank=0, device=DEV)
    found = load_set(model, EngineOptions(name="gpu-eng/ranked", socket=daemon.socket), rank=0, device=DEV)
    assert found.kind == "rank" and model.buffered == [] and model.equals(ckpt)


def test_rl_update_from_gpu_sets_into_gpu_parameters(client) -> None:
    """Views of GPU slabs stay open until finish: a model that copies only then (vLLM's
    layer-wise reload) gets the right bytes; the next version replaces them."""
    v1, v2 = checkpoint(seed=3, device=DEV), checkpoint(seed=4, device=DEV)
    client.put("gpu-eng/policy", v1)
    model = BufferingModel(device=DEV)
    updater = WeightUpdater(model, client, device=DEV, name="gpu-eng/policy", on_finish=model.flush)
    updater.start()
    assert updater.update() == 1
    assert all(t.device == torch.device(DEV) for _, t in model.buffered)
    assert updater.finish() == ("gpu-eng/policy", 1) and model.equals(v1)
    client.put("gpu-eng/policy", v2)
    updater.start()
    updater.update()
    updater.finish()
    assert model.equals(v2)


def test_update_from_a_host_set_into_gpu_parameters(client) -> None:
    ckpt = checkpoint(seed=5)
    client.put("gpu-eng/host", ckpt)
    model = EngineModel(device=DEV)
    updater = WeightUpdater(model, client, device=DEV, name="gpu-eng/host")
    updater.start()
    updater.update()
    updater.finish()
    assert model.equals(ckpt)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_vllm_transfer_backend_against_a_torch_module(daemon, client) -> None:
    """The backend class itself, where vLLM is installed on the GPU host: vLLM's layer-wise
    reload around the module's own load_weights, from a GPU set into GPU parameters."""
    from types import SimpleNamespace

    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    from sdk.engines.vllm import TensordWeightTransferEngine

    v1, v2 = checkpoint(seed=6, device=DEV), checkpoint(seed=7, device=DEV)
    client.put("gpu-eng/vllm", v1)
    model = LoaderStyleModel(device=DEV)
    record_metadata_for_reloading(model)  # as vLLM does when it loads a model
    config = SimpleNamespace(parallel_config=None, model_config=None)
    engine = TensordWeightTransferEngine(None, config, torch.device(DEV), model)
    engine.init_transfer_engine(engine.parse_init_info({"name": "gpu-eng/vllm", "socket": daemon.socket}))
    for version, expected in ((1, v1), (2, v2)):
        if version == 2:
            client.put("gpu-eng/vllm", v2)
        engine.start_weight_update()
        engine.update_weights({"version": version})
        engine.finish_weight_update()
        assert model.equals(expected), version
    engine.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_vllm_loader_class_against_a_torch_module(daemon, client, monkeypatch) -> None:
    """The loader class itself (its rank is patched in: no vLLM distributed setup here): a GPU
    whole set through load_weights, then the rank set it publishes with "params"."""
    from types import SimpleNamespace

    from vllm.config.load import LoadConfig

    import sdk.engines.vllm as tv

    monkeypatch.setattr(tv, "_ranks", lambda: (0, 0, 1))
    ckpt = checkpoint(seed=8, device=DEV)
    client.put("gpu-eng/loader", ckpt)
    options = {"name": "gpu-eng/loader", "socket": daemon.socket, "strict": True, "publish": "params"}
    loader = tv.TensordModelLoader(LoadConfig(load_format="tensord", model_loader_extra_config=options))
    model_config = SimpleNamespace(quantization=None, model="/nonexistent")
    model = EngineModel(device=DEV)
    loader.load_weights(model, model_config)
    assert loader.source == ("tensord", "gpu-eng/loader", 1) and model.equals(ckpt)
    assert client.info("gpu-eng/loader/tp0")["device"] == DEV  # published from the GPU parameters
    second = BufferingModel(device=DEV)
    loader.load_weights(second, model_config)
    assert loader.source == ("tensord", "gpu-eng/loader/tp0", 1) and second.buffered == [] and second.equals(ckpt)
    missing = tv.TensordModelLoader(
        LoadConfig(load_format="tensord", model_loader_extra_config={**options, "name": "gpu-eng/absent"})
    )
    with pytest.raises(sdk.NotFound, match="neither gpu-eng/absent/tp0 nor gpu-eng/absent"):
        missing.load_weights(EngineModel(device=DEV), model_config)
