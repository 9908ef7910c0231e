"""Tensor-parallel plans: rules as data, and byte ranges that rebuild torch.chunk exactly."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensord.checkpoint import FileTensor, read_checkpoint, read_header
from tensord.rule_patterns import bounded, first_matches
from tensord.sharding import (
    ShardPlan,
    ShardRules,
    builtin_rules,
    load_rules,
    parse_rules,
    plan_shard,
    plan_shards,
    recorded_shards,
)
from tensord_contract.errors import InvalidArgument, NotFound
from tests.daemons import WEIGHTS, needs_minilm
from tests.data import random_tensor

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "sharding-rules.example.toml"


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparison of any dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def read_plan(plan: ShardPlan) -> bytes:
    """The shard's bytes: the planned (offset, length) ranges of its file, in order."""
    with open(plan.tensor.path, "rb") as f:
        parts = []
        for offset, length in plan.ranges:
            f.seek(offset)
            parts.append(f.read(length))
    return b"".join(parts)


def shard_tensor(plan: ShardPlan, dtype: torch.dtype) -> torch.Tensor:
    """Read the planned ranges and view them as the shard."""
    buf = bytearray(read_plan(plan))
    assert len(buf) == plan.nbytes
    if not buf:
        return torch.empty(plan.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(plan.shape)


def check_split(tensor: FileTensor, original: torch.Tensor, tp: int, rules: ShardRules) -> list[ShardPlan]:
    plans = [plan_shard(tensor, rank, tp, rules) for rank in range(tp)]
    parts = [shard_tensor(p, original.dtype) for p in plans]
    dim = plans[0].dim
    if dim is None:
        for part in parts:
            assert part.shape == original.shape
            assert torch.equal(raw(part), raw(original))
        return plans
    for rank, part in enumerate(parts):
        expected = torch.chunk(original, tp, dim)[rank] if original.numel() else part
        assert part.shape == expected.shape
        assert torch.equal(raw(part), raw(expected))
    # Concatenate along the split dim as bytes (each element widens the last dim in place).
    rebuilt = torch.cat([p.view(torch.uint8) for p in parts], dim)
    assert torch.equal(rebuilt, original.contiguous().view(torch.uint8))
    return plans


@pytest.fixture
def cube(tmp_path: Path) -> tuple[dict[str, FileTensor], dict[str, torch.Tensor]]:
    tensors = {
        "lead": random_tensor(torch.int8, (3,), seed=1),  # so that offsets are not zero
        "cube": random_tensor(torch.float32, (4, 6, 12), seed=2),
        "cube_bf16": random_tensor(torch.bfloat16, (6, 4, 6), seed=3),
        "cube_bool": random_tensor(torch.bool, (2, 6, 4), seed=4),
        "cube_f8": random_tensor(torch.float8_e4m3fn, (6, 2, 6), seed=5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    path = tmp_path / "cube.safetensors"
    save_file(tensors, str(path))
    return {t.name: t for t in read_header(path)}, load_file(str(path))


@pytest.mark.parametrize("name", ["cube", "cube_bf16", "cube_bool", "cube_f8"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_split_rebuilds_tensor(cube, name: str, dim: int, tp: int) -> None:
    files, loaded = cube
    t, original = files[name], loaded[name]
    rules = ShardRules.from_pairs([(f"^{name}$", dim)])
    if original.shape[dim] % tp:
        with pytest.raises(InvalidArgument, match=rf"'{name}'.*dim {dim % 3} of size \d+ is not divisible by tp={tp}"):
            plan_shard(t, 0, tp, rules)
        return
    plans = check_split(t, original, tp, rules)
    d = dim % 3
    assert all(p.dim == (None if tp == 1 else d) for p in plans)
    rows = 1 if tp == 1 else int(torch.Size(original.shape[:d]).numel())
    assert all(len(p.ranges) == rows for p in plans)
    assert sum(p.nbytes for p in plans) == t.nbytes
    for p in plans:
        assert all(t.offset <= off and off + n <= t.offset + t.nbytes for off, n in p.ranges)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_recorded_shards_find_every_split_again_from_the_shapes(cube, tp: int) -> None:
    """What a restore reads for one rank: the same runs as the rules gave, from the shapes alone."""
    files, _ = cube
    pairs = [("^cube$", 1), ("^cube_bf16$", 0), ("^cube_bool$", -1), ("^cube_f8$", 0), ("^empty$", 0)]
    rules = ShardRules.from_pairs([(p, d) for p, d in pairs if files[p[1:-1]].shape[d] % tp == 0])  # divisible
    tensors = list(files.values())
    for rank in range(tp):
        planned = plan_shards(tensors, rank, tp, rules)
        layout = [(p.dtype, p.shape) for p in planned]
        again = recorded_shards(tensors, layout, rank, tp)
        assert [(p.name, p.shape, p.ranges) for p in again] == [(p.name, p.shape, p.ranges) for p in planned]


def test_recorded_shards_refuse_shapes_no_split_gives(cube) -> None:
    files, _ = cube
    t = files["cube"]  # float32 (4, 6, 12)
    for dtype, shape in [
        ("float16", (4, 3, 12)),  # another dtype
        ("float32", (4, 3, 6)),  # two dims differ
        ("float32", (4, 4, 12)),  # not a tp=2 part
        ("float32", (4, 6)),  # other rank of dims
        ("float32", (4, 12, 12)),  # larger
    ]:
        with pytest.raises(NotFound, match="no tp=2 shard"):
            recorded_shards([t], [(dtype, shape)], 0, 2)
    with pytest.raises(ValueError):  # one recorded shape per tensor
        recorded_shards([t, files["lead"]], [("float32", (4, 6, 12))], 0, 2)


def test_dim0_is_one_range(cube) -> None:
    files, _ = cube
    t = files["cube"]
    p = plan_shard(t, 1, 2, ShardRules.from_pairs([("cube", 0)]))
    assert p.shape == (2, 6, 12)
    assert p.ranges == ((t.offset + t.nbytes // 2, t.nbytes // 2),)


def test_leading_unit_dims_coalesce(tmp_path: Path) -> None:
    path = tmp_path / "u.safetensors"
    original = random_tensor(torch.float16, (1, 1, 8, 4))
    save_file({"u": original}, str(path))
    (t,) = read_header(path)
    p = plan_shard(t, 1, 4, ShardRules.from_pairs([("u", 2)]))
    assert len(p.ranges) == 1
    check_split(t, original, 4, ShardRules.from_pairs([("u", 2)]))


def test_replicate_and_default(cube) -> None:
    files, loaded = cube
    rules = ShardRules.from_pairs([("^cube$", "replicate")], default=0)
    p = plan_shard(files["cube"], 1, 2, rules)
    assert (p.dim, p.shape, p.ranges) == (None, (4, 6, 12), ((files["cube"].offset, files["cube"].nbytes),))
    check_split(files["cube"], loaded["cube"], 2, rules)
    check_split(files["cube_bf16"], loaded["cube_bf16"], 2, rules)  # unmatched: default dim 0
    assert plan_shard(files["cube_bf16"], 0, 2, rules).dim == 0


def test_scalar_only_replicated(cube) -> None:
    files, _ = cube
    p = plan_shard(files["scalar"], 0, 4, ShardRules())
    assert p.shape == ()
    assert shard_tensor(p, torch.float32).item() == 1.5
    with pytest.raises(InvalidArgument, match=r"'scalar'.*0-d tensor can only be replicated"):
        plan_shard(files["scalar"], 0, 4, ShardRules.from_pairs([("scalar", 0)]))


def test_empty_tensor(cube) -> None:
    files, _ = cube
    p = plan_shard(files["empty"], 1, 2, ShardRules.from_pairs([("empty", 0)]))
    assert (p.shape, p.ranges, p.nbytes) == ((0, 4), (), 0)
    p = plan_shard(files["empty"], 1, 2, ShardRules.from_pairs([("empty", 1)]))
    assert (p.shape, p.ranges) == ((0, 2), ())


def test_bad_split_arguments(cube) -> None:
    files, _ = cube
    t = files["cube"]
    split = ShardRules.from_pairs([("cube", 1)])
    with pytest.raises(InvalidArgument, match=r"'cube'.*dim 5 is out of range"):
        plan_shard(t, 0, 2, ShardRules.from_pairs([("cube", 5)]))
    with pytest.raises(InvalidArgument, match=r"'cube'.*dim -4 is out of range"):
        plan_shard(t, 0, 2, ShardRules.from_pairs([("cube", -4)]))
    with pytest.raises(InvalidArgument, match=r"'cube'.*dim 1 of size 6 is not divisible by tp=4"):
        plan_shard(t, 0, 4, split)
    for rank, tp in [(2, 2), (-1, 2), (0, 0), (0, -1), (True, 2)]:
        with pytest.raises(InvalidArgument, match=r"rank|tp"):
            plan_shard(t, rank, tp, split)
    with pytest.raises(InvalidArgument, match="not divisible"):
        plan_shards(files.values(), 0, 4, split)


def test_first_match_wins() -> None:
    rules = ShardRules.from_pairs([(r"special\.weight$", "replicate"), (r"\.weight$", 1), ("bias", 0)], default=-1)
    assert rules.match("a.special.weight") is None
    assert rules.match("a.other.weight") == 1
    assert rules.match("a.bias") == 0
    assert rules.match("a.scale") == -1


@pytest.mark.parametrize(
    ("pattern", "bounded_here"),
    [
        (r"norm\.(weight|bias)$", True),
        (r"layers\.\d+\.mlp", True),
        (r"a{2,5}b", True),
        (r"(a+)+$", False),  # nested repeats
        (r"(a|aa)*$", False),  # an alternation under a repeat
        (r".*a.*b", False),  # two repeats: a search is ~L**3
        (r"(x)\1", False),  # a back reference
        (r"(?:a?){24}b", False),  # an optional item under a counted repeat: 2**24 ways
        ("a?" * 20 + "a" * 20, False),  # twenty optional items in a row
        (r"(?=(a?){30})b", False),  # under a lookahead too
        (r"(a|a)(a|a)b", False),  # two alternations
        (r"[a-z]+\d?", False),  # a repeat and an optional item
    ],
)
def test_patterns_that_could_backtrack_for_long_are_matched_in_a_child(pattern: str, bounded_here: bool) -> None:
    assert bounded(re.compile(pattern)) is bounded_here


def test_the_child_matches_as_this_process_does() -> None:
    names = [f"model.layers.{i}.mlp.experts.{j}.w{k}" for i in range(3) for j in range(4) for k in (1, 2)]
    names += ["lm_head.weight", "x" * 1000]
    patterns = [re.compile(p) for p in (r"experts\.\d+\.w1$", r"lm_head", r"layers\.\d+\..*w2$")]
    assert not bounded(patterns[2])
    want = [next((i for i, p in enumerate(patterns) if p.search(n)), -1) for n in names]
    assert first_matches(patterns, names) == want  # through the child
    assert first_matches(patterns[:2], names) == [w if w < 2 else -1 for w in want]  # in this process


def test_a_pattern_that_backtracks_for_ever_is_refused_in_time() -> None:
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="took over 1 s to match 1 tensor names"):
        first_matches([re.compile(r"(a+)+$")], ["a" * 64 + "!"], timeout=1.0)
    assert time.monotonic() - start < 5


@needs_minilm
def test_minilm_every_tensor_splits_on_last_dim() -> None:
    path = WEIGHTS
    loaded = load_file(str(path))
    tensors = read_checkpoint(path)
    rules = ShardRules.from_pairs([(".", -1)])
    for t in tensors:
        if not t.shape or t.shape[-1] % 2:
            continue
        check_split(t, loaded[t.name], 2, rules)
    word = next(t for t in tensors if t.name.endswith("word_embeddings.weight"))
    check_split(word, loaded[word.name], 2, ShardRules.from_pairs([("word_embeddings", 0)]))


# ---------------------------------------------------------------------------------------------
# Rules as data.

LLAMA_EXPECT = {
    "model.embed_tokens.weight": 0,
    "lm_head.weight": 0,
    "model.layers.0.self_attn.q_proj.weight": 0,
    "model.layers.0.self_attn.k_proj.weight": 0,
    "model.layers.0.self_attn.v_proj.weight": 0,
    "model.layers.0.self_attn.q_proj.bias": 0,
    "model.layers.0.self_attn.v_proj.bias": 0,
    "model.layers.0.self_attn.o_proj.weight": 1,
    "model.layers.0.self_attn.o_proj.bias": None,
    "model.layers.31.mlp.gate_proj.weight": 0,
    "model.layers.31.mlp.up_proj.weight": 0,
    "model.layers.31.mlp.down_proj.weight": 1,
    "model.layers.31.mlp.down_proj.bias": None,
    "model.layers.0.input_layernorm.weight": None,
    "model.layers.0.post_attention_layernorm.weight": None,
    "model.layers.0.self_attn.q_norm.weight": None,
    "model.norm.weight": None,
    "model.layers.0.self_attn.rotary_emb.inv_freq": None,
    "model.layers.0.mlp.gate_up_proj.weight": None,
    "something.else": None,
}


@pytest.mark.parametrize("rules", [builtin_rules("llama"), load_rules(EXAMPLE)], ids=["llama", "example"])
def test_llama_rules(rules: ShardRules) -> None:
    for name, dim in LLAMA_EXPECT.items():
        assert rules.match(name) == dim, name


def test_llama_rules_on_a_tiny_llama(tmp_path: Path) -> None:
    hidden, inter, vocab, heads = 8, 12, 16, 4
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": (heads, hidden),
        "model.layers.0.self_attn.v_proj.weight": (heads, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.0.mlp.up_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    tensors = {n: random_tensor(torch.bfloat16, s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    rules = builtin_rules("llama")
    files = read_checkpoint(tmp_path)
    for t in files:
        check_split(t, tensors[t.name], 4, rules)
    plans = plan_shards(files, 3, 4, rules)
    by_name = {p.name: p for p in plans}
    assert by_name["model.layers.0.self_attn.o_proj.weight"].shape == (hidden, hidden // 4)
    assert by_name["model.layers.0.mlp.down_proj.weight"].shape == (hidden, inter // 4)
    assert by_name["lm_head.weight"].shape == (vocab // 4, hidden)
    assert by_name["model.norm.weight"].shape == (hidden,)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_load_rules_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
default = 0
[[rule]]
pattern = 'norm\\.weight$'
split = "replicate"
[[rule]]
pattern = '\\.o_proj\\.'
split = -1
""",
    )
    rules = load_rules(path)
    assert rules.default == 0
    assert [r.dim for r in rules.rules] == [None, -1]
    assert rules.match("x.norm.weight") is None
    assert rules.match("x.o_proj.weight") == -1
    assert rules.match("x") == 0
    assert load_rules(write(tmp_path, "")).match("anything") is None  # empty file: replicate all


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\npattern = '('\nsplit = 0\n", "bad regex"),
        ("[[rule]]\npattern = 'x'\nsplit = 'row'\n", "split must be a dim"),
        ("[[rule]]\npattern = 'x'\nsplit = 1.5\n", "split must be a dim"),
        ("[[rule]]\npattern = 'x'\nsplit = true\n", "split must be a dim"),
        ("[[rule]]\npattern = 'x'\nsplit = 99\n", "split must be a dim"),
        ("[[rule]]\npattern = 'x'\n", "exactly the keys"),
        ("[[rule]]\npattern = 'x'\nsplit = 0\ndim = 1\n", "exactly the keys"),
        ("[[rule]]\npattern = 3\nsplit = 0\n", "pattern must be a non-empty string"),
        ("[[rule]]\npattern = ''\nsplit = 0\n", "pattern must be a non-empty string"),
        ("rule = 'x'\n", "array of tables"),
        ("default = 'shard'\n", "default: split must be"),
        ("rules = []\n", "unknown keys"),
        ("[[rule]\n", "bad TOML"),
        ("default = \xff\n", "bad TOML"),
    ],
)
def test_bad_rules(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InvalidArgument, match=message) as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_bad_rules_from_pairs() -> None:
    with pytest.raises(InvalidArgument, match="bad regex"):
        ShardRules.from_pairs([("[", 0)])
    with pytest.raises(InvalidArgument, match="split must be"):
        ShardRules.from_pairs([("x", None)])
    with pytest.raises(InvalidArgument, match="unknown keys"):
        parse_rules({"rule": [], "extra": 1})


def test_missing_rules(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_rules(tmp_path / "none.toml")
    with pytest.raises(NotFound, match="llama"):
        builtin_rules("gpt-9")
    with pytest.raises(NotFound):
        builtin_rules("../rules/llama")
