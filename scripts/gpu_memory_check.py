"""On a GPU: LLMs give their device memory back, and gpu_memory_utilization is a share of the device.

    python scripts/gpu_memory_check.py [--config benchmarks/configs/llama-3.2-1b.json] [--out DIR]

Checks, with random weights from a real config (bf16):
- two-processes: two processes at 0.4 each, started together, both answering.
- in-turn: three LLMs built one after another in one process, each dropped (`del` + gc) or shut
  down while its background warmup may still be compiling; each gets the same KV cache, and the
  device's bytes in use return to where they were.
- side-by-side: two LLMs at gpu_memory_utilization 0.4 in one process, both answering.
Prints one line per check and writes gpu_memory_check.json to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2**30
PROMPTS = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(8)]


def _build(config: str, utilization: float):
    import pjllm

    return pjllm.LLM(config, load_format="dummy", dtype="bfloat16", max_model_len=2048,
                     gpu_memory_utilization=utilization, warmup="background")


def _answer(llm) -> int:
    import pjllm

    params = pjllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def _in_use() -> int:
    import jax

    gc.collect()
    return jax.devices()[0].memory_stats()["bytes_in_use"]


def in_turn(config: str) -> dict:
    import jax

    baseline, runs = _in_use(), []
    for i, how in enumerate(("del", "shutdown", "del")):
        start = time.perf_counter()
        llm = _build(config, 0.9)
        tokens = _answer(llm)
        held = _in_use()
        pages = llm.engine.kv_cache_manager.num_pages
        if how == "shutdown":
            llm.shutdown()
        del llm
        runs.append({"llm": i, "freed_by": how, "num_pages": pages, "tokens": tokens,
                     "held_gib": held / GIB, "after_gib": _in_use() / GIB,
                     "live_arrays_after": len(jax.live_arrays()),
                     "seconds": time.perf_counter() - start})
    ok = (len({run["num_pages"] for run in runs}) == 1
          and all(abs(run["after_gib"] - baseline / GIB) < 0.01 for run in runs))
    return {"check": "in-turn", "ok": ok, "baseline_gib": baseline / GIB, "runs": runs}


def side_by_side(config: str) -> dict:
    from pjllm.runner.memory import device_total_memory
    import jax

    total = device_total_memory(jax.devices()[0])
    first, second = _build(config, 0.4), _build(config, 0.4)
    tokens = [_answer(first), _answer(second)]
    pages = [first.engine.kv_cache_manager.num_pages, second.engine.kv_cache_manager.num_pages]
    held = _in_use()
    first.shutdown()
    second.shutdown()
    return {"check": "side-by-side", "ok": all(tokens) and held < 0.85 * total,
            "device_gib": total / GIB, "held_gib": held / GIB, "num_pages": pages, "tokens": tokens}


def child(config: str) -> None:
    llm = _build(config, 0.4)
    tokens = _answer(llm)
    print(json.dumps({"tokens": tokens, "num_pages": llm.engine.kv_cache_manager.num_pages,
                      "in_use_gib": _in_use() / GIB}), flush=True)
    time.sleep(5)  # hold the memory while the other process runs too
    llm.shutdown()


def two_processes(config: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--config", config]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append({"returncode": proc.returncode, **(json.loads(lines[-1]) if lines else {})})
    ok = all(r["returncode"] == 0 and r.get("tokens") for r in results)
    return {"check": "two-processes", "ok": ok, "processes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks/configs/llama-3.2-1b.json"))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config)
        return
    import pjllm  # noqa: F401 - before jax starts its GPU backend: pjllm sets its allocator options

    records = []
    # Two processes first: a process keeps the memory its JAX allocator grew to (free for its own
    # later arrays, not for other processes), so this parent must not have used the GPU yet.
    for check in (two_processes, in_turn, side_by_side):
        try:
            record = check(args.config)
        except Exception as error:  # noqa: BLE001 - report and go on to the next check
            record = {"check": check.__name__, "ok": False, "error": repr(error)}
        records.append(record)
        print(json.dumps(record), flush=True)
    with open(os.path.join(args.out, "gpu_memory_check.json"), "w") as f:
        json.dump(records, f, indent=1)
    print("\n".join(f"{r['check']:>14}: {'ok' if r['ok'] else 'FAILED'}" for r in records))


if __name__ == "__main__":
    main()
