"""A real vLLM engine in its own process, driven by the engine tests (run it with the vLLM venv's
Python, .venv-vllm, from scripts/setup-vllm.sh).

    python tests/vllm_driver.py reference DIR [DIR ...]   # load each from its files, embed, print
    python tests/vllm_driver.py serve DIR OPTIONS_JSON [SETTINGS_JSON]  # load_format tensord (null: files)
    python tests/vllm_driver.py reference-tokens DIR [DIR ...]  # decoders: generate `PROMPTS`, print
    python tests/vllm_driver.py preflight DIR CASES_JSON  # engines that must fail before building

vLLM logs to stdout too, so every line of ours starts with `MARK`. `serve` prints ``MARK READY
{...}`` once the engine answers, then reads one JSON command a line on stdin and answers one
line ``MARK {...}`` (``{"error": "..."}`` on failure). Commands: ``{"op": "embed"}``, ``{"op": "answer"}``,
``{"op": "update", "name", "version"}``, ``{"op": "follow", "name", "after", "count",
"timeout"}``, ``{"op": "reload_files", "path"}`` (vLLM's own in-place reload from a directory),
``{"op": "reload"}`` (the same through the engine's loader), ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

MARK = "@tensord-test@ "

#: What the tests embed: short and long, so several positions and both paddings are used.
TEXTS = [
    "tensord keeps model weights in GPU memory",
    "a second, somewhat longer sentence about reinforcement learning and inference engines",
    "x",
]


#: Prompts (token ids) the decoder tests generate from, greedily.
PROMPTS = [[5, 17, 42, 99, 7], [300, 1, 250], [64]]
#: `serve`'s engine settings for a decoder (``GENERATE``) instead of an embedding model.
GENERATE = {"runner": "generate", "skip_tokenizer_init": True}


def engine(model_dir: str, **kw: Any) -> Any:
    from vllm import LLM

    settings: dict[str, Any] = {
        "runner": "pooling", "dtype": "float32", "enforce_eager": True, "max_model_len": 256,
        "gpu_memory_utilization": 0.1,
    }  # fmt: skip
    return LLM(model=model_dir, **(settings | kw))


def generate(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outs]


def answer(llm: Any) -> dict[str, Any]:
    """What the engine computes: embeddings, or generated tokens for a decoder."""
    if llm.llm_engine.model_config.runner_type == "generate":
        return {"tokens": generate(llm)}
    return {"embeddings": embed(llm)}


def embed(llm: Any) -> list[list[float]]:
    return [out.outputs.embedding for out in llm.embed(TEXTS, use_tqdm=False)]


def reference(dirs: list[str]) -> None:
    results = []
    for d in dirs:
        llm = engine(d)
        results.append(embed(llm))
        llm.llm_engine.engine_core.shutdown()
        del llm
    print(MARK + "RESULT " + json.dumps(results), flush=True)


def reference_tokens(dirs: list[str]) -> None:
    results = []
    for d in dirs:
        llm = engine(d, **GENERATE)
        results.append(generate(llm))
        llm.llm_engine.engine_core.shutdown()
        del llm
    print(MARK + "RESULT " + json.dumps(results), flush=True)


def preflight(model_dir: str, cases: list[dict[str, Any]]) -> None:
    """Start an engine with each loader config in `cases`, expecting each to fail: the error
    and the seconds it took, one ``MARK {...}`` line each (vLLM imported before the clock)."""
    import vllm  # noqa: F401

    for options in cases:
        start = time.perf_counter()
        try:
            engine(model_dir, load_format="tensord", model_loader_extra_config=options, **GENERATE)
            reply: dict[str, Any] = {"error": None}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply["seconds"] = time.perf_counter() - start
        print(MARK + json.dumps(reply), flush=True)


def serve(model_dir: str, options: dict[str, Any] | None, settings: dict[str, Any] | None = None) -> None:
    from sdk.engines import vllm as tv

    start = time.perf_counter()
    loading = {} if options is None else {"load_format": "tensord", "model_loader_extra_config": options}
    llm = engine(model_dir, weight_transfer_config={"backend": "tensord"}, **loading, **(settings or {}))
    ready = {"seconds": time.perf_counter() - start, **answer(llm)}
    print(MARK + "READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd.pop("op")
            if op == "quit":
                break
            if op == "embed":
                reply: dict[str, Any] = {"embeddings": embed(llm)}
            elif op == "answer":
                reply = answer(llm)
            elif op == "update":
                t = time.perf_counter()
                tv.update(llm, cmd["name"], cmd.get("version"))
                reply = {"weight_version": llm.get_weight_version(), "seconds": time.perf_counter() - t}
                if cmd.get("answer"):
                    reply |= answer(llm)
            elif op == "reload_files":  # vLLM's own in-place reload from a checkpoint directory
                t = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_path": cmd["path"]})
                reply = {"seconds": time.perf_counter() - t}
            elif op == "reload":  # vLLM's own in-place reload through the engine's loader
                llm.collective_rpc("reload_weights")
                reply = answer(llm)
            elif op == "follow":
                versions = []
                for v in tv.follow(llm, cmd["name"], after=cmd.get("after"), timeout=cmd.get("timeout", 60)):
                    versions.append(v)
                    if len(versions) >= cmd.get("count", 1):
                        break
                reply = {"versions": versions, "weight_version": llm.get_weight_version(), **answer(llm)}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # report to the test, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(MARK + json.dumps(reply), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode = sys.argv[1]
    if mode == "reference":
        reference(sys.argv[2:])
    elif mode == "reference-tokens":
        reference_tokens(sys.argv[2:])
    elif mode == "preflight":
        preflight(sys.argv[2], json.loads(sys.argv[3]))
    elif mode == "serve":
        serve(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.flush()
    os._exit(0)  # vLLM's atexit teardown can abort ("terminate called without an active exception")
