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


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _run_bench_measuring_cpu(args: list[str], output_json: str, server_pid: int) -> dict:
    """`_run_bench`, recording the CPU share (1.0 = one core busy) of the server's front end,
    its engine core (the child that used most CPU) and the bench client over the run: which of
    the three limits the served rate."""
    client = subprocess.Popen(CLI + ["bench", *args, "--output-json", output_json])
    processes = {"front_end": [server_pid], "client": [client.pid], "engine_core": _children(server_pid)}
    start_wall = time.monotonic()
    start = {pid: _cpu_seconds(pid) for pids in processes.values() for pid in pids}
    used = dict.fromkeys(start, 0.0)
    while client.poll() is None:
        for pid in start:
            try:
                used[pid] = _cpu_seconds(pid) - start[pid]
            except OSError:
                pass
        time.sleep(0.5)
    if client.returncode != 0:
        raise SystemExit(f"bench serve exited with {client.returncode}")
    wall = time.monotonic() - start_wall
    with open(output_json) as f:
        record = json.load(f)["results"][0]
    record["cpu_share"] = {name: round(max(used[pid] for pid in pids) / wall, 3)
                           for name, pids in processes.items() if pids}
    return record


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
    parser.add_argument("--skip-rated", action="store_true", help="only the unlimited-rate run")
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
        served = [_run_bench_measuring_cpu([*client, "--num-prompts", str(args.num_prompts)],
                                           os.path.join(workdir, "serve-inf.json"), server.pid)]
        for fraction in [] if args.skip_rated else map(float, args.rate_fractions.split(",")):
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
          f"{served[0]['output_tokens_per_s']:.0f} ({result['served_over_offline_output_tok_s']:.1%}), "
          f"CPU share {served[0]['cpu_share']}; "
          f"server exit code {exit_code}")


if __name__ == "__main__":
    main()
