"""Several hosts through JAX's distributed runtime, on one machine: two localhost processes of
one CPU device each (`jax.distributed.initialize`, gloo collectives) run one model split across
both (tensor_parallel_size 2). Process 0 schedules and sends each step to the other
(`pjllm/sharding/distributed.py`); its prompt logprobs and greedy tokens must be the
transformers goldens, and its sampled tokens those of one process."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import httpx
import pytest

import pjllm
from tests.golden_outputs import GOLDEN
from tests.server_process import free_port, wait_until_healthy

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 150


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _run_processes(name: str, num_processes: int, tmp_path: pathlib.Path) -> list[dict]:
    port, env = free_port(), _env()
    procs, logs = [], []
    try:
        for process_id in range(num_processes):
            log = open(tmp_path / f"process{process_id}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.sharding.multihost_worker", name, str(port),
                 str(process_id), str(num_processes), str(tmp_path / f"process{process_id}.json")],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for process_id, proc in enumerate(procs):
        output = (tmp_path / f"process{process_id}.log").read_text()[-4000:]
        assert proc.returncode == 0, f"process {process_id} exited {proc.returncode}:\n{output}"
    return [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(num_processes)]


def test_two_processes_run_one_model_as_one_process(tmp_path):
    coordinator, follower = _run_processes("llama2", 2, tmp_path)
    assert coordinator["golden_ok"]  # its worker checked prompt logprobs and greedy tokens
    assert coordinator["devices"] == 2 and coordinator["local_devices"] == 1
    # The KV cache is split by head over both processes' devices, each holding half.
    assert coordinator["kv_devices"] == 2 and coordinator["kv_split"]
    assert coordinator["kv_local_heads"] * 2 == coordinator["kv_heads"]
    # Only the coordinator returns outputs; the other process followed until it stopped.
    assert follower["followed"] and follower["outputs"] == []
    with pjllm.LLM(str(GOLDEN / "llama2"), dtype="float32", max_model_len=128, page_size=8,
                   max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=None,
                   skip_tokenizer_init=True, attention_backend="reference") as llm:
        params = pjllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        one = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], params, use_tqdm=False)
    assert coordinator["tokens"] == one[0].outputs[0].token_ids


def test_only_the_coordinator_serves_and_the_other_follows_until_it_stops(tmp_path):
    """`pjllm serve` on two processes, both given the same HTTP port: process 0 answers (the
    other never binds it), and both exit cleanly when process 0 gets SIGTERM."""
    port, http_port = free_port(), free_port()
    model = str(GOLDEN / "llama2" / "config.json")
    flags = ["--load-format", "dummy", "--dtype", "float32", "--max-model-len", "128",
             "--page-size", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
             "--compilation-cache-dir", str(tmp_path / "xla"), "--tensor-parallel-size", "2",
             "--coordinator-address", f"localhost:{port}", "--num-processes", "2"]
    procs, logs = [], [tmp_path / f"serve{i}.log" for i in range(2)]
    try:
        for process_id in range(2):
            with open(logs[process_id], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pjllm.entrypoints.cli", "serve", model, "--port",
                     str(http_port), *flags, "--process-id", str(process_id)],
                    cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{http_port}"
        wait_until_healthy(url, procs, logs, timeout_s=TIMEOUT_S)
        response = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": [1, 2, 3, 4, 5], "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
        procs[0].send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "follows the coordinator" in logs[1].read_text()
        assert "Uvicorn running" not in logs[1].read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_processes=2), r"num_processes \(2\) > 1 needs coordinator_address"),
    (dict(num_processes=2, process_id=2, coordinator_address="localhost:1234"),
     r"process_id must be in \[0, num_processes \(2\)\); got 2"),
    (dict(process_id=-1), r"process_id must be an integer >= 0"),
    (dict(num_processes=0), r"num_processes must be an integer >= 1"),
    (dict(coordinator_address="localhost"), r"coordinator_address must be HOST:PORT"),
    (dict(num_processes=2, coordinator_address="h:1", data_parallel_size=2),
     r"data_parallel_size must be 1 with num_processes > 1"),
    (dict(num_processes=2, coordinator_address="h:1", preemption_mode="swap"),
     r"preemption_mode 'swap' is not supported with num_processes > 1"),
])
def test_multihost_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pjllm.EngineConfig(model=str(GOLDEN / "llama2"), **kwargs)
