"""Host time of `ModelRunner.prepare` for a steady decode batch, without running a step.

    python -m benchmarks.prepare_host_time --num-seqs 256 --num-seqs 1024

A tiny random model (the step programs are never built): --num-seqs sequences of --context
tokens join the runner's batch in one message, then each timed message decodes one more token
of each, as in steady async scheduling (every input token is read on device from the previous
step's samples), with a new page for each sequence every page_size steps. Prints the mean, the
median and the maximum (a step that gives every sequence a page) of --steps calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax.numpy as jnp

from pjllm.config import ModelConfig
from pjllm.kernels.ops import AttentionBackend
from pjllm.models.loader import build_model
from pjllm.runner.model_runner import ModelRunner
from pjllm.sampling_params import SamplingParams
from pjllm.scheduler_output import NewSequence, SchedulerOutput

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1 << 20, "eos_token_id": 2}


def measure(num_seqs: int, context: int, max_model_len: int, page_size: int, steps: int) -> list[float]:
    """Seconds of each timed `prepare` call."""
    config = ModelConfig.from_hf_config(TINY)
    pages_per_seq = -(-(context + steps) // page_size)
    runner = ModelRunner(config, *build_model(config, jnp.float32, "dummy", "", 0),
                         num_pages=num_seqs * pages_per_seq, page_size=page_size,
                         max_model_len=max_model_len, max_num_seqs=num_seqs,
                         max_num_batched_tokens=max(num_seqs, 256), dtype=jnp.float32,
                         attention=AttentionBackend("reference"), max_logprobs=0)
    params = SamplingParams(temperature=0.8, top_k=50, seed=1)
    ids = list(range(num_seqs))
    held = -(-context // page_size)
    new = [NewSequence(i, list(range(3, context + 3)), context - 16, context - 1, params, 7, 0, (2,),
                       list(range(i * pages_per_seq, i * pages_per_seq + held))) for i in ids]
    runner.prepare(SchedulerOutput(False, [], new, {}, ids, [1] * num_seqs))
    times = []
    for position in range(context, context + steps):
        pages = {}
        if position % page_size == 0:
            pages = {i: [i * pages_per_seq + held] for i in ids}
            held += 1
        message = SchedulerOutput(False, [], [], pages, ids, [1] * num_seqs)
        start = time.perf_counter()
        runner.prepare(message)
        times.append(time.perf_counter() - start)
    runner.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, action="append", help="repeatable; default 256, 1024")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    for num_seqs in args.num_seqs or [256, 1024]:
        times = measure(num_seqs, args.context, args.max_model_len, args.page_size, args.steps)
        print(f"{num_seqs:5d} sequences: prepare {statistics.mean(times) * 1e3:.3f} ms mean, "
              f"{statistics.median(times) * 1e3:.3f} ms median, {max(times) * 1e3:.3f} ms max "
              f"(a new page for each)")


if __name__ == "__main__":
    main()
