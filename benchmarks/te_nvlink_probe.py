"""Probe: can this Mooncake build register CUDA memory for its intra-node NVLink transport?

Tries register_memory on device memory with a few locations and environments and prints the
return codes; Mooncake's own log lines go to stderr. Diagnostic, run on a GPU host.
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    os.environ.update({"MC_INTRANODE_NVLINK": "1", "MC_INTRA_NVLINK": "1"})
    if len(sys.argv) > 1 and sys.argv[1] == "ipc":
        os.environ["MC_USE_NVLINK_IPC"] = "1"
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    print("initialize", e.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink_intra", ""), flush=True)
    for dev in range(torch.cuda.device_count()):
        torch.cuda.set_device(dev)
        t = torch.empty(64 << 20, dtype=torch.uint8, device=f"cuda:{dev}")
        for location in ("*", f"cuda:{dev}", ""):
            try:
                rc = e.register_memory(t.data_ptr(), t.numel(), location)
            except TypeError:
                rc = e.register_memory(t.data_ptr(), t.numel())
            print(f"cuda:{dev} location {location!r}: register rc {rc}", flush=True)
            if rc == 0:
                print("  unregister rc", e.unregister_memory(t.data_ptr()), flush=True)
    host = torch.empty(1 << 20, dtype=torch.uint8)
    print("host register rc", e.register_memory(host.data_ptr(), host.numel(), "cpu:0"), flush=True)
    print([n for n in dir(e) if not n.startswith("_")])


if __name__ == "__main__":
    main()
