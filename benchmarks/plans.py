"""What a copy plan costs to check against what it saves, per call, at many tensors (no daemon).

    python benchmarks/plans.py --tensors 90000              # host tensors
    python benchmarks/plans.py --tensors 90000 --device cuda:0 --gb 20

Rows, medians of --runs in one process over the same DeepSeek-like tensors (separate
allocations, shuffled): `describe` (what every put/load_into paid per call before plans), the
`Snapshot` a plan is made with (take) and a kept plan is checked with (holds; and the older
take + compare), and the `nn.Module` walk (`state_dict()`, `state_dict(keep_vars=True)` with
the collector paused, and `sdk.modules.state_tensors`, as `load_into`, `put` and `publish` walk
a module). Ratios are against `describe` measured in the same run.
On a GPU also the batched copy of a plan's table (every tensor into a separate target, the
table prepared once, as a kept plan runs it) against one flat copy of the same bytes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import deepseek_shapes, median_seconds
from rl_sync import module_of, tensors_of

from sdk.modules import state_tensors
from tensord_contract.bulk import paused_gc
from tensord_dataplane.snapshot import Snapshot
from tensord_dataplane.tensors import describe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=90_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--gb", type=float, default=0.0, help="set size (default: 64 B a tensor)")
    args = p.parse_args()
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9) or 64 * args.tensors)
    tensors = tensors_of(shapes, args.device, seed=1)
    values = list(tensors.values())
    print(f"{len(values)} tensors on {args.device}; median of {args.runs}; ratio to describe (lower is better)")
    limit = median_seconds(lambda: describe(values), args.runs)

    def show(label: str, seconds: float) -> None:
        print(f"  {label:<58} {seconds * 1e3:9.1f} ms  {seconds / limit:6.2f}x", flush=True)

    show("describe (every call, before plans)", limit)
    kept = Snapshot.take(values)
    assert kept is not None
    show("snapshot: take (a plan's first call)", median_seconds(lambda: Snapshot.take(values), args.runs))
    show(
        "snapshot: take + compare columns (without torch's guard)",
        median_seconds(lambda: kept.same(Snapshot.take(values)), args.runs),
    )
    show(
        "snapshot: holds (a kept plan's check: guard + pointers)", median_seconds(lambda: kept.holds(values), args.runs)
    )
    show(
        "describe given the snapshot (a plan's first call)",
        median_seconds(lambda: describe(values, known=kept), args.runs),
    )
    model = module_of(tensors)
    show("module.state_dict() walk", median_seconds(model.state_dict, args.runs))

    def walk() -> object:
        with paused_gc():
            return model.state_dict(keep_vars=True)

    show("module.state_dict(keep_vars=True), collector paused", median_seconds(walk, args.runs))
    show(
        "sdk.modules.state_tensors (put/load_into(module) walk)",
        median_seconds(lambda: state_tensors(model), args.runs),
    )
    if args.device.startswith("cuda"):
        copy_rows(tensors, args)


def copy_rows(tensors: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    from tensord_dataplane.copy import copy_table, engine_name

    src = list(tensors.values())
    dst = [torch.empty_like(t) for t in src]
    cols = [
        np.fromiter((t.data_ptr() for t in dst), np.int64),
        np.fromiter((t.data_ptr() for t in src), np.int64),
        np.array([t.nbytes for t in src], np.int64),
    ]
    for c in cols:
        c.flags.writeable = False
    nbytes = int(cols[2].sum())
    flat = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
    one = median_seconds(lambda: flat.clone(), args.runs)
    table = copy_table(*cols)
    many = median_seconds(lambda: table.run(args.device), args.runs)
    print(
        f"  {nbytes / 1e9:.2f} GB: one flat copy {one * 1e3:.2f} ms; the plan's batched copy ({engine_name()}) "
        f"{many * 1e3:.2f} ms = {many / one:.2f}x the flat copy",
        flush=True,
    )


if __name__ == "__main__":
    main()
