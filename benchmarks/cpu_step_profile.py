"""Where a CPU decode step of the default model goes: the step program's XLA ops by kind.

    python benchmarks/cpu_step_profile.py --batch 1 --batch 8 --sampled
    taskset -c 1 python benchmarks/cpu_step_profile.py --batch 8     # one thread: ops add up

Builds `pjllm.LLM` with its CPU defaults, runs --batch requests of the prompt of
benchmarks/cpu_decode.py to --context tokens, then takes that steady decode batch and
1. times engine steps (host work included) and the compiled step program alone on it,
2. traces --steps runs of the program with the JAX profiler and sums the time of its XLA ops
   by kind: the decoder layers' matmuls (by projection), the lm_head, attention (the loop over
   KV pages, its gathers included), the KV write, the sampler, and the rest.
With more than one XLA thread, ops overlap and their times add up to more than the wall time;
pin the process to one CPU (taskset) for a table whose rows add up to the step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from cpu_decode import MODES, PROMPT, default_model_path

# Op kinds, first match wins, on an op's HLO metadata op_name (matmuls go by their output width
# first: `matmul_widths`).
KINDS = [
    ("attention", lambda op: "_decoder_layer" in op and "/while" in op),
    ("kv write", lambda op: "_decoder_layer" in op and re.search(r"scatter|dynamic.update", op)),
    ("o, down matmuls", lambda op: "_decoder_layer" in op and "dot_general" in op),
    ("lm_head matmul", lambda op: "me,ve->mv" in op),
    ("other layer ops (norms, rope, residuals)", lambda op: "_decoder_layer" in op),
    ("sampler, embedding, final norm", lambda op: True),
]


def instructions(hlo_text: str) -> dict[str, tuple[list[int], str, str]]:
    """HLO instruction name -> (result dims, opcode, metadata op_name or "")."""
    found = {}
    # The result is an array (f32[8,576]{1,0}) or a tuple of them (a loop's state).
    for m in re.finditer(r"%([\w.\-]+) = (?:\w+\[([\d,]*)\]\S*|\(.*?\)) ([\w\-]+)\(([^\n]*)",
                         hlo_text):
        op = re.search(r'op_name="([^"]*)"', m.group(4))
        found[m.group(1)] = ([int(d) for d in (m.group(2) or "").split(",") if d], m.group(3),
                             op.group(1) if op else "")
    return found


def loop_instructions(hlo_text: str) -> set[str]:
    """Names of the instructions inside while-loop bodies and conditions (nested ones too)."""
    computations = {}  # computation name -> (its instruction names, computations it calls)
    for block in re.finditer(r"^(?:ENTRY )?%([\w.\-]+) \(.*?\{\n(.*?)^\}", hlo_text, re.S | re.M):
        body = block.group(2)
        computations[block.group(1)] = (set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) =", body, re.M)),
                                        set(re.findall(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)",
                                                       body)))
    pending = [name for _, (_, calls) in computations.items() for name in calls
               if re.search(rf"(?:body|condition)=%{re.escape(name)}\b", hlo_text)]
    seen, names = set(), set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        names |= computations[name][0]
        pending.extend(computations[name][1])
    return names


def kind_times(trace_dir: str, hlo_text: str, runs: int, widths: dict[int, str]) -> dict[str, float]:
    """Milliseconds per program run of each op kind; ops inside a loop body count in their loop.
    `widths` names the model's matmuls by their output width."""
    path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))[-1]
    with gzip.open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    hlo = instructions(hlo_text)
    in_loops = loop_instructions(hlo_text)
    totals = collections.Counter()
    for event in events:
        if event["name"] not in hlo or event["name"] in in_loops:
            continue  # runtime events (executable launch, thunk executor), or inside a loop's event
        dims, opcode, op = hlo[event["name"]]
        if opcode == "dot" and dims and dims[-1] in widths:
            kind = widths[dims[-1]]
        elif not op and opcode == "dot":
            kind = "unattributed dots"
        elif not op:
            kind = "ops without metadata"
        else:
            kind = next(label for label, test in KINDS if test(op))
        totals[kind] += event["dur"]
    result = {label: totals[label] / runs / 1e3 for label, _ in KINDS}
    result.update({label: value / runs / 1e3 for label, value in totals.items() if label not in result})
    result["total"] = sum(result.values())
    return result


def matmul_widths(config) -> dict[int, str]:
    """Output width -> kind of the model's matmuls (every `Linear` is one 2-D matmul)."""
    qkv = config.num_kv_heads * (config.num_heads // config.num_kv_heads + 2) * config.head_dim
    return {qkv: "qkv matmul", 2 * config.intermediate_size: "gate/up matmul",
            config.hidden_size: "o, down matmuls", config.vocab_size: "lm_head matmul"}


def steady_batch(llm, batch: int, context: int, mode: dict):
    """Adds `batch` requests and steps the engine until every one has `context` tokens."""
    import pjllm

    engine = llm.engine
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", {"prompt_token_ids": prompt_ids},
                           pjllm.SamplingParams(max_tokens=100_000, ignore_eos=True, seed=i, **mode))
    for _ in range(context - len(prompt_ids)):
        engine.step()
    return engine


def profile(llm, batch: int, mode_name: str, context: int, steps: int) -> dict:
    import jax

    engine = steady_batch(llm, batch, context, MODES[mode_name])
    runner = engine.model_runner

    def time_steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            engine.step()
        return (time.perf_counter() - start) / count * 1e3

    step_ms = min(time_steps(steps) for _ in range(3))
    # The program alone, on the batch of the engine's next step (one more decode of each).
    dispatch, launched = runner.dispatch, []

    def capturing_dispatch(batch, variant):
        launched.append((batch, variant))
        return dispatch(batch, variant)

    runner.dispatch = capturing_dispatch
    engine.step()
    del runner.dispatch
    inputs, variant = launched[0]
    inputs = jax.device_put(inputs)
    program = runner.programs.get(("forward", inputs.token_ids.shape[0]))

    def run_program(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            handle = runner.dispatch(inputs, variant)
        jax.block_until_ready(handle.sampled)
        return (time.perf_counter() - start) / count * 1e3

    program_ms = min(run_program(steps) for _ in range(3))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            traced_ms = run_program(steps)
        kinds = kind_times(trace_dir, program.as_text(), steps, matmul_widths(engine.model_config))
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    # Work without an op event: the runtime between ops, and XLA:CPU's sort, which the profiler
    # does not show as an op when it runs on one thread. Meaningful on one thread only.
    kinds["program time in no op event"] = traced_ms - kinds["total"]
    return {"batch": batch, "mode": mode_name, "context": context, "engine_step_ms": step_ms,
            "program_ms": program_ms, "op_ms_by_kind": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--batch", type=int, action="append", help="repeatable; default 1 and 8")
    parser.add_argument("--sampled", action="store_true", help="also profile sampled decoding")
    parser.add_argument("--context", type=int, default=38,
                        help="tokens per sequence when profiled (38: the middle of a 64-token run)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    import pjllm

    llm = pjllm.LLM(args.model)
    modes = ["greedy", "sampled"] if args.sampled else ["greedy"]
    records = [profile(llm, batch, mode, args.context, args.steps)
               for mode in modes for batch in args.batch or [1, 8]]
    print(f"pjllm {pjllm.__file__}, jax {jax.__version__}, CPUs usable: {len(os.sched_getaffinity(0))}")
    labels = list(dict.fromkeys(label for r in records for label in r["op_ms_by_kind"]))
    header = "".join(f"{r['batch']:>6} {r['mode']:<8}" for r in records)
    print(f"{'ms per step':<42}{header}")
    for key in ("engine_step_ms", "program_ms"):
        print(f"{key:<42}" + "".join(f"{r[key]:>15.2f}" for r in records))
    for label in labels:
        print(f"{'  ' + label:<42}" + "".join(f"{r['op_ms_by_kind'].get(label, 0.0):>15.2f}"
                                              for r in records))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "cpus": len(os.sched_getaffinity(0)),
                       "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
