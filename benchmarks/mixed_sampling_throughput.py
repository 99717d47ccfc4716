"""Generate throughput with uniform against mixed per-request sampling settings, in one process.

    python -m benchmarks.mixed_sampling_throughput benchmarks/configs/llama-3-8b.json \
        --runs uniform,greedy,mixed,mixed --output-json out.json

Random-weight model (`load_format="dummy"`), the `chat` workload (1000 requests, EOS ignored),
the engine's startup warmup run to completion (`warmup="blocking"`) before anything is timed.
Each run is one `LLM.generate` of the whole workload, timed by wall clock:
  uniform  temperature 1.0 for every request (as `pjllm bench throughput`);
  greedy   temperature 0;
  mixed    per request, drawn from a fixed seed: temperature 0.7/0.8/1.0, top_k 0/20/50/100,
           top_p 1.0/0.9/0.95, min_p 0/0.05, logprobs none/0-5 (the mix a server sees);
  mixed-nolp   the same mix without logprobs;
  uniform-lp5  uniform with 5 logprobs for every request.
The last two split mixed's cost between its filters and its logprobs.
Running `mixed` twice shows whether the first run paid for compiles the second did not. The
record holds the number of compiled step programs and the process's resident memory after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mixed_params(count: int, output_lens: list[int], seed: int = 0,
                 with_logprobs: bool = True) -> list:
    from pjllm import SamplingParams

    rng = np.random.default_rng(seed)
    params = []
    for i in range(count):
        logprobs = int(rng.integers(-1, 6))
        params.append(SamplingParams(
            temperature=float(rng.choice([0.7, 0.8, 1.0])), top_k=int(rng.choice([0, 20, 50, 100])),
            top_p=float(rng.choice([1.0, 0.9, 0.95])), min_p=float(rng.choice([0.0, 0.05])),
            logprobs=logprobs if logprobs >= 0 and with_logprobs else None,
            max_tokens=output_lens[i], ignore_eos=True, seed=i))
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--runs", default="uniform,greedy,mixed,mixed")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    import pjllm
    from pjllm import LLM, SamplingParams
    from pjllm.bench.datasets import make_workload, special_token_ids
    from pjllm.models.weights import load_hf_config

    hf_config = load_hf_config(args.model)
    workload = make_workload("chat", hf_config["vocab_size"], num_prompts=args.num_prompts,
                             exclude_ids=special_token_ids(hf_config))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    output_lens = [r.output_len for r in workload.requests]
    record = {"pjllm": pjllm.__file__, "model": args.model, "dataset": "chat",
              "num_prompts": len(prompts), "workload_digest": workload.digest(),
              "expected_output_tokens": workload.num_output_tokens, "runs": []}
    start = time.perf_counter()
    with LLM(args.model, load_format="dummy", warmup="blocking", compilation_cache_dir=None,
             max_model_len=workload.max_total_len) as llm:
        record["construct_s"] = time.perf_counter() - start
        record["startup_timings"] = dict(llm.engine.startup_timings)
        programs = llm.engine.model_runner.programs
        record["programs_after_warmup"] = len(programs)
        for name in args.runs.split(","):
            if name in ("mixed", "mixed-nolp"):
                params = mixed_params(len(prompts), output_lens, with_logprobs=name == "mixed")
            else:
                temperature = {"uniform": 1.0, "greedy": 0.0, "uniform-lp5": 1.0}[name]
                logprobs = 5 if name == "uniform-lp5" else None
                params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True,
                                         seed=i, logprobs=logprobs)
                          for i, n in enumerate(output_lens)]
            llm.reset_prefix_cache()  # each run prefills its prompts, as the first did
            timings = llm.engine.step_timings
            before = (timings.steps, timings.host_s, timings.wait_s)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            # Host work against waiting for the device: whether a gap is the sampler's
            # device time or the host's per-token work (logprob entries, say).
            run = {"run": name, "elapsed_s": elapsed, "output_tokens": tokens,
                   "output_tok_s": tokens / elapsed, "programs": len(programs),
                   "resident_mib": resident_mib(), "steps": timings.steps - before[0],
                   "host_s": timings.host_s - before[1], "wait_s": timings.wait_s - before[2]}
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
