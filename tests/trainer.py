"""A stand-in RL trainer as its own process: the real all-MiniLM-L6-v2 weights, one "training
step" away (seeded noise on every weight matrix), put into tensord or written as a checkpoint.

    python -m tests.trainer put NAME --seed S       # sdk.put (TENSORD_SOCKET); prints the version
    python -m tests.trainer save FILE --seed S      # the same weights as a .safetensors file

Seed 0 gives the original weights.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file, save_file

import sdk
from tests.daemons import WEIGHTS


def weights(seed: int) -> dict[str, torch.Tensor]:
    tensors = load_file(WEIGHTS)
    if seed == 0:
        return tensors
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in sorted(tensors.items()):
        if t.is_floating_point() and t.dim() == 2:
            t = t + 0.02 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        out[key] = t.contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["put", "save"])
    parser.add_argument("target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    w = weights(args.seed)
    if args.action == "put":
        print(sdk.put(args.target, w))
    else:
        save_file(w, args.target)


if __name__ == "__main__":
    main()
