"""What serving costs: the offline throughput of a workload, then the same workload through
`pjllm serve` and `pjllm bench serve`, at unlimited rate and at fractions of the rate measured.

    python -m benchmarks.serve_vs_offline --model benchmarks/configs/llama-3-8b.json \
        --load-format dummy --dataset chat --num-prompts 1000 --output-json out.json

1. `pjllm bench throughput` (one `LLM.generate` of every prompt);
2. `pjllm serve` on 127.0.0.1 (the engine settings the offline run resolved: max_model_len,
   KV pages, batch limits; warmup blocking), then `pjllm bench
   serve` with every prompt at once (one streamed request per prompt), then at each of
   --rate-fractions x the request rate that run reached, with --rated-prompts prompts;
3. SIGTERM to the server. The JSON holds every run's record and served/offline output tok/s.
Each step runs in its own process, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CLI = [sys.executable, "-m", "pjllm.entrypoints.cli"]


def _run_bench(args: list[str], output_json: str) -> dict:
    subprocess.run(CLI + ["bench", *args, "--output-json", output_json], check=True)
    with open(output_json) as f:
        return json.load(f)["results"][0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dataset", default="chat")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--rated-prompts", type=int, default=300)
    parser.add_argument("--rate-fractions", default="0.25,0.5,0.75")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="serve-vs-offline-")
    model = ["--model", args.model, "--load-format", args.load_format]
    workload = ["--dataset", args.dataset, "--seed", "0"]
    offline = _run_bench(["throughput", *model, *workload, "--num-prompts", str(args.num_prompts)],
                         os.path.join(workdir, "offline.json"))

    # The server gets the engine settings the offline run resolved (max_model_len from the
    # workload, the KV pages it had), so both run the same engine on the same workload.
    settings = offline["settings"]
    engine = ["--max-model-len", str(settings["max_model_len"]), "--num-pages", str(settings["num_pages"]),
              "--max-num-seqs", str(settings["max_num_seqs"]),
              "--max-num-batched-tokens", str(settings["max_num_batched_tokens"])]
    port = _free_port()
    server = subprocess.Popen(CLI + ["serve", args.model, "--load-format", args.load_format,
                                     "--port", str(port), "--warmup", "blocking", *engine])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:  # refused, reset, timed out, an error status (URLError is an OSError)
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not start")
        time.sleep(1)
    try:
        client = ["serve", "--base-url", url, "--model-config", args.model, *workload, "--disable-tqdm"]
        served = [_run_bench([*client, "--num-prompts", str(args.num_prompts)],
                             os.path.join(workdir, "serve-inf.json"))]
        for fraction in map(float, args.rate_fractions.split(",")):
            rate = fraction * served[0]["requests_per_s"]
            record = _run_bench([*client, "--num-prompts", str(args.rated_prompts),
                                 "--request-rate", f"{rate:.3f}"],
                                os.path.join(workdir, f"serve-{fraction}.json"))
            record["rate_fraction"] = fraction
            served.append(record)
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    result = {"benchmark": "serve_vs_offline", "offline": offline, "served": served,
              "server_exit_code": exit_code,
              "served_over_offline_output_tok_s": served[0]["output_tokens_per_s"]
              / offline["output_tokens_per_s"]}
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"offline {offline['output_tokens_per_s']:.0f} output tok/s; served at unlimited rate "
          f"{served[0]['output_tokens_per_s']:.0f} ({result['served_over_offline_output_tok_s']:.1%}); "
          f"server exit code {exit_code}")


if __name__ == "__main__":
    main()
