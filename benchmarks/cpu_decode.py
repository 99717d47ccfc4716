"""CPU decode speed of the default model, pjllm against HF transformers, measured the same way.

    python benchmarks/cpu_decode.py --backend pjllm --output-json pjllm.json
    /path/to/torch-venv/bin/python benchmarks/cpu_decode.py --backend hf --output-json hf.json
    python benchmarks/cpu_decode.py --backend both --hf-python /path/to/torch-venv/bin/python \
        --output-json benchmarks/results/cpu-smollm2-decode.json

Both sides run the same GGUF file (the default model, SmolLM2-135M-Instruct Q4_1, dequantized to
float32 at load), the same prompt (token ids checked equal under --backend both), batch sizes 1
and 8 (the prompt repeated), greedy and sampled (temperature 0.8, top_p 0.95, top_k 50), EOS
ignored, on --threads CPU threads:

- pjllm: the public `pjllm.LLM` with the engine's defaults on CPU; XLA:CPU is limited to the
  threads through the process's CPU affinity (`os.sched_setaffinity`), which is what it sizes
  its thread pool by.
- hf: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` in float32, `model.generate`
  with its defaults (dynamic KV cache, sdpa attention), `torch.set_num_threads(threads)`. This
  side imports neither pjllm nor jax, so it runs in an interpreter that has torch only.

Steady-state decode rate: each repetition times a generate of 1 new token (prefill and the
first token) and one of --new-tokens tokens (the same prefill and first token, then
new_tokens - 1 decode steps); decode tok/s = batch x (new_tokens - 1) / (t_long - t_first).
The figure is the median of --repeats repetitions after one untimed warm-up repetition (which
also compiles pjllm's step programs). Output: a table and, with --output-json, JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

PROMPT = "The history of the Roman Empire"
MODES = {"greedy": {"temperature": 0.0},
         "sampled": {"temperature": 0.8, "top_p": 0.95, "top_k": 50}}


def default_model_path() -> str:
    """The cached default GGUF (pjllm's `resolve_default_model` downloads it when missing)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "pjllm", "models",
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def limit_threads(threads: int) -> None:
    """Pins this process to `threads` CPUs before any numeric library starts its pools."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads} but this process may use only {len(cpus)} CPUs")
    os.sched_setaffinity(0, cpus[:threads])


class PjllmSide:
    name = "pjllm"

    def __init__(self, model: str, threads: int):
        # Measure the checkout this script is in, whatever an editable install points at.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import jax

        import pjllm

        self._pjllm = pjllm
        self.llm = pjllm.LLM(model)
        self.prompt_ids = self.llm.get_tokenizer().encode(PROMPT)
        engine = self.llm.engine
        self.versions = {"pjllm": pjllm.__file__, "jax": jax.__version__,
                         "jax_backend": jax.default_backend(),
                         "xla_cpu_devices": len(jax.devices()),
                         "engine": {"dtype": str(engine.dtype), "max_model_len": engine.max_model_len,
                                    "max_num_seqs": engine.config.max_num_seqs,
                                    "attention_backend": engine.attention_backend,
                                    "token_buckets": engine.model_runner.token_buckets}}

    def generate(self, batch: int, new_tokens: int, mode: dict[str, Any], seed: int) -> list[list[int]]:
        params = [self._pjllm.SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=seed + i,
                                             **mode) for i in range(batch)]
        outputs = self.llm.generate([{"prompt_token_ids": self.prompt_ids}] * batch, params,
                                    use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def step_timings(self) -> dict[str, float]:
        import dataclasses

        return dataclasses.asdict(self.llm.engine.step_timings)


class HfSide:
    name = "hf"

    def __init__(self, model: str, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        folder, file = os.path.split(model)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                                       dtype=torch.float32)
        self.model.eval()
        # Never stop early (pjllm's ignore_eos): no EOS id at all, rather than min_new_tokens,
        # which would also ban EOS from the sampled distribution.
        self.model.generation_config.eos_token_id = None
        self.prompt_ids = self.tokenizer(PROMPT)["input_ids"]
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads(),
                         "attn_implementation": self.model.config._attn_implementation}

    def generate(self, batch: int, new_tokens: int, mode: dict[str, Any], seed: int) -> list[list[int]]:
        torch = self.torch
        input_ids = torch.tensor([self.prompt_ids] * batch)
        sampling = mode["temperature"] > 0
        kwargs = dict(do_sample=True, **mode) if sampling else dict(do_sample=False)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=new_tokens, min_new_tokens=None,
                                      pad_token_id=self.tokenizer.pad_token_id or 0, **kwargs)
        return out[:, len(self.prompt_ids):].tolist()

    def step_timings(self) -> None:
        return None


def measure(side, batch: int, mode_name: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    """One (batch, mode) row: the median decode rate of `repeats` timed pairs after a warm-up."""
    mode = MODES[mode_name]

    def timed(count: int, seed: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        tokens = side.generate(batch, count, mode, seed)
        elapsed = time.perf_counter() - start
        if any(len(row) != count for row in tokens):
            raise RuntimeError(f"{side.name} returned {[len(r) for r in tokens]} tokens, wanted {count}")
        return elapsed, tokens

    rates, firsts, longs = [], [], []
    tokens: list[list[int]] = []
    for rep in range(repeats + 1):
        first_s, _ = timed(1, seed=rep)
        long_s, tokens = timed(new_tokens, seed=rep)
        if rep == 0:  # warm-up
            continue
        firsts.append(first_s)
        longs.append(long_s)
        rates.append(batch * (new_tokens - 1) / (long_s - first_s))
    rate = statistics.median(rates)
    return {"backend": side.name, "batch": batch, "mode": mode_name,
            "decode_tok_s": rate, "ms_per_step": 1e3 * batch / rate,
            "decode_tok_s_all": rates, "first_s_all": firsts, "long_s_all": longs,
            "first_row_tokens": tokens[0]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    limit_threads(args.threads)
    side_class: Callable = {"pjllm": PjllmSide, "hf": HfSide}[args.backend]
    start = time.perf_counter()
    side = side_class(args.model, args.threads)
    load_s = time.perf_counter() - start
    rows = [measure(side, batch, mode, args.new_tokens, args.repeats)
            for mode in args.modes for batch in args.batch_sizes]
    return {"backend": side.name, "model": args.model, "prompt": PROMPT,
            "prompt_ids": side.prompt_ids, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "threads": args.threads, "load_s": load_s, "versions": side.versions,
            "step_timings": side.step_timings(), "rows": rows}


def run_both(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each backend in its own interpreter (pjllm: this one; hf: --hf-python), one after the other."""
    records = []
    for backend, python in (("pjllm", sys.executable), ("hf", args.hf_python)):
        cmd = [python, os.path.abspath(__file__), "--backend", backend, "--child",
               "--model", args.model, "--threads", str(args.threads),
               "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--modes", ",".join(args.modes),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
        records.append(json.loads(result.stdout.strip().splitlines()[-1]))
    if records[0]["prompt_ids"] != records[1]["prompt_ids"]:
        raise RuntimeError(f"the prompts differ: pjllm {records[0]['prompt_ids']}, "
                           f"hf {records[1]['prompt_ids']}")
    return records


def print_table(records: list[dict[str, Any]]) -> None:
    by_key = {(r["backend"], row["batch"], row["mode"]): row for r in records for row in r["rows"]}
    print(f"{'backend':>8} {'batch':>5} {'mode':>8} {'decode tok/s':>13} {'ms/step':>8} {'vs hf':>6}")
    for (backend, batch, mode), row in by_key.items():
        hf = by_key.get(("hf", batch, mode))
        ratio = f"{row['decode_tok_s'] / hf['decode_tok_s']:.2f}" if hf and backend != "hf" else ""
        print(f"{backend:>8} {batch:>5} {mode:>8} {row['decode_tok_s']:>13.1f} "
              f"{row['ms_per_step']:>8.1f} {ratio:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("pjllm", "hf", "both"), required=True)
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-python", default=sys.executable,
                        help="interpreter with torch and transformers, for --backend both")
    parser.add_argument("--output-json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one JSON line out
    args = parser.parse_args()
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"--modes must be among {sorted(MODES)}; got {sorted(unknown)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the decode rate needs a step after the first token)")

    if args.backend == "both":
        records = run_both(args)
    else:
        records = [run_side(args)]
        if args.child:
            print(json.dumps(records[0]))
            return
    print_table(records)
    if args.output_json:
        payload = {"benchmark": "cpu_decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "cpu": cpu_name(), "cpus_online": os.cpu_count(),
                   "load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv),
                   "results": records}
        with open(args.output_json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
