"""`pjllm serve --data-parallel-size 2`: a real server process with two engine core replicas (on
the eight CPU devices) answers completions as one engine does, reports both replicas' requests
in /metrics, and both replicas step."""

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import pjllm
from tests.engine.conftest import TINY_CONFIG
from tests.server_process import free_port, wait_until_healthy

OPTIONS = {"load_format": "dummy", "dtype": "float32", "max_model_len": 128, "page_size": 8,
           "max_num_seqs": 8, "max_num_batched_tokens": 64, "seed": 0}


def _metric(text: str, name: str, **labels) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_two_replicas_answer_as_one_engine_and_both_step(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY_CONFIG))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 250, rng.integers(4, 16)).tolist() for _ in range(5)]
    port, log_path = free_port(), tmp_path / "server.log"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in OPTIONS.items()]
    command = [sys.executable, "-m", "pjllm.entrypoints.cli", "serve", str(model), "--port",
               str(port), "--data-parallel-size", "2",
               "--compilation-cache-dir", str(tmp_path / "xla"), *flags]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, [server], [log_path], timeout_s=180)
        body = {"model": str(model), "prompt": prompts, "max_tokens": 6, "temperature": 1.0,
                "seed": 9, "ignore_eos": True, "return_token_ids": True}
        response = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        with pjllm.LLM(str(model), compilation_cache_dir=None, **OPTIONS) as llm:
            expected = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    pjllm.SamplingParams(max_tokens=6, temperature=1.0, seed=9,
                                                         ignore_eos=True), use_tqdm=False)
        assert [c["token_ids"] for c in choices] == [o.outputs[0].token_ids for o in expected]
        assert all(c["finish_reason"] == "length" for c in choices)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert _metric(metrics, "pjllm:request_success_total", finished_reason="length") == 5
        assert _metric(metrics, "pjllm:generation_tokens_total") == 30
        assert _metric(metrics, "pjllm:num_requests_running") == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    # Each core logs its step count as it exits: both replicas ran steps.
    steps = {int(replica): int(count) for replica, count in re.findall(
        r"engine core (\d+): (\d+) steps", log_path.read_text())}
    assert sorted(steps) == [0, 1] and all(count > 0 for count in steps.values()), steps
