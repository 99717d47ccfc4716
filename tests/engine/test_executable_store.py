"""The compiled program store: a second engine of the same configuration loads its step programs
from the store (tracing and lowering none) and generates the same tokens; any change to the
configuration or the devices misses; a damaged file is built again; None turns it off."""

import hashlib
import json
import os
import shutil

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import pjllm
from pjllm.config import EngineConfig
from pjllm.engine.engine import LLMEngine, executable_store_dir
from pjllm.runner import executable_store, model_runner

OPTIONS = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
               max_num_batched_tokens=16, seed=0, skip_tokenizer_init=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10]}, {"prompt_token_ids": [11, 12, 13]}]
# Sampled (seeded) with logprobs: the sampler program's outputs as well as the forward's.
PARAMS = pjllm.SamplingParams(temperature=0.8, seed=3, max_tokens=5, logprobs=2, ignore_eos=True)
# The functions every step program is traced from (imported by name into the runner's module).
TRACED = ("forward_from_buffers", "sampler_from_buffer", "write_block_table", "run_prompt_logprobs",
          "read_swapped", "write_swapped")


def _xla_cache(enabled: bool) -> None:
    """Turns JAX's persistent compilation cache on or off for what this process compiles next
    (the cache takes its folder when it is first used: an engine's, then)."""
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True, scope="module")
def no_xla_cache():
    """Every program compiled here is compiled, not read from XLA's cache (which the process
    keeps in the folder of the first engine that had one): on CPU only those are stored."""
    _xla_cache(False)
    yield
    _xla_cache(True)


def _generate(llm):
    return [(completion.token_ids, [sorted(entry.items()) for entry in completion.logprobs])
            for output in llm.generate(PROMPTS, PARAMS, use_tqdm=False)
            for completion in output.outputs]


def _first_run(path, folder, **options):
    """Generates with a new engine whose programs the store in `folder` keeps; returns the
    outputs and the keys of the programs it built."""
    with pjllm.LLM(path, compilation_cache_dir=folder, **OPTIONS, **options) as llm:
        outputs = _generate(llm)
        programs = llm.engine.model_runner.programs
        programs.wait_for_store_writes()
        assert programs.build_counts["loaded"] == 0
        return outputs, programs.keys()


@pytest.fixture(scope="module")
def stored(tiny_model_path_module, tmp_path_factory):
    """A store filled by one engine: (its folder, the engine's outputs, its program keys)."""
    folder = str(tmp_path_factory.mktemp("compilation-cache"))
    outputs, keys = _first_run(tiny_model_path_module, folder)
    return folder, outputs, keys


def _forbid_tracing(monkeypatch):
    def traced(*args, **kwargs):
        raise AssertionError("a step program was traced")

    for name in TRACED:
        monkeypatch.setattr(model_runner, name, traced)


def _second_run(path, folder, outputs, keys, monkeypatch, **options):
    """A second engine in `folder` loads all of `keys`, traces nothing, and gives `outputs`."""
    _forbid_tracing(monkeypatch)
    with pjllm.LLM(path, compilation_cache_dir=folder, **OPTIONS, **options) as llm:
        assert _generate(llm) == outputs
        assert llm.engine.model_runner.programs.build_counts == {"loaded": len(keys), "compiled": 0}
        return llm.engine.model_runner


def test_a_second_engine_loads_every_program_and_generates_the_same_tokens(
        tiny_model_path_module, stored, monkeypatch):
    folder, outputs, keys = stored
    assert len(os.listdir(os.path.join(folder, "pjllm-programs"))) == len(keys)
    _second_run(tiny_model_path_module, folder, outputs, keys, monkeypatch)


def test_programs_split_over_two_devices_are_loaded_onto_both(tiny_model_path_module, tmp_path,
                                                               monkeypatch):
    folder = str(tmp_path)
    outputs, keys = _first_run(tiny_model_path_module, folder, tensor_parallel_size=2)
    runner = _second_run(tiny_model_path_module, folder, outputs, keys, monkeypatch,
                         tensor_parallel_size=2)
    assert runner.attention.mesh.devices.size == 2


def test_the_background_warmup_loads_stored_programs_without_lowering(
        tiny_model_path_module, stored, monkeypatch):
    folder, outputs, keys = stored
    _forbid_tracing(monkeypatch)
    with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS) as llm:
        runner = llm.engine.model_runner
        # The stored programs only: the engine's warmup would build all, tracing the others.
        runner.programs.warm(keys)
        assert runner.programs.wait_for_warmup()["lower_s"] == 0.0
        assert runner.programs.build_counts == {"loaded": len(keys), "compiled": 0}
        assert _generate(llm) == outputs


@pytest.mark.parametrize("change", [dict(page_size=16), dict(max_num_seqs=2), dict(max_model_len=64),
                                    dict(num_pages=100)])
def test_another_configuration_finds_no_stored_program(tiny_model_path_module, stored, change):
    folder, _, keys = stored
    with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder,
                   **{**OPTIONS, **change}) as llm:
        store = llm.engine.model_runner.programs.store
        assert not any(store.contains(key) for key in llm.engine.model_runner.program_keys())
    with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS) as llm:
        store = llm.engine.model_runner.programs.store
        assert all(store.contains(key) for key in keys)  # the same one finds them all


def test_another_model_configuration_finds_no_stored_program(tiny_model_path_module, stored,
                                                             tmp_path):
    """A value the programs' functions capture, in no input's shape."""
    folder, _, keys = stored
    with open(tiny_model_path_module) as f:
        config = json.load(f)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pjllm.LLM(str(path), compilation_cache_dir=folder, **OPTIONS) as llm:
        store = llm.engine.model_runner.programs.store
        assert not any(store.contains(key) for key in keys)


@pytest.mark.parametrize("change", ["pjllm source", "XLA_FLAGS"])
def test_another_environment_finds_no_stored_program(tiny_model_path_module, stored, monkeypatch,
                                                     change):
    folder, _, keys = stored
    if change == "pjllm source":
        monkeypatch.setattr(executable_store, "package_digest", lambda: "edited")
    else:
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_thunk_runtime=true")
    with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS) as llm:
        store = llm.engine.model_runner.programs.store
        assert not any(store.contains(key) for key in keys)


def test_another_device_finds_no_stored_program(tiny_model_path_module, stored):
    """A data-parallel replica on another device: the same shapes, other devices."""
    folder, _, keys = stored
    config = EngineConfig(model=tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS)
    engine = LLMEngine(config, detokenize=False, devices=[jax.devices()[1]])
    try:
        store = engine.model_runner.programs.store
        assert not any(store.contains(key) for key in keys)
    finally:
        engine.shutdown()


def _damage(path, how):
    with open(path, "rb") as f:
        data = f.read()
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "flipped byte":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    else:  # a checksum that matches a body that is no stored program
        body = b"not a pickle"
        data = data[:data.index(b"\n") + 1] + hashlib.sha256(body).digest() + body
    with open(path, "wb") as f:
        f.write(data)


def test_a_damaged_file_is_built_again_and_replaced(tiny_model_path_module, stored, tmp_path):
    folder = str(tmp_path / "compilation-cache")
    shutil.copytree(stored[0], folder)
    _, outputs, keys = stored
    with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS) as llm:
        programs = llm.engine.model_runner.programs
        hows = ["truncated", "flipped byte", "not a program"]
        for key, how in zip(keys, hows):
            _damage(programs.store.path(key), how)
        assert _generate(llm) == outputs
        assert programs.build_counts == {"loaded": len(keys) - len(hows), "compiled": len(hows)}
        programs.wait_for_store_writes()
        for key in keys:
            assert programs.store.load(key) is not None  # written again, whole


def test_a_program_read_from_xla_cache_is_not_stored_on_cpu(tiny_model_path_module, tmp_path):
    """Such an executable serializes without its compiled functions on CPU: stored, it would
    load and then fail at its first run."""
    folder = str(tmp_path)
    _xla_cache(True)  # in `folder`, which the first engine here sets
    try:
        outputs, keys = _first_run(tiny_model_path_module, folder)
        programs_folder = os.path.join(folder, "pjllm-programs")
        for name in os.listdir(programs_folder):
            os.remove(os.path.join(programs_folder, name))
        with pjllm.LLM(tiny_model_path_module, compilation_cache_dir=folder, **OPTIONS) as llm:
            assert _generate(llm) == outputs  # read from XLA's cache
            programs = llm.engine.model_runner.programs
            programs.wait_for_store_writes()
            assert programs.build_counts == {"loaded": 0, "compiled": len(keys)}
            names = {os.path.basename(programs.store.path(key)): key for key in keys}
        # Only the block table program may be stored: a module-level function over the same
        # shapes, it comes from JAX's in-memory cache of the first engine's real compile.
        assert [names[name] for name in os.listdir(programs_folder)] in (
            [], [("table_writes", model_runner.TABLE_WRITES_PER_CALL)])
    finally:
        _xla_cache(False)


def test_none_turns_the_store_off():
    config = EngineConfig(model="m", compilation_cache_dir=None)
    assert executable_store_dir(config) is None
    config.compilation_cache_dir = "/cache"
    assert executable_store_dir(config) == os.path.join("/cache", "pjllm-programs")
    # Several processes: off, only XLA's cache.
    config = EngineConfig(model="m", compilation_cache_dir="/cache", num_processes=2,
                          coordinator_address="localhost:1234")
    assert executable_store_dir(config) is None


def test_an_engine_without_a_compilation_cache_has_no_store(make_llm):
    assert make_llm().engine.model_runner.programs.store is None
