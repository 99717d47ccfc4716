r"""The torch peer backend: HF transformers' continuous batching on a random-weight model.

The model is built from the same HF config as pjllm's (`AutoModelForCausalLM.from_config`, random
weights, on CUDA when available) and runs the same requests (token ids, output lengths, EOS
ignored) through `model.continuous_batching_context_manager(...)`: a paged KV cache, requests
joining and leaving the batch at every step, CUDA graphs where transformers decides to use them.

It implements `pjllm.bench.backends.Backend`, so benchmarks/compare_hf.py drives it through
pjllm's own throughput and latency measurements. torch is needed here only (pjllm does not depend
on it), and this file imports nothing from pjllm, so it also runs where jax is absent.
Standalone (a CPU check of this backend, reading pjllm's numpy-only datasets.py by path):

    python benchmarks/hf_backend.py --config tests/golden/llama3/config.json \
        --num-prompts 4 --input-len 16 --output-len 8
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator, Protocol, Sequence

_RESULT_POLL_S = 1.0
_MAX_IDLE_S = 600.0  # no finished request for this long: the generation loop is stuck


class Request(Protocol):
    """What a benchmark request must provide (pjllm.bench.datasets.BenchRequest does)."""

    prompt_token_ids: list[int]
    output_len: int


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("the hf backend needs torch and transformers (pip install torch); "
                           f"import failed: {error}") from error
    return torch, transformers


def _model_type(hf_config: dict[str, Any]) -> str:
    if hf_config.get("model_type"):
        return str(hf_config["model_type"])
    architecture = (hf_config.get("architectures") or [""])[0].lower()
    for name in ("qwen2", "mistral", "llama"):
        if architecture.startswith(name):
            return name
    raise ValueError(f"cannot tell the HF model_type of architectures {hf_config.get('architectures')}")


def torch_dtype(name: str, device: str):
    """`auto` is bfloat16 on CUDA and float32 on CPU, as for pjllm."""
    torch, _ = _import_torch()
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


@dataclasses.dataclass
class HFSettings:
    """How the HF model and its continuous-batching manager are set up."""

    dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    temperature: float = 1.0
    seed: int = 0
    attn_implementation: str | None = None
    cb_overrides: dict[str, Any] | None = None  # extra ContinuousBatchingConfig fields


class HFBackend:
    """A random-weight HF model with a running continuous-batching manager.

    `generate(requests)` blocks until every request is done and returns the number of tokens each
    generated. `close()` stops the manager's background thread.
    """

    name = "hf"

    def __init__(self, hf_config: dict[str, Any], settings: HFSettings, max_prompt_len: int,
                 max_output_len: int, num_requests: int):
        torch, transformers = _import_torch()
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.settings = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch_dtype(settings.dtype, self.device)
        torch.manual_seed(settings.seed)
        config_dict = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
        config = AutoConfig.for_model(_model_type(hf_config), **config_dict)
        start = time.perf_counter()
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        if settings.attn_implementation:
            model_kwargs["attn_implementation"] = settings.attn_implementation
        with torch.device(self.device):  # random init directly on the device
            self.model = AutoModelForCausalLM.from_config(config, **model_kwargs).eval()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - start

        generation_config = GenerationConfig(
            do_sample=settings.temperature > 0, temperature=settings.temperature or None, top_k=0,
            top_p=1.0, max_new_tokens=max_output_len, eos_token_id=-1,
            pad_token_id=hf_config.get("pad_token_id") or 0)
        cb_fields = {f.name for f in dataclasses.fields(transformers.ContinuousBatchingConfig)}
        cb_kwargs: dict[str, Any] = {"max_requests_per_batch": settings.max_num_seqs,
                                     "allow_block_sharing": False, "seed": settings.seed}
        if settings.max_num_batched_tokens:
            cb_kwargs["max_batch_tokens"] = settings.max_num_batched_tokens
        if self.device == "cpu":
            # transformers sizes the cache from free memory (GBs on a host, minutes to warm up);
            # on CPU give it just what the workload needs, in its default 256-token pages.
            concurrent = min(num_requests, settings.max_num_seqs)
            cb_kwargs["num_blocks"] = -(-concurrent * (max_prompt_len + max_output_len) // 256) + concurrent
            cb_kwargs.setdefault("max_batch_tokens", 512)
        cb_kwargs.update(settings.cb_overrides or {})
        unknown = set(cb_kwargs) - cb_fields
        if unknown:
            raise ValueError(f"--hf-cb-config: unknown ContinuousBatchingConfig field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(cb_fields)}")
        self.cb_config = cb_kwargs
        hints = _workload_hints(max_prompt_len, max_output_len, num_requests)

        self._stack = contextlib.ExitStack()
        start = time.perf_counter()
        self.manager = self._stack.enter_context(self.model.continuous_batching_context_manager(
            generation_config=generation_config,
            continuous_batching_config=transformers.ContinuousBatchingConfig(**cb_kwargs),
            block=True, timeout=30, warmup=True, **({"workload_hints": hints} if hints else {})))
        self.warmup_s = time.perf_counter() - start
        self.attn_implementation = self.model.config._attn_implementation
        self._next_id = 0

    def generate(self, requests: Sequence[Request]) -> list[int]:
        """Runs the requests to completion; returns each one's number of generated tokens."""
        ids = []
        for request in requests:
            request_id = f"bench-{self._next_id}"
            self._next_id += 1
            self.manager.add_request(list(request.prompt_token_ids), request_id=request_id,
                                     max_new_tokens=int(request.output_len), eos_token_id=-1)
            ids.append(request_id)
        wanted = set(ids)
        done: dict[str, int] = {}
        idle_since = time.perf_counter()
        while len(done) < len(ids):
            result = self.manager.get_result(timeout=_RESULT_POLL_S)
            if result is None:
                if not self.manager.is_running():
                    raise RuntimeError("the HF continuous-batching loop stopped before finishing")
                if time.perf_counter() - idle_since > _MAX_IDLE_S:
                    raise RuntimeError(f"no HF request finished in {_MAX_IDLE_S:.0f} s")
                continue
            if not result.is_finished() or result.request_id not in wanted:
                continue
            if result.error is not None:
                raise RuntimeError(f"HF request {result.request_id} failed: {result.error}")
            done[result.request_id] = len(result.generated_tokens)
            idle_since = time.perf_counter()
        return [done[request_id] for request_id in ids]

    @contextlib.contextmanager
    def trace(self, folder: str) -> Iterator[None]:
        """Traces with the torch profiler (GPU kernels on CUDA, ops on CPU) into
        `folder/hf.trace.json.gz`, a Chrome trace that benchmarks/device_profile.py reads."""
        torch, _ = _import_torch()
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as profiler:
            yield
            if cuda:
                torch.cuda.synchronize()
        os.makedirs(folder, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(folder, "hf.trace.json.gz"))

    def close(self) -> None:
        self._stack.close()

    def settings_record(self) -> dict[str, Any]:
        return {"dtype": str(self.model.dtype).removeprefix("torch."), "device": self.device,
                "attn_implementation": self.attn_implementation, "temperature": self.settings.temperature,
                "continuous_batching_config": self.cb_config}

    def device_info(self) -> dict[str, Any]:
        torch, transformers = _import_torch()
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "platform": self.device, "device": name}


@dataclasses.dataclass
class _OnePrompt:
    prompt_token_ids: list[int]
    output_len: int = 1


def startup_child_main(up: float, spec_path: str, result_path: str) -> None:
    """`compare_hf startup`'s hf side, in a fresh process: import torch and transformers, build
    the random-weight model and its continuous-batching manager (CUDA graph capture included when
    configured), generate one token; write the phase times (wall clock, `up` = interpreter up).

    The spec holds {"hf_config", "settings" (HFSettings fields), "prompt_token_ids"}."""
    import json

    with open(spec_path) as f:
        spec = json.load(f)
    _import_torch()  # torch and transformers: the child's import time
    imported = time.time()
    start = time.perf_counter()
    prompt = _OnePrompt(spec["prompt_token_ids"])
    backend = HFBackend(spec["hf_config"], HFSettings(**spec["settings"]), len(prompt.prompt_token_ids),
                        prompt.output_len, 1)
    construct_s = time.perf_counter() - start
    start = time.perf_counter()
    backend.generate([prompt])
    first_token_s = time.perf_counter() - start
    done = time.time()
    result = {"up": up, "imported": imported, "done": done, "construct_s": construct_s,
              "weights_s": backend.load_s, "rest_s": construct_s - backend.load_s,
              "first_token_s": first_token_s, "device_info": backend.device_info(),
              "settings": backend.settings_record()}
    backend.close()
    with open(result_path, "w") as f:
        json.dump(result, f)


def _workload_hints(max_prompt_len: int, max_output_len: int, num_requests: int):
    """transformers' WorkloadHints (sizes its cache and batches), where this version has them."""
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:  # pragma: no cover - older transformers
        return None
    return WorkloadHints(max_prompt_length=max_prompt_len, max_generated_length=max_output_len,
                         num_requests=num_requests)


def _standalone_main() -> None:
    """A CPU check without pjllm or jax: a random workload through HFBackend, timed."""
    import argparse
    import importlib.util
    import json
    import os
    import sys

    # By path: importing pjllm.bench.datasets would import pjllm, and with it jax.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "pjllm_bench_datasets", os.path.join(root, "pjllm", "bench", "datasets.py"))
    datasets = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = datasets  # dataclasses look their module up there
    spec.loader.exec_module(datasets)

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an HF config.json")
    parser.add_argument("--dataset", default="random", choices=datasets.DATASETS)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.config) as f:
        hf_config = json.load(f)
    workload = datasets.make_workload(
        args.dataset, hf_config["vocab_size"], args.seed, args.num_prompts, args.input_len,
        args.output_len, datasets.special_token_ids(hf_config))
    settings = HFSettings(dtype=args.dtype, max_num_seqs=args.max_num_seqs, seed=args.seed)
    backend = HFBackend(hf_config, settings, max(r.prompt_len for r in workload.requests),
                        max(r.output_len for r in workload.requests), len(workload.requests))
    try:
        start = time.perf_counter()
        counts = backend.generate(workload.requests)
        elapsed = time.perf_counter() - start
    finally:
        backend.close()
    print(json.dumps({"backend": "hf", "num_prompts": len(counts), "output_tokens": sum(counts),
                      "expected_output_tokens": workload.num_output_tokens, "elapsed_s": elapsed,
                      "workload_digest": workload.digest(), "load_s": backend.load_s,
                      "settings": backend.settings_record(), "env": backend.device_info()}))


if __name__ == "__main__":
    _standalone_main()
