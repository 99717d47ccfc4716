"""On a GPU: the compiled program store round-trips, and may it keep programs read from XLA's cache?

    python scripts/gpu_executable_store_check.py [--config benchmarks/configs/llama-3.2-1b.json]
        [--max-num-batched-tokens 128]

Each step is a fresh process (random weights from --config, bf16, the default attention backend,
a blocking warmup of every step program), all in one new compilation cache folder:

1. cold: compiles every program (JAX's cache and pjllm's store both empty) and stores it.
2. warm: loads every program from the store; its tokens must be cold's.
3. from-xla-cache: the store emptied, JAX's cache kept: every program is read from JAX's cache,
   and (with RESERIALIZES_CACHED_PROGRAMS[platform] taken as True for this check) stored again
   from that copy.
4. warm-again: loads those copies. Same tokens as cold: such copies are whole on this platform,
   and RESERIALIZES_CACHED_PROGRAMS (runner/executable_store.py) may say True for it; a failure
   (a load error, an error at the first step, other tokens): leave it False.

On an H200 (jax 0.11.2, Pallas attention, a 2-layer random Llama, 13 programs) every step
passed: cold 9.5 s of warmup (6.3 s lowering), warm 0.7 s; CUDA is listed True. On CPU step 4
gives other tokens (the copies lack their compiled functions): CPU stays False.

Prints one line per step and the verdict last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 17)]


def child(config: str, folder: str, label: str, max_num_batched_tokens: int) -> None:
    """One engine start; prints its build counts, timings and tokens as one JSON line."""
    sys.path.insert(0, REPO)
    import pjllm
    from pjllm.runner import executable_store

    platform = executable_store.platform_name()
    if label == "from-xla-cache":  # what this script checks
        executable_store.RESERIALIZES_CACHED_PROGRAMS[platform] = True
    llm = pjllm.LLM(config, load_format="dummy", dtype="bfloat16", max_model_len=256,
                    max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens, seed=0,
                    compilation_cache_dir=folder, warmup="blocking", skip_tokenizer_init=True)
    sampled = pjllm.SamplingParams(temperature=0.8, seed=3, max_tokens=12, logprobs=2,
                                   ignore_eos=True)
    greedy = pjllm.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                  prompt_logprobs=1)
    tokens = [[c.token_ids for c in o.outputs]
              for params in (sampled, greedy) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    programs = llm.engine.model_runner.programs
    programs.wait_for_store_writes()
    print(json.dumps({"label": label, "platform": platform, "programs": len(programs),
                      "counts": programs.build_counts, "tokens": tokens,
                      "timings": {k: round(v, 2) for k, v in llm.engine.startup_timings.items()}}))


def run_step(config: str, folder: str, label: str, max_num_batched_tokens: int) -> dict | None:
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", label, "--config", config,
         "--folder", folder, "--max-num-batched-tokens", str(max_num_batched_tokens)],
        capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        print(f"{label}: failed (exit {completed.returncode})\n{completed.stderr[-3000:]}")
        return None
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks/configs/llama-3.2-1b.json"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=128,
                        help="the step's token budget (fewer: fewer programs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.folder, args.child, args.max_num_batched_tokens)
        return 0
    folder = tempfile.mkdtemp(prefix="pjllm-store-check-")
    results = {}
    try:
        for label in ("cold", "warm", "from-xla-cache", "warm-again"):
            if label == "from-xla-cache":
                shutil.rmtree(os.path.join(folder, "pjllm-programs"))
            result = run_step(args.config, folder, label, args.max_num_batched_tokens)
            if result is None:
                break
            results[label] = result
            print(f"{label}: {result['programs']} programs, {result['counts']}, "
                  f"{result['timings']}, tokens as cold: "
                  f"{result['tokens'] == results['cold']['tokens']}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cold = results.get("cold")
    round_trip = (cold is not None and "warm" in results
                  and results["warm"]["counts"]["loaded"] == cold["programs"]
                  and results["warm"]["tokens"] == cold["tokens"])
    again = results.get("warm-again")
    cached_copies_whole = (round_trip and again is not None
                           and again["counts"]["loaded"] == cold["programs"]
                           and again["tokens"] == cold["tokens"])
    print(f"store round trip: {'ok' if round_trip else 'FAILED'}; programs read from XLA's cache "
          f"serialize whole: {'yes' if cached_copies_whole else 'no'}"
          + (f" (RESERIALIZES_CACHED_PROGRAMS may list {cold['platform']!r}: True)"
             if cached_copies_whole else ""))
    return 0 if round_trip else 1


if __name__ == "__main__":
    sys.exit(main())
