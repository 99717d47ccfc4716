"""The torch peer backend (HF transformers continuous batching) on a tiny random model, CPU.

pjllm does not need torch: with torch importable here, `benchmarks/compare_hf.py` runs its hf side;
otherwise, if PJLLM_BENCH_TORCH_PYTHON names a Python that has torch and transformers (it needs no
jax), `benchmarks/hf_backend.py` runs there standalone. Without either the tests are skipped.
"""

import importlib.util
import json
import os
import subprocess

import pytest

from benchmarks import compare_hf
from pjllm.bench.datasets import make_workload, special_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "tests", "golden", "llama3", "config.json")
HAS_TORCH = importlib.util.find_spec("torch") is not None
TORCH_PYTHON = os.environ.get("PJLLM_BENCH_TORCH_PYTHON")


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_throughput_and_latency_with_hf_backend(tmp_path):
    model = ["--model", CONFIG, "--load-format", "dummy", "--backend", "hf", "--max-num-seqs", "4"]
    out = tmp_path / "t.json"
    assert compare_hf.main(["throughput", *model, "--dataset", "random", "--num-prompts", "5",
                 "--input-len", "12", "--output-len", "6", "--output-json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["results"]
    assert record["backend"] == "hf" and record["total_output_tokens"] == 30
    assert {"torch", "transformers", "device"} <= set(record["env"])
    out = tmp_path / "l.json"
    assert compare_hf.main(["latency", *model, "--batch-sizes", "1,2", "--input-len", "8",
                 "--output-len", "3", "--num-iters", "1", "--output-json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["results"]
    assert [row["batch_size"] for row in record["rows"]] == [1, 2]


@pytest.mark.skipif(not TORCH_PYTHON, reason="PJLLM_BENCH_TORCH_PYTHON is not set")
def test_standalone_hf_backend_runs_the_same_workload():
    command = [TORCH_PYTHON, os.path.join(ROOT, "benchmarks", "hf_backend.py"), "--config", CONFIG,
               "--dataset", "chat", "--num-prompts", "6", "--max-num-seqs", "4", "--seed", "3"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    with open(CONFIG) as f:
        hf_config = json.load(f)
    workload = make_workload("chat", hf_config["vocab_size"], seed=3, num_prompts=6,
                             exclude_ids=special_token_ids(hf_config))
    assert result["workload_digest"] == workload.digest()  # same token ids as pjllm would run
    assert result["output_tokens"] == result["expected_output_tokens"] == workload.num_output_tokens


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_startup_with_hf_backend(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the hf child imports benchmarks.hf_backend from the repository root
    out = tmp_path / "s.json"
    assert compare_hf.main(["startup", "--model", CONFIG, "--load-format", "dummy", "--backend", "hf",
                            "--input-len", "8", "--output-json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["results"]
    (run,) = record["runs"]
    assert record["backend"] == run["backend"] == "hf"
    assert run["total_s"] >= run["import_s"] + run["construct_s"] + run["first_token_s"]


@pytest.mark.skipif(not TORCH_PYTHON, reason="PJLLM_BENCH_TORCH_PYTHON is not set")
def test_hf_startup_child_reports_its_phases(tmp_path):
    with open(CONFIG) as f:
        hf_config = json.load(f)
    spec = {"hf_config": hf_config, "settings": {"max_num_seqs": 1}, "prompt_token_ids": list(range(1, 9))}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    completed = subprocess.run([TORCH_PYTHON, "-c", compare_hf._HF_STARTUP_BOOTSTRAP, str(tmp_path / "spec.json"),
                                str(tmp_path / "result.json")],
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    child = json.loads((tmp_path / "result.json").read_text())
    assert child["up"] <= child["imported"] <= child["done"]
    assert child["construct_s"] >= child["weights_s"] > 0 and child["first_token_s"] > 0
    assert "torch" in child["device_info"] and child["settings"]["continuous_batching_config"]["max_requests_per_batch"] == 1
