"""Copy plans (`sdk.plans`): a repeated `load_into` or `put` reuses what the first one worked out,
and every change that could make it write into or read from memory a tensor no longer owns
makes a new one. Each case checks the bytes exactly, on host tensors and (`-m gpu`) on cuda."""

from __future__ import annotations

import threading

import pytest
import torch

import sdk
from sdk.connection import Connection
from sdk.plans import LoadPlan, PutPlan
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest
from tests.daemons import DaemonProcess

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _tensors(device: str, seed: int, n: int = 40) -> dict[str, torch.Tensor]:
    """Mixed dtypes and shapes, each its own allocation."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        shape = (3 + i % 5, 4) if i % 3 else (7 + i,)
        dtype = (torch.float32, torch.bfloat16, torch.int32)[i % 3]
        t = torch.randint(-1000, 1000, shape, generator=g).to(dtype)
        out[f"layer.{i}.w"] = t.to(device)
    out["square"] = torch.randn(6, 6, generator=g).to(device)
    return out


def _zeros(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(t) for k, t in like.items()}


def _exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k].cpu().contiguous().view(torch.uint8), t.cpu().contiguous().view(torch.uint8)), k


def _load_plan(client: sdk.Client, name: str) -> LoadPlan:
    plan = client._plans.get("load", name)
    assert isinstance(plan, LoadPlan)
    return plan


def test_load_into_reuses_its_plan_across_versions_of_one_layout(client: sdk.Client, device: str) -> None:
    name = f"plans/reuse-{device}"
    targets = _zeros(_tensors(device, 0))
    for seed in range(3):
        src = _tensors(device, seed)
        version = client.put(name, src)
        assert client.load_into(targets, name, verify=True) == version
        _exact(targets, src)
        if seed == 0:
            first = _load_plan(client, name)
        assert _load_plan(client, name) is first  # same tensors, same layout: not made again


def test_load_into_follows_every_change_of_its_targets(client: sdk.Client, device: str) -> None:
    name = f"plans/targets-{device}"
    targets = _zeros(_tensors(device, 0))
    seed = 0

    def load_and_check() -> None:
        nonlocal seed
        seed += 1
        src = _tensors(device, seed)
        client.put(name, src)
        client.load_into(targets, name)
        _exact(targets, src)

    load_and_check()
    plan = _load_plan(client, name)

    # replaced in the mapping by a new tensor (the old one freed: the new may lie at its address)
    shape, dtype = targets["layer.4.w"].shape, targets["layer.4.w"].dtype
    del targets["layer.4.w"]
    targets["layer.4.w"] = torch.zeros(shape, dtype=dtype, device=device)
    targets = dict(sorted(targets.items(), key=lambda kv: list(_tensors(device, 0)).index(kv[0])))
    load_and_check()

    # re-allocated in place (set_ to new storage): the old storage must not be written
    old = targets["layer.1.w"]
    kept = old.untyped_storage()  # the old memory stays alive: a stale plan would write it
    before = torch.empty(0, dtype=old.dtype, device=device).set_(kept, 0, old.shape, old.stride()).clone()
    old.set_(torch.zeros_like(old))
    load_and_check()
    after = torch.empty(0, dtype=old.dtype, device=device).set_(kept, 0, old.shape, old.stride())
    assert torch.equal(before, after)

    # .to() and back: a new allocation each time
    targets["layer.2.w"] = targets["layer.2.w"].to("cpu").to(device)
    load_and_check()

    # resized in place to another shape: refused, nothing written; resized back: loads again
    t = targets["layer.7.w"]
    good = t.shape
    t.resize_(2, 2)
    snapshot = {k: v.clone() for k, v in targets.items()}
    client.put(name, _tensors(device, 99))
    with pytest.raises(InvalidArgument):
        client.load_into(targets, name)
    for k, v in snapshot.items():
        assert torch.equal(targets[k], v), k
    t.resize_(good)
    load_and_check()

    # same address, shape and strides, another dtype (a view): refused
    targets["layer.0.w"] = targets["layer.0.w"].view(torch.int32)
    with pytest.raises(InvalidArgument):
        client.load_into(targets, name)
    targets["layer.0.w"] = targets["layer.0.w"].view(torch.float32)
    load_and_check()

    # same address and shape, other strides (transposed in place): loaded by value
    targets["square"].t_()
    load_and_check()
    targets["square"].t_()
    load_and_check()

    # a view at another storage offset
    big = torch.zeros(64, dtype=torch.float32, device=device)
    targets["layer.3.w"] = big[8:18]
    load_and_check()
    assert not torch.any(big[:8]) and not torch.any(big[18:])

    assert _load_plan(client, name) is not plan


def test_load_into_a_module_whose_parameters_are_replaced(client: sdk.Client, device: str) -> None:
    name = f"plans/module-{device}"
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(device)
    model[0].register_parameter("t", torch.nn.Parameter(torch.zeros(6, 5, device=device).t()))  # not dense
    for step in range(4):
        src = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        client.put(name, src)
        if step == 1:
            model[0].weight = torch.nn.Parameter(torch.zeros(16, 8, device=device))
        if step == 2:
            model[1].bias.data = torch.zeros(4, device=device)
        if step == 3:
            model.to(torch.float64).to(torch.float32)
        client.load_into(model, name)
        _exact(dict(model.state_dict()), src)


def test_a_new_layout_between_versions_makes_a_new_plan(client: sdk.Client, device: str) -> None:
    name = f"plans/layout-{device}"
    a = {"x": torch.arange(10.0, device=device), "y": torch.arange(30.0, device=device)}
    targets = _zeros(a)
    client.put(name, a)
    client.load_into(targets, name)
    _exact(targets, a)
    plan = _load_plan(client, name)
    b = {"y": torch.arange(30.0, device=device) + 1, "x": torch.arange(10.0, device=device) + 2}  # other order
    client.put(name, b)
    client.load_into(targets, name)
    _exact(targets, {"x": b["x"], "y": b["y"]})
    assert _load_plan(client, name) is not plan
    c = {"x": torch.arange(30.0, device=device), "y": torch.arange(10.0, device=device)}  # shapes swap
    client.put(name, c)
    with pytest.raises(InvalidArgument):
        client.load_into(targets, name)
    _exact(targets, {"x": b["x"], "y": b["y"]})  # nothing written
    partial = {"x": torch.zeros(30, device=device), "z": torch.zeros(3, device=device)}
    client.load_into(partial, name, strict=False)
    assert torch.equal(partial["x"], c["x"]) and not torch.any(partial["z"])


def test_keys_not_str_are_refused_after_a_kept_plan(client: sdk.Client) -> None:
    """The key check runs only for a new plan: a kept plan must not let other keys through."""
    name = "plans/keys"
    src = {"a": torch.arange(4.0), "b": torch.arange(6.0)}
    client.put(name, src)
    targets = _zeros(src)
    client.load_into(targets, name)
    plan = _load_plan(client, name)
    bad = {1: targets["a"], "b": targets["b"]}
    with pytest.raises(InvalidArgument, match="keyed by name"):
        client.load_into(bad, name)  # type: ignore[arg-type]
    assert _load_plan(client, name) is plan


def test_a_new_version_of_a_known_layout_comes_without_its_table(
    client: sdk.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon refers a reader to the table of a version it has; a new layout brings its own
    table, and the plan made for the old one is not used for it."""
    name = "plans/table-refs"
    given: list[object] = []
    decode = Manifest.from_wire.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Manifest], data: object, *args: object, table: object = None, **kw: object) -> Manifest:
        given.append(table)
        return decode(cls, data, *args, table=table, **kw)

    monkeypatch.setattr(Manifest, "from_wire", classmethod(spy))
    a = {"x": torch.arange(10.0), "y": torch.arange(30.0)}
    targets = _zeros(a)
    client.put(name, a)
    client.load_into(targets, name)
    plan = _load_plan(client, name)
    b = {"x": a["x"] + 1, "y": a["y"] + 2}
    client.put(name, b)
    client.load_into(targets, name)
    _exact(targets, b)
    assert given[0] is None and given[1] is plan.manifest.table  # the second came as places only
    assert _load_plan(client, name) is plan
    c = {"x": torch.arange(12.0), "y": torch.arange(28.0)}
    client.put(name, c)
    with pytest.raises(InvalidArgument):
        client.load_into(targets, name)  # the shapes differ: nothing written
    _exact(targets, b)
    assert given[2] is None  # a layout the reader does not have: the whole manifest
    moved = _zeros(c)
    client.load_into(moved, name)
    _exact(moved, c)
    assert _load_plan(client, name) is not plan


def test_a_plans_scattered_host_read_is_prepared_once(client: sdk.Client) -> None:
    """The preadv calls of a plan's read from a host slab are made once (its arrays are
    read-only); arrays that may change are never looked up."""
    from tensord_dataplane import host

    name = "plans/scatter"
    src = _tensors("cpu", 3)
    targets = _zeros(src)
    client.put(name, src)
    client.load_into(targets, name)
    _, ptrs, offsets, sizes = _load_plan(client, name).copies.tables[0]
    jobs = host._scatter_jobs(ptrs, offsets, sizes)
    assert host._scatter_jobs(ptrs, offsets, sizes) is jobs
    assert host._scatter_jobs(ptrs.copy(), offsets, sizes) is not jobs  # writable: made afresh
    for t in src.values():
        t.add_(1)
    client.put(name, src)
    client.load_into(targets, name)
    _exact(targets, src)
    assert host._scatter_jobs(ptrs, offsets, sizes) is jobs


def test_put_reuses_its_plan_and_follows_changes(client: sdk.Client, device: str) -> None:
    name = f"plans/put-{device}"
    src = _tensors(device, 5)
    client.put(name, src)
    _exact(dict(client.get(name, device=device, verify=True)), src)
    plan = client._plans.get("put", name)
    assert isinstance(plan, PutPlan) and not plan.described.tensors  # a kept plan holds no tensor
    for k in src:
        src[k].add_(1)  # a training step: same memory, new values
    client.put(name, src)
    _exact(dict(client.get(name, device=device, verify=True)), src)
    assert client._plans.get("put", name) is plan

    changes = [
        lambda: src.__setitem__("layer.4.w", torch.ones(9, 4, device=device)),  # new shape and memory
        lambda: src["layer.5.w"].set_(torch.full_like(src["layer.5.w"], 3)),
        lambda: src["layer.6.w"].resize_(1, 2),
        lambda: src.__setitem__("layer.0.w", src["layer.0.w"].view(torch.int32)),
        lambda: src["square"].t_(),
        lambda: src.__setitem__("extra", torch.arange(5, device=device)),
        lambda: src.pop("layer.1.w"),
    ]
    for change in changes:
        change()
        client.put(name, src)
        want = {k: v.contiguous() for k, v in src.items()}
        _exact(dict(client.get(name, device=device, verify=True)), want)
        kept = client._plans.get("put", name)
        assert isinstance(kept, PutPlan) and isinstance(plan, PutPlan)
        assert kept is not plan or not plan.fits(list(src), list(src.values()), None)
        plan = kept


def test_a_kept_put_plan_names_its_table_by_digest(
    client: sdk.Client, daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put again sends its table's digest; where the daemon's newest version of the set has
    another table (another writer's layout) the table is sent, and every version holds the
    layout it was put with. A deleted set's newest table is still known (`Store.known_table`)."""
    name = "plans/put-digest"
    sent: list[str] = []
    call = Connection.call

    def spy(self: Connection, op: str, /, **args: object) -> object:
        if op == "put_begin":
            sent.append("digest" if "table_digest" in args else "table")
        return call(self, op, **args)

    monkeypatch.setattr(Connection, "call", spy)
    src = _tensors("cpu", 7)
    client.put(name, src)
    client.put(name, src)
    assert sent == ["table", "digest"]
    other = {"other": torch.arange(3.0)}
    with daemon.client() as writer:  # another layout becomes the set's newest version
        writer.put(name, other)
    sent.clear()
    version = client.put(name, src)
    assert sent == ["digest", "table"]  # asked for the table: it is not the newest's
    _exact(dict(client.get(name, version, verify=True)), src)
    _exact(dict(client.get(name, version - 1)), other)
    client.delete(name)
    sent.clear()
    version = client.put(name, src)
    assert sent == ["digest"] and version >= 1  # the daemon keeps a deleted set's newest table
    _exact(dict(client.get(name, version, verify=True)), src)


def test_concurrent_steps_from_two_threads(client: sdk.Client, device: str) -> None:
    errors: list[BaseException] = []

    def steps(who: int) -> None:
        try:
            name = f"plans/threads-{device}-{who}"
            src = _tensors(device, who)
            targets = _zeros(src)
            for _ in range(6):
                for t in src.values():
                    t.add_(1)
                v = client.put(name, src)
                assert client.load_into(targets, name) == v
                _exact(targets, src)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=steps, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]

    # two threads loading the same set into their own targets, with one plan cache
    name = f"plans/threads-{device}-0"
    want = dict(client.get(name, device=device))
    outs = [_zeros(want) for _ in range(2)]

    def load(out: dict[str, torch.Tensor]) -> None:
        try:
            for _ in range(5):
                client.load_into(out, name)
                _exact(out, want)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]


def test_a_new_version_of_the_same_layout_shares_its_decoded_table(client: sdk.Client) -> None:
    name = "plans/table"
    a = {"x": torch.arange(4.0), "y": torch.zeros(3)}

    def tables() -> list[object]:
        return [m.table for (n, _, _), m in client._manifests.items() if n == name]

    client.put(name, a)
    client.get(name)
    client.put(name, {k: v + 1 for k, v in a.items()})
    assert torch.equal(client.get(name)["x"], torch.arange(4.0) + 1)
    assert tables()[0] is tables()[1]
    for other in ({"x": torch.arange(5.0), "y": torch.zeros(3)}, {"x": torch.arange(4), "y": torch.zeros(3)}):
        client.put(name, other)  # another shape, another dtype: decoded afresh
        got = client.get(name)
        assert torch.equal(got["x"], other["x"]) and got["x"].dtype == other["x"].dtype
        assert tables()[-1] is not tables()[-2]


class _Net(torch.nn.Module):
    """Parameters that require grad, a persistent and a non-persistent buffer, a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(12, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        self.head = torch.nn.Linear(8, 12, bias=True)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(5), persistent=False)


def test_put_of_a_module_stores_its_state_dict_and_follows_its_changes(client: sdk.Client, device: str) -> None:
    """A trainer puts its module every step: the set holds `state_dict()` (names in torch's order,
    tied weights under both names, no non-persistent buffer), through parameter replacement, a
    re-allocation in place, a state_dict hook and an engine reading it back with load_into."""
    name = f"plans/put-module-{device}"
    model = _Net().to(device)
    engine = _Net().to(device)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model.steps.add_(step)
        if step == 1:
            model.body[0].weight = torch.nn.Parameter(torch.randn(8, 8, device=device))
        if step == 2:
            model.body[1].bias.data = torch.full((8,), 7.0, device=device)
        if step == 3:
            handle = model.body._register_state_dict_hook(lambda m, sd, prefix, meta: sd.pop(prefix + "1.bias"))
        if step == 4:
            handle.remove()
        want = model.state_dict()
        version = client.put(name, model)
        _exact(dict(client.get(name).items()), dict(want))
        if step != 3:  # strict: the hooked step's set lacks a name the engine has
            assert client.load_into(engine, name) == version
            _exact(dict(engine.state_dict()), dict(want))
    listed = client.info(name, tensors=True)["tensors"]
    assert "steps" in listed and "head.weight" in listed and "scratch" not in listed


def test_publish_of_a_module_advertises_its_state_dict(client: sdk.Client) -> None:
    model = _Net()
    with client.publish("plans/publish-module", model) as pub:
        got = client.get("plans/publish-module", pub.version)
        _exact(dict(got.items()), dict(model.state_dict()))


@pytest.mark.parametrize("bad", [[torch.ones(2)], torch.ones(2), "weights", None])
def test_put_publish_and_load_into_refuse_what_is_neither_a_module_nor_a_mapping(client: sdk.Client, bad) -> None:
    for op in (lambda: client.put("plans/bad", bad), lambda: client.publish("plans/bad", bad)):
        with pytest.raises(InvalidArgument, match=r"nn\.Module or a mapping"):
            op()
    with pytest.raises(InvalidArgument, match=r"nn\.Module or a mapping"):
        client.load_into(bad, "plans/bad")
    assert "plans/bad" not in [s["name"] for s in client.ls()]


def test_targets_sharing_memory_are_written_once_or_refused(client: sdk.Client, device: str) -> None:
    """Tied weights (one tensor under two names) load when the set holds the same bytes for
    both, also through a kept plan; a version that holds them apart, or targets that overlap
    only in part, are refused with nothing written: one batched copy would interleave them."""
    name = f"plans/tied-{device}"
    w = torch.arange(12.0, device=device).reshape(3, 4)
    buf = torch.zeros(10, device=device)
    targets = {"embed": torch.zeros(3, 4, device=device), "bias": torch.zeros(4, device=device)}
    targets["head"] = targets["embed"]  # tied
    targets["left"], targets["right"] = buf[:5], buf[5:]  # one buffer, apart: fine
    src = {"embed": w, "head": w.clone(), "bias": torch.ones(4, device=device)}
    src["left"], src["right"] = torch.full((5,), 2.0, device=device), torch.full((5,), 3.0, device=device)
    client.put(name, src)
    for _ in range(2):  # a new plan, then the kept one
        client.load_into(targets, name)
        assert torch.equal(targets["embed"], w) and targets["head"] is targets["embed"]
        assert torch.equal(buf, torch.tensor([2.0] * 5 + [3.0] * 5, device=device))
    assert _load_plan(client, name).tied.shape == (1, 2)
    apart = dict(src, head=w + 1)
    client.put(name, apart)  # the same layout, the tied rows apart: the kept plan must not do
    before = {k: t.clone() for k, t in targets.items()}
    with pytest.raises(InvalidArgument, match="'embed' and 'head' share memory, and the set holds other bytes"):
        client.load_into(targets, name)
    with pytest.raises(InvalidArgument, match="share memory"):
        client.load_into(targets, name, verify=True)
    _exact(targets, before)
    nine = torch.zeros(9, device=device)
    overlapping = dict(targets, left=nine[:5], right=nine[4:], head=torch.zeros(3, 4, device=device))
    with pytest.raises(InvalidArgument, match="'left' and 'right' overlap in memory"):
        client.load_into(overlapping, name)
    _exact(targets, before)
