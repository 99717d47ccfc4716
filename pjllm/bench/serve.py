"""`pjllm bench serve`: an OpenAI-compatible server under load, measured from the client, like
`vllm bench serve`.

Each prompt is one streamed POST to --endpoint (/v1/completions) with `max_tokens` its output
length and, for the synthetic datasets, `ignore_eos` (vLLM's extra field), so every request
generates exactly its length. Requests arrive all at once (--request-rate inf, the default) or
as a Poisson process of --request-rate per second (--burstiness other than 1: gamma-distributed
gaps of the same mean, burstier below 1); --max-concurrency caps the requests in flight, the rest
wait for a slot after they arrive. One untimed test request (at most 16 tokens) checks the
server and warms it before the timed run.

Per request: time to first token (TTFT), the gaps between later token chunks (ITL), time per
output token TPOT = (e2e - TTFT) / (output tokens - 1), and the end-to-end time (e2e). Failed
requests (an HTTP error, an error in the stream, a stream cut short, --timeout) are counted and
their messages reported; they never stop the run. See pjllm.bench.completions_client for what
the server must send.

Synthetic prompts are token ids drawn from the served model's vocabulary: --model-config names
its HF directory, .gguf or config.json (default: the served model id, when that is a local path).
A --dataset-path JSONL file holds one object per line, {"prompt": text or token ids, optional
"output_len" or "max_tokens"}, and is sent as written (EOS honoured unless --ignore-eos).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Any, Sequence

import aiohttp
import numpy as np
from tqdm import tqdm

from pjllm.bench.completions_client import RequestOutcome, first_model_id, open_session, stream_completion
from pjllm.bench.datasets import RANDOM_DEFAULTS
from pjllm.bench.options import add_output_args, add_workload_args, build_workload, load_hf_config
from pjllm.bench.report import environment, write_json

DEFAULT_TIMEOUT_S = 6 * 3600     # a request's whole stream: generous, a long queue is no failure
MODELS_TIMEOUT_S = 60.0          # GET /v1/models answers at once or the server is not up
TEST_REQUEST_MAX_TOKENS = 16
DEFAULT_FILE_OUTPUT_LEN = RANDOM_DEFAULTS[2]
LATENCIES = (("ttft", "Time to First Token", "TTFT"),
             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"),
             ("e2e", "End-to-end Latency", "E2E"))
REDACTED_OPTIONS = ("--api-key",)  # kept out of the command a result records


@dataclasses.dataclass(frozen=True)
class ServeRequest:
    """One completion request: the prompt as sent (token ids or text) and its `max_tokens`."""

    prompt: list[int] | str
    output_len: int

    @property
    def prompt_len(self) -> int | None:
        """The prompt's token count; a text prompt's is known only from the server's usage."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible server under load: TTFT, TPOT, ITL, throughput",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None,
                        help="the server's root URL (default: http://HOST:PORT)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default="/v1/completions",
                        help="a completions endpoint: the request carries a prompt, not messages")
    server.add_argument("--model", default=None,
                        help="the model name requests carry (default: the first id of GET /v1/models)")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as a bearer token (default: $OPENAI_API_KEY)")
    server.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                        help="seconds one request may take, from sending it to the end of its stream, "
                             "before it counts as failed (default: %(default)s)")
    workload = parser.add_argument_group("workload")
    add_workload_args(workload, default_dataset=None)
    workload.add_argument("--dataset-path", default=None,
                          help="a JSONL file of prompts instead of --dataset; lines without an "
                               f"output length get --output-len (default {DEFAULT_FILE_OUTPUT_LEN})")
    workload.add_argument("--model-config", default=None,
                          help="the served model's HF directory, .gguf or config.json: synthetic "
                               "prompts draw token ids from its vocabulary, minus BOS/EOS/pad "
                               "(default: the served model id, when that is a local path)")
    workload.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=_positive_float, default=math.inf,
                      help="requests per second, Poisson arrivals (default inf: all at once)")
    load.add_argument("--burstiness", type=_positive_float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier, above "
                           "1 more regular")
    load.add_argument("--max-concurrency", type=_positive_int, default=None,
                      help="most requests in flight at once (default: no limit)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature (1.0, as `pjllm bench throughput`; 0 is greedy)")
    sampling.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                          help="generate every request's full length (default: on for the "
                               "synthetic datasets, off for --dataset-path)")
    add_output_args(parser)
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return parser


def read_prompt_file(path: str, num_prompts: int | None = None,
                     default_output_len: int = DEFAULT_FILE_OUTPUT_LEN) -> list[ServeRequest]:
    """The first `num_prompts` (default: all) requests of a JSONL file: one object per line with
    "prompt" (text or token ids) and optionally "output_len" or "max_tokens"."""
    requests: list[ServeRequest] = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if num_prompts is not None and len(requests) == num_prompts:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not JSON ({error})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else None
            is_ids = (isinstance(prompt, list) and prompt
                      and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt))
            if not (is_ids or (isinstance(prompt, str) and prompt)):
                raise ValueError(f"{where}: needs a \"prompt\", non-empty text or a list of token ids")
            output_len = item.get("output_len", item.get("max_tokens", default_output_len))
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f"{where}: the output length must be an integer >= 1; got {output_len!r}")
            requests.append(ServeRequest(prompt, output_len))
    if not requests:
        raise ValueError(f"{path} holds no prompt")
    if num_prompts is not None and len(requests) < num_prompts:
        raise ValueError(f"{path} holds {len(requests)} prompts; --num-prompts asks for {num_prompts}")
    return requests


@dataclasses.dataclass(frozen=True)
class ServeWorkload:
    """The timed requests, the untimed test request sent before them, and what the record says
    about where they came from."""

    requests: list[ServeRequest]
    test_request: ServeRequest
    description: dict[str, Any]


def load_workload(args: argparse.Namespace, model: str) -> ServeWorkload:
    """The requests the options name. A synthetic test request comes from the same dataset drawn
    with seed + 1, so no timed prompt finds its prefix cached; a file's is its first prompt."""
    if args.dataset_path is not None:
        requests = read_prompt_file(args.dataset_path, args.num_prompts,
                                    args.output_len or DEFAULT_FILE_OUTPUT_LEN)
        return ServeWorkload(requests, _capped(requests[0]),
                             {"dataset": "file", "dataset_path": os.path.abspath(args.dataset_path)})
    config = args.model_config or model
    if not os.path.exists(os.path.expanduser(config)):
        raise ValueError(f"the served model {model!r} is not a local path: name its HF directory, "
                         ".gguf or config.json with --model-config (synthetic prompts are token ids "
                         "from its vocabulary)")
    hf_config = load_hf_config(config)
    workload = build_workload(args, hf_config)
    (test,) = build_workload(args, hf_config, seed=args.seed + 1).head(1)
    return ServeWorkload([ServeRequest(r.prompt_token_ids, r.output_len) for r in workload.requests],
                         _capped(ServeRequest(test.prompt_token_ids, test.output_len)),
                         {"dataset": workload.name, "model_config": config,
                          "workload_digest": workload.digest()})


def _capped(request: ServeRequest) -> ServeRequest:
    return ServeRequest(request.prompt, min(request.output_len, TEST_REQUEST_MAX_TOKENS))


def arrival_offsets(count: int, request_rate: float, burstiness: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Seconds after the start at which each of `count` requests is sent: the first at 0, then
    gaps from a gamma distribution of mean 1 / request_rate and shape `burstiness` (1:
    exponential, a Poisson process, as vLLM); all at 0 for an infinite rate."""
    if math.isinf(request_rate):
        return np.zeros(count)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _payload(request: ServeRequest, model: str, temperature: float, ignore_eos: bool) -> dict[str, Any]:
    """The completion request's JSON body; `ignore_eos` is vLLM's extension of the OpenAI API."""
    return {"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
            "temperature": temperature}


async def _send_all(session: aiohttp.ClientSession, url: str, payloads: Sequence[dict[str, Any]],
                    headers: dict[str, str], offsets: np.ndarray, max_concurrency: int | None,
                    timeout_s: float, progress: tqdm) -> tuple[list[RequestOutcome], float]:
    """Sends each payload at its offset, at most `max_concurrency` in flight; returns the
    outcomes in payload order and the seconds from the first send to the last answer."""
    slots = asyncio.Semaphore(max_concurrency or len(payloads))
    start = time.perf_counter()

    async def send(payload: dict[str, Any], offset: float) -> RequestOutcome:
        # Absolute send times: a late wake-up delays one request, not every one after it.
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with slots:
            sent_at = time.perf_counter() - start
            outcome = await stream_completion(session, url, payload, headers, timeout_s)
        outcome.sent_at_s = sent_at
        progress.update(1)
        return outcome

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(send(p, float(t))) for p, t in zip(payloads, offsets)]
    return [task.result() for task in tasks], time.perf_counter() - start


def _latency_stats(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean, median, standard deviation and 99th percentile of `seconds`, in ms, keyed like
    vLLM's results: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    stats = {"mean": np.mean, "median": np.median, "std": np.std, "p99": lambda v: np.percentile(v, 99)}
    return {f"{stat}_{name}_ms": (float(fn(ms)) if ms.size else None) for stat, fn in stats.items()}


def _prompt_tokens(request: ServeRequest, outcome: RequestOutcome) -> int | None:
    """The prompt's length as the server counted it (usage), else as sent (token ids)."""
    return outcome.prompt_tokens if outcome.prompt_tokens is not None else request.prompt_len


def summarize(requests: Sequence[ServeRequest], outcomes: Sequence[RequestOutcome],
              elapsed_s: float) -> dict[str, Any]:
    """Counts, throughputs over the successful requests, and their latency statistics."""
    done = [(r, o) for r, o in zip(requests, outcomes) if o.success]
    prompt_tokens = [_prompt_tokens(r, o) for r, o in done]
    output_tokens = sum(o.output_tokens for _, o in done)
    # A text prompt without a usage chunk has no known length: no input or total token counts.
    known_prompts = None if None in prompt_tokens else sum(prompt_tokens)
    summary: dict[str, Any] = {
        "completed": len(done), "failed": len(outcomes) - len(done), "elapsed_s": elapsed_s,
        "total_prompt_tokens": known_prompts, "total_output_tokens": output_tokens,
        "requests_per_s": len(done) / elapsed_s,
        "output_tokens_per_s": output_tokens / elapsed_s,
        "total_tokens_per_s": None if known_prompts is None else (known_prompts + output_tokens) / elapsed_s,
    }
    summary.update(_latency_stats("ttft", [o.ttft_s for _, o in done]))
    summary.update(_latency_stats("tpot", [o.tpot_s for _, o in done if o.tpot_s is not None]))
    summary.update(_latency_stats("itl", [gap for _, o in done for gap in o.itl_s]))
    summary.update(_latency_stats("e2e", [o.e2e_s for _, o in done]))
    summary["errors"] = dict(Counter(o.error for o in outcomes if not o.success).most_common())
    return summary


def _per_request(requests: Sequence[ServeRequest], outcomes: Sequence[RequestOutcome]) -> dict[str, list]:
    """Parallel arrays, one entry per request in workload order (None where a failure left none)."""
    return {
        "prompt_tokens": [_prompt_tokens(r, o) for r, o in zip(requests, outcomes)],
        "max_tokens": [r.output_len for r in requests],
        "output_tokens": [o.output_tokens for o in outcomes],
        "sent_at_s": [o.sent_at_s for o in outcomes],
        "ttft_s": [o.ttft_s for o in outcomes],
        "tpot_s": [o.tpot_s for o in outcomes],
        "e2e_s": [o.e2e_s for o in outcomes],
        "itl_s": [o.itl_s for o in outcomes],
        "status": [o.status for o in outcomes],
        "error": [o.error for o in outcomes],
    }


def _recorded_argv(argv: Sequence[str] | None) -> list[str] | None:
    """The command line with secrets (--api-key's value) replaced by ***."""
    if argv is None:
        return None
    recorded, secret_follows = [], False
    for arg in argv:
        option, equals, _ = arg.partition("=")
        if secret_follows:
            recorded.append("***")
        elif equals and option in REDACTED_OPTIONS:
            recorded.append(f"{option}=***")
        else:
            recorded.append(arg)
        secret_follows = arg in REDACTED_OPTIONS
    return recorded


async def measure_async(args: argparse.Namespace, progress_enabled: bool = True) -> dict[str, Any]:
    """The record of one benchmark run against the server the options name."""
    if args.dataset_path is not None and (args.dataset is not None or args.input_len is not None):
        raise ValueError("--dataset-path replaces --dataset and --input-len")
    if args.dataset_path is None and args.dataset is None:
        args.dataset = "random"
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    url = base_url + "/" + args.endpoint.lstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # One connection per request in flight (as many as requests without --max-concurrency), each
    # kept alive for the next request: the pool never makes a request wait.
    async with open_session(args.max_concurrency) as session:
        model = args.model or await first_model_id(session, base_url, headers,
                                                   min(args.timeout, MODELS_TIMEOUT_S))
        workload = load_workload(args, model)
        requests = workload.requests
        ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.dataset_path is None

        test_payload = _payload(workload.test_request, model, args.temperature, ignore_eos)
        check = await stream_completion(session, url, test_payload, headers, args.timeout)
        if not check.success:
            raise ConnectionError(f"the test request to {url} failed: {check.error}")

        offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness,
                                  np.random.default_rng(args.seed))
        payloads = [_payload(r, model, args.temperature, ignore_eos) for r in requests]
        with tqdm(total=len(requests), desc="requests", disable=not progress_enabled) as progress:
            outcomes, elapsed = await _send_all(session, url, payloads, headers, offsets,
                                                args.max_concurrency, args.timeout, progress)
    rate = args.request_rate if math.isfinite(args.request_rate) else "inf"  # JSON has no inf
    return {
        "model": model, "base_url": base_url, "endpoint": args.endpoint, **workload.description,
        "num_prompts": len(requests),
        **summarize(requests, outcomes, elapsed),
        "expected_output_tokens": sum(r.output_len for r in requests) if ignore_eos else None,
        # With EOS ignored, a successful request generates exactly max_tokens; one that did not
        # measured a different workload.
        "short_or_long_outputs": (sum(o.success and o.output_tokens != r.output_len
                                      for r, o in zip(requests, outcomes)) if ignore_eos else None),
        "settings": {"request_rate": rate, "burstiness": args.burstiness,
                     "max_concurrency": args.max_concurrency, "seed": args.seed,
                     "temperature": args.temperature, "ignore_eos": ignore_eos, "timeout_s": args.timeout},
        "per_request": _per_request(requests, outcomes),
        "env": environment(_recorded_argv(getattr(args, "cli_argv", None))),
    }


def print_results(record: dict[str, Any]) -> None:
    """The summary in `vllm bench serve`'s layout, then the failures grouped by message."""
    def row(label: str, value: Any, spec: str = "") -> None:
        text = "-" if value is None else format(value, spec) if spec and isinstance(value, float) else str(value)
        print(f"{label:<40} {text:<10}")

    settings = record["settings"]
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    row("Successful requests:", record["completed"])
    row("Failed requests:", record["failed"])
    if settings["max_concurrency"] is not None:
        row("Maximum request concurrency:", settings["max_concurrency"])
    row("Request rate configured (RPS):", settings["request_rate"], ".2f")
    row("Benchmark duration (s):", record["elapsed_s"], ".2f")
    row("Total input tokens:", record["total_prompt_tokens"])
    row("Total generated tokens:", record["total_output_tokens"])
    row("Request throughput (req/s):", record["requests_per_s"], ".2f")
    row("Output token throughput (tok/s):", record["output_tokens_per_s"], ".2f")
    row("Total token throughput (tok/s):", record["total_tokens_per_s"], ".2f")
    for key, title, short in LATENCIES:
        print("{s:{c}^50}".format(s=title, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            row(f"{label} {short} (ms):", record[f"{stat}_{key}_ms"], ".2f")
    print("=" * 50)
    for message, count in record["errors"].items():
        print(f"failed: {count} x {message}")
    if record["short_or_long_outputs"]:
        print(f"warning: {record['short_or_long_outputs']} requests did not generate their max_tokens "
              "with EOS ignored (ignore_eos not honoured, or max_model_len too small?)")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 1 when the server could not be reached or no request succeeded,
    130 on Ctrl-C (requests in flight are cancelled and their connections closed)."""
    try:
        record = asyncio.run(measure_async(args, progress_enabled=not args.disable_tqdm))
    except ConnectionError as error:
        print(f"pjllm bench serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pjllm bench serve: interrupted", file=sys.stderr)
        return 130
    print_results(record)
    write_json(args.output_json, {"benchmark": "serve", "results": [record]})
    return 0 if record["completed"] else 1
