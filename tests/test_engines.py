"""The engine-agnostic core of the integrations (sdk/engines/common.py) and the Transformers
helper, against a real daemon and engine-style torch modules (tests/engine_models.py). The
same paths with a real vLLM: tests/test_vllm.py; through GPU slabs: tests/test_engines_gpu.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sdk
from sdk.engines import Derivation, EngineKey, EngineOptions, WeightUpdater, load_set, publish_params, rank_set
from sdk.engines.common import Capture, read_set
from tests.daemons import MINILM_DIR, child_env, needs_minilm, tensord
from tests.engine_models import BufferingModel, EngineModel, checkpoint


def _options(daemon, name: str, **kw) -> EngineOptions:
    return EngineOptions.from_config({"name": name, "socket": daemon.socket, **kw})


def test_import_sdk_and_sdk_engines_import_no_engine() -> None:
    heavy = "{'vllm', 'sglang', 'transformers'}"
    code = f"import sys, sdk, sdk.engines, sdk.engines.common; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_options_are_validated_by_name() -> None:
    assert EngineOptions.from_config({"name": "m"}) == EngineOptions(name="m")
    assert EngineOptions.from_config({"name": "m"}).publish_mode == "checkpoint"
    assert EngineOptions.from_config({"name": "m", "publish": False}).publish_mode is None
    assert EngineOptions.from_config({"name": "m", "publish": "params"}).publish_mode == "params"
    # Engines that mount publish nothing else by default: their engine set is the one copy.
    assert EngineOptions.from_config({"name": "m", "mount": True}).publish_mode is None
    assert EngineOptions.from_config({"name": "m", "mount": True, "publish": True}).publish_mode == "checkpoint"
    with pytest.raises(sdk.InvalidArgument, match='"mount" must be true or false'):
        EngineOptions.from_config({"name": "m", "mount": "yes"})
    with pytest.raises(sdk.InvalidArgument, match='"name"'):
        EngineOptions.from_config({})
    with pytest.raises(sdk.InvalidArgument, match=r"unknown option\(s\) \['nmae'\]"):
        EngineOptions.from_config({"name": "m", "nmae": "x"})
    with pytest.raises(sdk.InvalidArgument, match='"publish"'):
        EngineOptions.from_config({"name": "m", "publish": "yes"})
    with pytest.raises(sdk.InvalidArgument, match='"strict"'):
        EngineOptions.from_config({"name": "m", "strict": "true"})
    with pytest.raises(sdk.InvalidArgument, match='"version"'):
        EngineOptions.from_config({"name": "m", "version": 1.5})


@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 1)])
def test_whole_set_goes_through_the_models_load_weights(daemon, client, tp, rank) -> None:
    ckpt = checkpoint(seed=1)
    name = f"eng/whole-{tp}-{rank}"
    client.put(name, ckpt)
    model = EngineModel(tp=tp, rank=rank)
    found = load_set(model, _options(daemon, name), rank=rank, device="cpu")
    assert (found.kind, found.name, found.version) == ("whole", name, 1)
    assert model.equals(ckpt)


def test_rank_set_wins_and_is_copied_straight_into_the_parameters(daemon, client) -> None:
    ckpt = checkpoint(seed=2)
    name = "eng/ranked"
    client.put(name, checkpoint(seed=3))  # a whole set that must not be used
    for rank in range(2):  # as a first engine of tp=2 would publish them
        first = EngineModel(tp=2, rank=rank)
        first.load_weights(ckpt.items())
        assert publish_params(first, name, rank=rank, client=client, derived_from=Derivation(name, 1)) == 1
    assert set(client.info(rank_set(name, 1), tensors=True)["tensors"]) == {"qkv", "o", "norm"}
    model = BufferingModel(tp=2, rank=1)  # load_weights must not be called: it would only buffer
    found = load_set(model, _options(daemon, name), rank=1, device="cpu")
    assert (found.kind, found.name) == ("rank", rank_set(name, 1))
    assert model.buffered == [] and model.equals(ckpt)
    # A rank set of another shape (here tp=1) fails clearly instead of loading something wrong.
    with pytest.raises(sdk.InvalidArgument, match="qkv"):
        load_set(EngineModel(tp=1), _options(daemon, name), rank=1, device="cpu")


def test_a_pinned_version_is_loaded_not_the_latest(daemon, client) -> None:
    name = "eng/versions"
    first, second = checkpoint(seed=4), checkpoint(seed=5)
    client.put(name, first)
    client.put(name, second)
    model = EngineModel()
    assert load_set(model, _options(daemon, name, version=1), rank=0, device="cpu").version == 1
    assert model.equals(first)
    assert load_set(model, _options(daemon, name), rank=0, device="cpu").version == 2
    assert model.equals(second)


def test_missing_set_and_missing_daemon_raise_what_the_engine_falls_back_on(daemon, tmp_path) -> None:
    with pytest.raises(sdk.NotFound, match=r"neither eng/absent/tp3 nor eng/absent \(version latest\) is in the store"):
        load_set(EngineModel(), _options(daemon, "eng/absent"), rank=3, device="cpu")
    gone = EngineOptions(name="m", socket=str(tmp_path / "no.sock"))
    with pytest.raises(sdk.Unavailable, match="cannot reach the tensord daemon"):
        load_set(EngineModel(), gone, rank=0, device="cpu")


def test_capture_publishes_exactly_what_passed_through(client) -> None:
    ckpt = checkpoint(seed=6)
    model, capture = EngineModel(), Capture()
    model.load_weights(capture.wrap(ckpt.items()))
    assert model.equals(ckpt)
    assert capture.publish(client, "eng/captured") == 1 and capture.tensors == {}
    got = client.get("eng/captured", verify=True)
    assert set(got) == set(ckpt) and all(torch.equal(got[k], v) for k, v in ckpt.items())


def test_publishing_never_fails_the_engine(tmp_path) -> None:
    with sdk.Client(str(tmp_path / "no.sock")) as gone:
        assert publish_params(EngineModel(), "eng/x", rank=0, client=gone, derived_from=Derivation("eng/x", 1)) is None


def test_zero_copy_publishing_of_host_parameters(client) -> None:
    """Host parameters are published without a copy too (read through the Transfer Engine)."""
    from sdk.engines import unpublish_params

    model = EngineModel()
    for i, p in enumerate(model.parameters()):
        p.data.copy_(torch.arange(p.numel(), dtype=p.dtype).view(p.shape) + i)
    version = publish_params(
        model, "eng/zc", rank=0, client=client, derived_from=Derivation("eng/zc", 1), zero_copy=True
    )
    got = client.get(rank_set("eng/zc", 0), version)
    assert all(torch.equal(got[k], t) for k, t in model.state_dict().items())
    assert unpublish_params(model)


def test_updates_keep_their_views_until_finish(client) -> None:
    """An engine that holds the tensors it is given until post-processing (vLLM's layer-wise
    reload) reads valid data at finish, and sees each version it is sent."""
    name = "eng/policy"
    v1, v2 = checkpoint(seed=7), checkpoint(seed=8)
    client.put(name, v1)
    model = BufferingModel()
    calls: list[str] = []
    updater = WeightUpdater(
        model,
        client,
        device="cpu",
        name=name,
        on_start=lambda: calls.append("start"),
        on_finish=lambda: (calls.append("finish"), model.flush()),
    )
    updater.start()
    assert updater.update() == 1
    assert updater.finish() == (name, 1) and model.equals(v1)
    client.put(name, v2)
    updater.start()
    with pytest.raises(sdk.InvalidArgument, match="already in progress"):
        updater.start()
    assert updater.update(name, "latest") == 2
    assert updater.finish() == (name, 2) and model.equals(v2)
    assert calls == ["start", "finish", "start", "finish"]
    with pytest.raises(sdk.InvalidArgument, match="start"):
        updater.update()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    from tests.etcd_server import start_etcd
    from tests.test_cluster import Cluster, available  # the cluster tests' own setup

    if not available("tcp")[0]:
        pytest.skip(f"Mooncake TE unavailable: {available('tcp')[1]}")
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    cluster = Cluster(tmp_path_factory.mktemp("nodes"), etcd)
    try:
        cluster.start("a")
        cluster.start("b")
        yield cluster
    finally:
        cluster.stop()
        etcd.stop(kill=True)
        etcd.cleanup()


def test_an_engine_loads_and_updates_from_another_node(two_nodes) -> None:
    """The engine's daemon (b) holds nothing: whole sets, rank sets and updates are read from
    node a through it (get / load_into over the Transfer Engine; mount is not possible)."""
    ckpt, step = checkpoint(seed=10), checkpoint(seed=11)
    with two_nodes.client("a") as trainer:
        trainer.put("eng/remote", ckpt)
        first = EngineModel(tp=2, rank=0)
        first.load_weights(ckpt.items())
        publish_params(
            first, "eng/remote-ranked", rank=0, client=trainer, derived_from=Derivation("eng/remote-ranked", 1)
        )
    options = EngineOptions(name="eng/remote", socket=two_nodes.nodes["b"].socket)
    model = EngineModel(tp=2, rank=1)
    assert load_set(model, options, rank=1, device="cpu").kind == "whole"
    assert model.equals(ckpt)
    ranked = EngineModel(tp=2, rank=0)
    ranked_options = EngineOptions(name="eng/remote-ranked", socket=two_nodes.nodes["b"].socket)
    assert load_set(ranked, ranked_options, rank=0, device="cpu").kind == "rank"
    assert ranked.equals(ckpt)
    with two_nodes.client("a") as trainer:
        trainer.put("eng/remote", step)
    with two_nodes.client("b") as engine_side:
        with pytest.raises(sdk.InvalidArgument, match="mount needs a replica on this node"):
            engine_side.mount("eng/remote")
        buffering = BufferingModel(tp=2, rank=1)
        updater = WeightUpdater(buffering, engine_side, device="cpu", name="eng/remote", on_finish=buffering.flush)
        updater.start()
        assert updater.update() == 2
        assert updater.finish() == ("eng/remote", 2) and buffering.equals(step)


def test_read_set_views_or_a_checked_copy(client) -> None:
    ckpt = checkpoint(seed=9)
    client.put("eng/read", ckpt)
    with read_set(client, "eng/read", None, device="cpu") as (version, tensors):
        assert version == 1 and all(torch.equal(tensors[k], v) for k, v in ckpt.items())
    with read_set(client, "eng/read", 1, device="cpu", verify=True) as (_, tensors):
        assert all(torch.equal(tensors[k], v) for k, v in ckpt.items())


def test_sglang_custom_weight_loader_pulls_the_version_requested(client) -> None:
    """What SGLang's update_weights_from_tensor(load_format=...) calls on every rank (SGLang
    itself cannot run here): the trainer sends `request(...)`, not the weights."""
    from sdk.engines.sglang import request, update_from_tensord

    v1, v2 = checkpoint(seed=12), checkpoint(seed=13)
    client.put("eng/sglang", v1)
    client.put("eng/sglang", v2)
    directive = request("eng/sglang", 1)
    assert [(k, v.item()) for k, v in directive] == [("tensord:eng/sglang", 1)]
    model = EngineModel(tp=2, rank=1)
    update_from_tensord(model, directive, client=client)
    assert model.equals(v1)
    update_from_tensord(model, request("eng/sglang"), client=client)  # latest
    assert model.equals(v2)
    with pytest.raises(sdk.InvalidArgument, match="not a tensord request"):
        update_from_tensord(model, [("q.weight", v1["q.weight"])], client=client)
    with pytest.raises(sdk.InvalidArgument):
        request("eng/sglang", 0)


@needs_minilm
def test_transformers_model_built_from_its_config_and_a_set(client, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from sdk.engines.hf import from_set

    assert MINILM_DIR is not None
    client.put("eng/minilm", load_file(MINILM_DIR / "model.safetensors"))
    model = from_set(MINILM_DIR, "eng/minilm", client=client)
    original = transformers.AutoModel.from_pretrained(MINILM_DIR).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
    batch = tokenizer(["tensord keeps weights in memory", "x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, original(**batch).last_hidden_state)
    client.put("eng/minilm-part", {"pooler.dense.bias": torch.zeros(384)})
    with pytest.raises(sdk.InvalidArgument, match="lacks"):
        from_set(MINILM_DIR, "eng/minilm-part", client=client)


def test_a_rank_set_is_taken_only_for_the_version_and_engine_it_was_derived_from(daemon, client) -> None:
    name = "eng/derived"
    v1, v2 = checkpoint(seed=12), checkpoint(seed=13)
    key = EngineKey("toy 1", 1, 0, "float32")
    client.put(name, v1)
    first = EngineModel()
    first.load_weights(v1.items())
    assert publish_params(first, name, rank=0, client=client, derived_from=Derivation(name, 1, key)) == 1
    assert Derivation.from_origin(client.info(rank_set(name, 0))["origin"]) == Derivation(name, 1, key)
    # Asked for v1 by the same engine: the rank set.
    model = BufferingModel()
    found = load_set(model, _options(daemon, name, version=1), rank=0, device="cpu", key=key)
    assert found.kind == "rank" and model.buffered == [] and model.equals(v1)
    # Another engine (dtype) must not take it: the whole set, through load_weights.
    other = EngineKey("toy 1", 1, 0, "bfloat16")
    assert load_set(EngineModel(), _options(daemon, name, version=1), rank=0, device="cpu", key=other).kind == "whole"
    # A trainer puts v2: the rank set is stale for "latest" and the whole v2 is loaded.
    client.put(name, v2)
    model = EngineModel()
    found = load_set(model, _options(daemon, name), rank=0, device="cpu", key=key)
    assert (found.kind, found.version) == ("whole", 2) and model.equals(v2)
    # `tensord info` shows the derivation.
    out = tensord("info", rank_set(name, 0), socket=daemon.socket)
    assert out.returncode == 0 and 'derived {"key":{"dtype":"float32"' in out.stdout, out.stdout
    # and so does `tensord ls`, in its FROM column (the whole set is from no derivation).
    listed = tensord("ls", "eng/", socket=daemon.socket).stdout
    assert f"{name} v1 (toy 1 tp0/1)" in listed and "FROM" in listed, listed
    # A rank set that records no derivation is never taken.
    client.put("eng/underived", v1)
    client.put(rank_set("eng/underived", 0), dict(first.state_dict()))
    assert load_set(EngineModel(), _options(daemon, "eng/underived"), rank=0, device="cpu").kind == "whole"


class _Plain(torch.nn.Module):
    """Parameters named as the checkpoint's; ``b`` tied to ``a``; `skip` names tensors that
    `load_weights` drops, as an engine that silently keeps an old value would."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
        self.b.weight = self.a.weight
        self.skip: set[str] = set()

    def load_weights(self, weights) -> None:
        params = dict(self.named_parameters())
        for key, t in weights:
            if key in params and key not in self.skip:
                params[key].data.copy_(t)


def test_an_update_that_does_not_match_the_version_restores_the_previous_one(client) -> None:
    name = "eng/verified"
    g = torch.Generator().manual_seed(14)
    v1, v2 = ({k: torch.randn(8, 8, generator=g) for k in ("a.weight", "c.weight")} for _ in range(2))
    assert [client.put(name, v) for v in (v1, v2)] == [1, 2]
    model = _Plain()
    model.requires_grad_(False)

    def update(version: int) -> tuple[str, int] | None:
        updater = WeightUpdater(model, client, device="cpu", name=name)
        updater.start()
        updater.update(version=version)
        return updater.finish()

    def holds(v: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(p, v["c.weight" if n == "c.weight" else "a.weight"]) for n, p in
                   model.named_parameters(remove_duplicate=False))  # fmt: skip

    assert update(1) == (name, 1) and holds(v1)
    model.skip = {"c.weight"}  # c keeps v1's value: a mix
    mixed = rf"c\.weight differs from the version's c\.weight.*serves {name} v1 again"
    with pytest.raises(sdk.IntegrityError, match=mixed):
        update(2)
    assert holds(v1)
    model.skip = set()
    assert update(2) == (name, 2) and holds(v2)
    # A version without c: the engine would keep v2's c.
    assert client.put(name, {"a.weight": v1["a.weight"]}) == 3
    with pytest.raises(sdk.IntegrityError, match=rf"c\.weight is not in the version.*serves {name} v2 again"):
        update(3)
    assert holds(v2)
