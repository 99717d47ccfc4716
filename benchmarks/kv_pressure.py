"""Two KV-memory measurements on a GPU, one engine per setting (random weights, EOS ignored,
every step program compiled before anything is timed).

    python -m benchmarks.kv_pressure itl benchmarks/configs/llama-3-8b.json --output-json itl.json
    python -m benchmarks.kv_pressure preemption benchmarks/configs/llama-3-8b.json \
        --num-pages 2048 --output-json preemption.json

itl: inter-token latency of 64 running decodes while one 8,191-token prompt is prefilled (with
     its one output token, Llama-3-8B's whole 8,192-token context),
     chunked (a 2,048-token step budget: the prompt goes in four chunks beside the decodes) and
     unchunked (a budget that takes the whole prompt in one step). Latencies are the gaps
     between a decode's consecutive tokens reaching the host, from the step that starts the
     prompt to the one that gives its first token.
preemption: throughput of `chat` requests on a KV cache too small for them (--num-pages), with
     preemption by recompute and by swap to host memory (prefix caching off, so a readmitted
     request gets its KV back only by recomputing or swapping it).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _engine(model: str, **kwargs):
    from pjllm import LLM

    return LLM(model, load_format="dummy", warmup="blocking", **kwargs)


def measure_itl(model: str, vocab: int, num_decodes: int, prompt_len: int,
                budgets: dict[str, int]) -> list[dict]:
    from pjllm import SamplingParams

    rng = np.random.default_rng(0)
    long_prompt = rng.integers(10, vocab - 10, prompt_len).tolist()
    decodes = [rng.integers(10, vocab - 10, 32).tolist() for _ in range(num_decodes)]
    records = []
    for name, budget in budgets.items():
        with _engine(model, max_model_len=max(prompt_len + 1, 32 + 1000),
                     max_num_batched_tokens=budget,
                     max_num_seqs=max(num_decodes + 1, 16)) as llm:
            engine = llm.engine
            params = SamplingParams(temperature=1.0, max_tokens=1000, ignore_eos=True)
            for index, prompt in enumerate(decodes):
                engine.add_request(f"d{index}", {"prompt_token_ids": prompt}, params)
            for _ in range(8):  # prefilled and decoding
                engine.step()
            engine.add_request("long", {"prompt_token_ids": long_prompt},
                               SamplingParams(max_tokens=1, ignore_eos=True))
            last_seen: dict[str, tuple[int, float]] = {}
            gaps, steps, start = [], 0, time.perf_counter()
            while True:
                outputs = engine.step()
                now = time.perf_counter()
                steps += 1
                done = False
                for output in outputs:
                    if output.request_id == "long":
                        done = done or bool(output.outputs[0].token_ids)
                        continue
                    count = len(output.outputs[0].token_ids)
                    seen = last_seen.get(output.request_id)
                    if seen is not None and count > seen[0]:
                        gaps.append((now - seen[1]) / (count - seen[0]))
                    if seen is None or count > seen[0]:
                        last_seen[output.request_id] = (count, now)
                if done:
                    break
            for request_id in list(engine.requests):
                engine.abort_request(request_id)
            gaps_ms = np.asarray(gaps) * 1e3
            record = {"setting": name, "max_num_batched_tokens": budget, "steps": steps,
                      "prefill_s": time.perf_counter() - start, "num_gaps": len(gaps),
                      "itl_p50_ms": float(np.percentile(gaps_ms, 50)),
                      "itl_p99_ms": float(np.percentile(gaps_ms, 99)),
                      "itl_max_ms": float(gaps_ms.max())}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def measure_preemption(model: str, vocab: int, num_pages: int, num_prompts: int,
                       exclude: set[int], max_num_seqs: int) -> list[dict]:
    from pjllm import SamplingParams
    from pjllm.bench.datasets import make_workload

    workload = make_workload("chat", vocab, num_prompts=num_prompts, exclude_ids=exclude)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True, seed=i)
              for i, r in enumerate(workload.requests)]
    records = []
    for mode in ("recompute", "swap"):
        with _engine(model, max_model_len=workload.max_total_len, num_pages=num_pages,
                     preemption_mode=mode, enable_prefix_caching=False,
                     max_num_seqs=max_num_seqs) as llm:
            scheduler = llm.engine.scheduler
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            record = {"preemption_mode": mode, "num_pages": num_pages, "elapsed_s": elapsed,
                      "output_tokens": tokens, "output_tok_s": tokens / elapsed,
                      "num_preemptions": scheduler.num_preemptions, "num_swaps": scheduler.num_swaps}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measurement", choices=["itl", "preemption"])
    parser.add_argument("model")
    parser.add_argument("--num-decodes", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=8191)
    parser.add_argument("--chunked-budget", type=int, default=2048)
    parser.add_argument("--num-pages", type=int, default=2048)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    import pjllm
    from pjllm.bench.datasets import special_token_ids
    from pjllm.models.weights import load_hf_config

    hf_config = load_hf_config(args.model)
    vocab = hf_config["vocab_size"]
    if args.measurement == "itl":
        budgets = {"chunked": args.chunked_budget,
                   "unchunked": args.prompt_len + args.num_decodes}
        runs = measure_itl(args.model, vocab, args.num_decodes, args.prompt_len, budgets)
    else:
        runs = measure_preemption(args.model, vocab, args.num_pages, args.num_prompts,
                                  special_token_ids(hf_config), args.max_num_seqs)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"pjllm": pjllm.__file__, "model": args.model, "measurement": args.measurement,
                       "args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
