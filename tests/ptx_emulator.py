"""A small interpreter of the PTX the data plane ships (the instructions its kernels use, no
more: anything else raises), to run the kernels on host memory in tests without a GPU.

Threads of a block run one after another up to a synchronising instruction (`shfl.sync`,
`bar.sync`) or `ret`; when every live thread waits, a warp whose 32 lanes wait at the same
`shfl.sync` exchanges, else all wait at `bar.sync` and go on. Registers hold Python ints of
their width; global memory is this process's memory (ctypes), shared memory a dict per block.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

_WIDTH = {"u8": 8, "b8": 8, "u16": 16, "b16": 16, "u32": 32, "b32": 32, "s32": 32, "u64": 64, "b64": 64, "s64": 64}
_SHARED_BASE = 1 << 40


@dataclass
class Entry:
    name: str
    params: list[str]
    code: list[tuple[str | None, bool, str, list[str]]]  # (predicate, negated, op, operands)
    labels: dict[str, int]
    shared: dict[str, int]  # symbol -> address in the block's shared memory


@dataclass
class Thread:
    tid: int
    regs: dict[str, int] = field(default_factory=dict)
    pc: int = 0
    done: bool = False


def parse(ptx: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)\s*\{(.*?)\n\}", ptx, re.S):
        name, params, body = m.group(1), m.group(2), m.group(3)
        names = re.findall(r"\.param\s+\.\w+\s+(\w+)", params)
        code: list[tuple[str | None, bool, str, list[str]]] = []
        labels: dict[str, int] = {}
        shared: dict[str, int] = {}
        at = _SHARED_BASE
        for raw in body.split("\n"):
            line = raw.split("//")[0].strip()
            if not line:
                continue
            if line.endswith(":"):
                labels[line[:-1]] = len(code)
                continue
            if line.startswith(".reg"):
                continue
            if line.startswith(".shared"):
                sm = re.match(r"\.shared\s+\.align\s+\d+\s+\.(\w+)\s+(\w+)\[(\d+)\];", line)
                assert sm, line
                shared[sm.group(2)] = at
                at += _WIDTH[sm.group(1)] // 8 * int(sm.group(3))
                continue
            assert line.endswith(";"), line
            line = line[:-1]
            pred, neg = None, False
            if line.startswith("@"):
                p, line = line.split(None, 1)
                neg = p.startswith("@!")
                pred = p[2:] if neg else p[1:]
            op, _, rest = line.partition(" ")
            operands = _split(rest)
            code.append((pred, neg, op, operands))
        entries[name] = Entry(name, names, code, labels, shared)
    return entries


def _split(rest: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _literal(text: str) -> int | None:
    m = re.fullmatch(r"(-?)(0[xX][0-9a-fA-F]+|\d+)U?", text)
    if not m:
        return None
    v = int(m.group(2), 0)
    return -v if m.group(1) else v


class Block:
    def __init__(self, entry: Entry, params: dict[str, int], ctaid: int, ntid: int) -> None:
        self.e, self.params, self.ctaid, self.ntid = entry, params, ctaid, ntid
        self.shared: dict[int, int] = {}
        self.threads = [Thread(i) for i in range(ntid)]

    def value(self, t: Thread, text: str, width: int) -> int:
        mask = (1 << width) - 1
        lit = _literal(text)
        if lit is not None:
            return lit & mask
        if text in ("%tid.x",):
            return t.tid
        if text == "%ntid.x":
            return self.ntid
        if text == "%ctaid.x":
            return self.ctaid
        if text in self.e.shared:
            return self.e.shared[text]
        if text not in t.regs:
            raise AssertionError(f"{self.e.name}: register {text} read before written (pc {t.pc})")
        return t.regs[text] & mask

    def address(self, t: Thread, text: str) -> int:
        inner = text.strip("[]").strip()
        m = re.fullmatch(r"([%\w]+)(?:\+(-?\d+))?", inner)
        assert m, text
        if m.group(1) in self.params:
            return self.params[m.group(1)]
        return (self.value(t, m.group(1), 64) + int(m.group(2) or 0)) % (1 << 64)

    def run(self) -> None:
        while True:
            for t in self.threads:
                self.step_until_sync(t)
            live = [t for t in self.threads if not t.done]
            if not live:
                return
            ops = {self.e.code[t.pc][2].split(".")[0] for t in live}
            if "shfl" in ops:
                self.shuffle(live)
            else:
                assert ops == {"bar"} and len(live) == self.ntid, f"{self.e.name}: barrier not reached by all ({ops})"
                for t in live:
                    t.pc += 1

    def shuffle(self, live: list[Thread]) -> None:
        warps: dict[int, list[Thread]] = {}
        for t in live:
            warps.setdefault(t.tid // 32, []).append(t)
        moved = False
        for lanes in warps.values():
            pcs = {t.pc for t in lanes}
            if len(lanes) != 32 or len(pcs) != 1 or not self.e.code[lanes[0].pc][2].startswith("shfl"):
                continue
            _, _, op, (d, a, b, c, m) = self.e.code[lanes[0].pc]
            assert op == "shfl.sync.down.b32" and _literal(m) == 0xFFFFFFFF and _literal(c) == 31, op
            src = [self.value(t, a, 32) for t in lanes]
            for lane, t in enumerate(lanes):
                j = lane + self.value(t, b, 32)
                t.regs[d] = src[j] if j <= 31 else src[lane]
                t.pc += 1
            moved = True
        assert moved, f"{self.e.name}: a warp's lanes diverged at shfl.sync"

    def step_until_sync(self, t: Thread) -> None:
        code = self.e.code
        while not t.done:
            pred, neg, op, o = code[t.pc]
            if pred is not None and bool(t.regs[pred]) == neg:
                t.pc += 1
                continue
            if op.startswith(("shfl.", "bar.")):
                return
            t.pc = self.execute(t, op, o)

    def execute(self, t: Thread, op: str, o: list[str]) -> int:
        parts = op.split(".")
        base, ty = parts[0], parts[-1]
        w = _WIDTH.get(ty, 64)
        mask = (1 << w) - 1
        nxt = t.pc + 1
        v = self.value
        if base == "ret":
            t.done = True
        elif base == "bra":
            return self.e.labels[o[0]]
        elif op in ("ld.param.u64",):
            t.regs[o[0]] = self.address(t, o[1])
        elif op == "cvta.to.global.u64":
            t.regs[o[0]] = v(t, o[1], 64)
        elif base == "mov" and o[0].startswith("{"):
            lo, hi = (x.strip() for x in o[0].strip("{}").split(","))
            x = v(t, o[1], 64)
            t.regs[lo], t.regs[hi] = x & 0xFFFFFFFF, x >> 32
        elif base == "mov" and o[1].startswith("{"):
            lo, hi = (x.strip() for x in o[1].strip("{}").split(","))
            t.regs[o[0]] = v(t, lo, 32) | (v(t, hi, 32) << 32)
        elif base == "mov":
            t.regs[o[0]] = v(t, o[1], w)
        elif op == "mul.wide.u32":
            t.regs[o[0]] = v(t, o[1], 32) * v(t, o[2], 32)
        elif base in ("add", "sub", "xor", "or", "and", "min") and ty != "pred":
            a, b = v(t, o[1], w), v(t, o[2], w)
            assert not ty.startswith("s") or base in ("add", "sub"), op  # signed min/compare: not modelled
            r = {"add": a + b, "sub": a - b, "xor": a ^ b, "or": a | b, "and": a & b, "min": min(a, b)}[base]
            t.regs[o[0]] = r & mask
        elif op == "or.pred":
            t.regs[o[0]] = int(bool(t.regs[o[1]]) or bool(t.regs[o[2]]))
        elif op in ("mul.lo.u64", "mul.lo.s64", "mul.lo.u32"):
            t.regs[o[0]] = (v(t, o[1], w) * v(t, o[2], w)) & mask
        elif base == "shl":
            s = v(t, o[2], 32)
            t.regs[o[0]] = (v(t, o[1], w) << s) & mask if s < w else 0
        elif base == "shr":
            assert ty[0] in "ub", op  # logical only
            s = v(t, o[2], 32)
            t.regs[o[0]] = v(t, o[1], w) >> s if s < w else 0
        elif base == "setp":
            cmp, ty = parts[1], parts[2]
            assert ty[0] in "ub", op
            a, b = v(t, o[1], _WIDTH[ty]), v(t, o[2], _WIDTH[ty])
            t.regs[o[0]] = int({"ge": a >= b, "gt": a > b, "lt": a < b, "le": a <= b, "eq": a == b, "ne": a != b}[cmp])
        elif base == "cvt":
            dst, src = _WIDTH[parts[1]], _WIDTH[parts[2]]
            assert parts[1][0] == "u" and parts[2][0] == "u", op
            t.regs[o[0]] = v(t, o[1], src) & ((1 << dst) - 1)
        elif base == "ld":
            addr = self.address(t, o[1])
            if parts[1] == "shared":
                assert addr in self.shared, f"{self.e.name}: shared {addr:#x} read before written (a missing barrier?)"
                t.regs[o[0]] = self.shared[addr]
            else:
                assert parts[1] in ("global",) or len(parts) == 2, op
                t.regs[o[0]] = _read(addr, w)
        elif base == "st":
            addr = self.address(t, o[0])
            if parts[1] == "shared":
                assert w == 64 and addr % 8 == 0
                self.shared[addr] = v(t, o[1], w)
            else:
                _write(addr, w, v(t, o[1], w))
        elif op == "atom.global.add.u64":
            addr = self.address(t, o[1])
            old = _read(addr, 64)
            _write(addr, 64, (old + v(t, o[2], 64)) & mask)
            t.regs[o[0]] = old
        else:
            raise NotImplementedError(f"{self.e.name}: {op} {o}")
        return nxt


_CT = {8: ctypes.c_uint8, 16: ctypes.c_uint16, 32: ctypes.c_uint32, 64: ctypes.c_uint64}


def _read(addr: int, width: int) -> int:
    assert addr % (width // 8) == 0, f"unaligned {width}-bit load at {addr:#x}"
    return int(_CT[width].from_address(addr).value)


def _write(addr: int, width: int, value: int) -> None:
    assert addr % (width // 8) == 0, f"unaligned {width}-bit store at {addr:#x}"
    _CT[width].from_address(addr).value = value


def launch(ptx: str, name: str, grid: int, threads: int, args: list[int]) -> None:
    """Run entry `name` of `ptx` over `grid` blocks of `threads` threads, with 64-bit `args`."""
    entry = parse(ptx)[name]
    params = dict(zip(entry.params, args, strict=True))
    for b in range(grid):
        Block(entry, params, b, threads).run()
