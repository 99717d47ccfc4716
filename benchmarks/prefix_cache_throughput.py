"""Prefix caching on a GPU: generate throughput with caching on and off, with and without a
shared system prompt, and the pages that n = 4 sequences of one prompt hold.

    python -m benchmarks.prefix_cache_throughput benchmarks/configs/llama-3-8b.json \
        --output-json out.json

Random-weight model (`load_format="dummy"`), EOS ignored, warmup run to completion before
anything is timed. For caching on, then off (one engine each, built in turn):
  chat     the `chat` workload (1,000 requests): no prompt shares a prefix, so caching only costs;
  shared   the same requests, each prompt after one 1,024-token system prompt;
each one `LLM.generate`, timed by wall clock, after an untimed pass over a few other requests
(for `shared`, after the system prompt: with caching on it is then cached, as on a running
server). --workloads, --repeats and --caching pick what runs.
Then, caching on and off: the pages held once the four prefills of one request with n = 4 and a
2,000-token prompt are scheduled, against four separate prompts' worth.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--system-prompt-len", type=int, default=1024)
    parser.add_argument("--output-json")
    parser.add_argument("--num-pages", type=int, help="KV pages (default: from memory)")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--workloads", default="chat,shared", help="comma-separated: chat, shared")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each workload")
    parser.add_argument("--caching", default="on,off", help="engines to run: on, off or both")
    args = parser.parse_args()

    import pjllm
    from pjllm import LLM, SamplingParams
    from pjllm.bench.datasets import make_workload, special_token_ids
    from pjllm.models.weights import load_hf_config

    hf_config = load_hf_config(args.model)
    excluded = special_token_ids(hf_config)
    workload = make_workload("chat", hf_config["vocab_size"], num_prompts=args.num_prompts,
                             exclude_ids=excluded)
    rng = np.random.default_rng(1)
    allowed = np.setdiff1d(np.arange(hf_config["vocab_size"]), list(excluded))
    system = rng.choice(allowed, args.system_prompt_len).tolist()
    prompts = {"chat": [r.prompt_token_ids for r in workload.requests]}
    prompts["shared"] = [system + p for p in prompts["chat"]]
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True, seed=i)
              for i, r in enumerate(workload.requests)]
    max_model_len = max(workload.max_total_len + args.system_prompt_len, 2048)
    record = {"pjllm": pjllm.__file__, "model": args.model, "dataset": "chat",
              "num_prompts": len(workload.requests), "workload_digest": workload.digest(),
              "system_prompt_len": args.system_prompt_len, "runs": [], "n4_pages": {}}
    long_prompt = rng.choice(allowed, 2000).tolist()
    for caching in [{"on": True, "off": False}[c] for c in args.caching.split(",")]:
        start = time.perf_counter()
        with LLM(args.model, load_format="dummy", warmup="blocking", max_model_len=max_model_len,
                 enable_prefix_caching=caching, num_pages=args.num_pages,
                 max_num_seqs=args.max_num_seqs) as llm:
            construct_s = time.perf_counter() - start
            for name in [w for w in args.workloads.split(",") for _ in range(args.repeats)]:
                # Untimed: 8 requests of random prompts (after the system prompt for `shared`),
                # so nothing of the timed prompts is cached but the system prompt.
                llm.reset_prefix_cache()
                head = system if name == "shared" else []
                warm = [{"prompt_token_ids": head + rng.choice(allowed, 200).tolist()}
                        for _ in range(8)]
                llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
                manager = llm.engine.kv_cache_manager
                before = (manager.num_queried_tokens, manager.num_hit_tokens)
                start = time.perf_counter()
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[name]], params,
                                       use_tqdm=False)
                elapsed = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                run = {"workload": name, "prefix_caching": caching, "elapsed_s": elapsed,
                       "output_tokens": tokens, "output_tok_s": tokens / elapsed,
                       "prompt_tokens": sum(map(len, prompts[name])),
                       "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                       "queried_tokens": manager.num_queried_tokens - before[0],
                       "hit_tokens": manager.num_hit_tokens - before[1],
                       "construct_s": construct_s}
                record["runs"].append(run)
                print(json.dumps(run), flush=True)
            llm.reset_prefix_cache()
            engine = llm.engine
            engine.add_request("n4", {"prompt_token_ids": long_prompt},
                               SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=1,
                                              ignore_eos=True))
            engine.step()  # schedules the four prefills (8,000 tokens: one step's budget)
            held = manager.num_pages - manager.num_free_pages
            while engine.has_unfinished_requests():
                engine.step()
            record["n4_pages"]["on" if caching else "off"] = {
                "pages_held": held, "page_size": engine.config.page_size,
                "separate_prompts_pages": 4 * -(-2000 // engine.config.page_size)}
            print(json.dumps({"n4": caching, "pages_held": held}), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
