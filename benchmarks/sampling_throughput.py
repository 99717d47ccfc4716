"""Generate throughput of one engine by sampling mode: greedy, top-k 50 + top-p 0.95, top-p alone.

    python benchmarks/sampling_throughput.py benchmarks/configs/llama-3.2-1b.json --output-json out.json

Random-weight model from the config (`load_format="dummy"`), batches of 8 and 256 prompts of 64
random token ids, 128 new tokens each (EOS ignored); tok/s = batch x 128 / wall time of one
`LLM.generate`, the median of 3 after one untimed call that compiles the mode's program. Prefill
is included, so it measures the sampler's share of a whole generate, not a decode step alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

MODES = {"greedy": {"temperature": 0.0},
         "top_k50_top_p0.95": {"temperature": 0.8, "top_p": 0.95, "top_k": 50},
         "top_p0.95": {"temperature": 0.8, "top_p": 0.95}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, action="append", help="repeatable; default 8 and 256")
    parser.add_argument("--output-json")
    args = parser.parse_args()

    import pjllm
    from pjllm import LLM, SamplingParams

    rng = np.random.default_rng(0)
    results = {"pjllm": pjllm.__file__, "model": args.model, "rows": []}
    with LLM(args.model, load_format="dummy", max_model_len=192) as llm:
        vocab = llm.engine.model_config.vocab_size
        for mode, sampling in MODES.items():
            for batch in args.batch or [8, 256]:
                prompts = [{"prompt_token_ids": rng.integers(0, vocab, 64).tolist()} for _ in range(batch)]
                params = SamplingParams(max_tokens=128, ignore_eos=True, seed=1, **sampling)
                llm.generate(prompts, params, use_tqdm=False)
                rates = []
                for _ in range(3):
                    start = time.perf_counter()
                    llm.generate(prompts, params, use_tqdm=False)
                    rates.append(batch * 128 / (time.perf_counter() - start))
                results["rows"].append({"mode": mode, "batch": batch, "tok_s": statistics.median(rates),
                                        "tok_s_all": rates})
                print(f"{mode:>18} batch {batch:>4}: {statistics.median(rates):9.0f} tok/s", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
