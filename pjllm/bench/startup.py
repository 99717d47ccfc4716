"""`pjllm bench startup`: time from process start to first token, cold and warm.

A fresh Python process is started twice with the same engine options: first with an empty
compilation cache folder (a new temporary one), then again with that folder, now filled. Each
child reports, from its launch (wall clock, measured by the parent):

    interpreter  python itself up                  import       `import pjllm` (and jax)
    weights      weights built or read onto device rest         the rest of `LLM(...)` (config,
    first token  `generate(one prompt, max_tokens=1)`            tokenizer, KV cache allocation)
    total        launch to first token
    all programs launch until the warmup has compiled every step program; `compile s` is the
                 warmup's own wall time, `lowering s` its tracing and lowering part
    programs     step programs built by then (token buckets: `buckets`); `from store` of them
                 loaded from the compiled program store (`<compilation cache>/pjllm-programs`,
                 which the cold run fills), neither traced nor lowered nor compiled

With the engine's default warmup (`auto`: in the background on GPU) the first token waits only
for the one program its step needs. The split is the engine's own `startup_timings`.
benchmarks/compare_hf.py starts HF transformers the same way beside pjllm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from pjllm.bench.options import (add_engine_args, add_model_args, add_output_args, construct_llm,
                                 engine_kwargs, load_hf_config, resolve_model)
from pjllm.bench.report import environment, print_table, write_json

COLUMNS = [("backend", "backend", ""), ("cache", "compilation cache", ""),
           ("interpreter_s", "interpreter s", ".2f"), ("import_s", "import s", ".2f"),
           ("weights_s", "weights s", ".2f"), ("rest_s", "rest s", ".2f"),
           ("first_token_s", "first token s", ".3f"),
           ("total_s", "total s", ".2f"), ("all_programs_s", "all programs s", ".2f"),
           ("num_buckets", "buckets", "d"), ("num_programs", "programs", "d"),
           ("programs_loaded", "from store", "d"), ("compile_s", "compile s", ".2f"),
           ("lower_s", "lowering s", ".2f")]
# Run with `python -c`: notes when the interpreter is up, before anything of pjllm is imported.
_CHILD_BOOTSTRAP = ("import time; up = time.time(); import sys; "
                    "from pjllm.bench.startup import child_main; child_main(up, sys.argv[1], sys.argv[2])")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "startup", help="process start to first token, split into import, weights, compile, first step",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_engine_args(parser)
    parser.set_defaults(warmup="auto")  # what a user's process gets
    parser.add_argument("--input-len", type=int, default=128, help="tokens of the one prompt")
    add_output_args(parser)
    return parser


def child_main(up: float, spec_path: str, result_path: str) -> None:
    """In the child process: build the engine, generate one token, write the phase timings."""
    with open(spec_path) as f:
        spec = json.load(f)
    import pjllm
    from pjllm.bench.report import jax_device_info
    from pjllm.bench.timings import split_startup

    imported = time.time()
    llm, construct_s = construct_llm(spec["engine_kwargs"])
    timings = split_startup(llm.engine, construct_s)
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": spec["prompt_token_ids"]}, pjllm.SamplingParams(max_tokens=1, ignore_eos=True, seed=0),
                 use_tqdm=False)
    first_token_s = time.perf_counter() - start
    done = time.time()
    llm.engine.wait_for_warmup()
    warmed = time.time()
    warmup = llm.engine.startup_timings
    programs = llm.engine.model_runner.programs
    result = {"up": up, "imported": imported, "done": done, "warmed": warmed,
              "construct_s": timings.total_s, "weights_s": timings.weights_s, "rest_s": timings.rest_s,
              "first_token_s": first_token_s, "compile_s": warmup.get("compile_s"),
              "lower_s": warmup.get("lower_s"), "num_buckets": len(llm.engine.model_runner.buckets()),
              "num_programs": len(programs), "programs_loaded": programs.build_counts["loaded"],
              "device_info": jax_device_info()}
    with open(result_path, "w") as f:
        json.dump(result, f)


def run_child(bootstrap: str, spec: dict[str, Any], folder: str, label: str) -> tuple[float, dict[str, Any]]:
    """Runs `python -c bootstrap SPEC_PATH RESULT_PATH` in a fresh process, with `spec` written to
    SPEC_PATH in `folder`; returns its launch time and the result it wrote to RESULT_PATH."""
    spec_path = os.path.join(folder, f"{label}-spec.json")
    result_path = os.path.join(folder, f"{label}-result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    launched = time.time()
    completed = subprocess.run([sys.executable, "-c", bootstrap, spec_path, result_path])
    if completed.returncode != 0:
        raise RuntimeError(f"the {label} startup process exited with {completed.returncode}")
    with open(result_path) as f:
        return launched, json.load(f)


def table_row(backend: str, cache: str, launched: float, child: dict[str, Any]) -> dict[str, Any]:
    """One run's phases from its child's result (wall clock times, `launched` by the parent)."""
    return {"backend": backend, "cache": cache, "interpreter_s": child["up"] - launched,
            "import_s": child["imported"] - child["up"], "weights_s": child["weights_s"],
            "rest_s": child["rest_s"], "construct_s": child["construct_s"],
            "first_token_s": child["first_token_s"], "total_s": child["done"] - launched,
            "all_programs_s": child["warmed"] - launched if "warmed" in child else None,
            "compile_s": child.get("compile_s"), "lower_s": child.get("lower_s"),
            "num_buckets": child.get("num_buckets"), "num_programs": child.get("num_programs"),
            "programs_loaded": child.get("programs_loaded")}


def one_prompt(hf_config: dict[str, Any], input_len: int) -> list[int]:
    """The one prompt's token ids: the same for every engine that is started."""
    return np.random.default_rng(0).integers(0, hf_config["vocab_size"], input_len).tolist()


def pjllm_record(args: argparse.Namespace, model: str, prompt: list[int], folder: str) -> dict[str, Any]:
    """pjllm started twice in fresh processes, with an empty and then the filled compilation cache
    in `folder`."""
    if args.compilation_cache_dir is not None:
        raise ValueError("pjllm bench startup uses a fresh temporary compilation cache folder; "
                         "leave --compilation-cache-dir out")
    kwargs = engine_kwargs(args, model, args.input_len + 1)
    kwargs["compilation_cache_dir"] = os.path.join(folder, "xla-cache")
    spec = {"engine_kwargs": kwargs, "prompt_token_ids": prompt}
    rows = []
    for label in ("cold", "warm"):
        print(f"startup: pjllm, {label} compilation cache ...", flush=True)
        launched, child = run_child(_CHILD_BOOTSTRAP, spec, folder, label)
        rows.append(table_row("pjllm", label, launched, child))
        device_info = child["device_info"]
    # The parent never touches the device (jax would take GPU memory from the children).
    return {"backend": "pjllm", "model": model, "load_format": args.load_format, "input_len": args.input_len,
            "runs": rows,
            "settings": {k: v for k, v in kwargs.items() if k not in ("model", "compilation_cache_dir")},
            "env": environment(getattr(args, "cli_argv", None), lambda: device_info)}


def print_results(model: str, results: Sequence[dict[str, Any]]) -> None:
    print_table(f"startup to first token: {model}", [row for record in results for row in record["runs"]],
                COLUMNS)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args)
    hf_config = load_hf_config(model)  # fail here, not in the child, on a bad path
    with tempfile.TemporaryDirectory(prefix="pjllm-startup-") as folder:
        results = [pjllm_record(args, model, one_prompt(hf_config, args.input_len), folder)]
    print_results(model, results)
    write_json(args.output_json, {"benchmark": "startup", "results": results})
    return 0
