"""Weights made straight on their shards: a checkpoint streamed one parameter at a time, each
device sent only its slice; dummy weights drawn on their devices, the same on any number of
them. (The tensor-parallel golden tests check the loaded models' outputs.)"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import nnx

import pjllm
from pjllm.config import ModelConfig
from pjllm.models import loader
from pjllm.models.registry import model_class
from pjllm.models.weights import expected_state_dict_shapes, load_hf_config
from pjllm.sharding import MODEL_AXIS, kv_head_replicas, make_mesh
from tests.golden_outputs import GOLDEN


def _config(name: str, tp: int) -> tuple[ModelConfig, int]:
    """Golden NAME's config as the engine runs it on `tp` devices, and its KV head copies."""
    config = ModelConfig.from_hf_config(load_hf_config(str(GOLDEN / name)))
    replicas = kv_head_replicas(config.num_heads, config.num_kv_heads, tp)
    return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * replicas), replicas


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {"/".join(map(str, path)): variable.get_value()
            for path, variable in nnx.to_flat_state(state)}


def _split(array: jax.Array) -> bool:
    return MODEL_AXIS in tuple(array.sharding.spec)


@pytest.mark.parametrize("name,tp", [("llama2", 2), ("llama2", 4), ("llama3", 4)])
def test_checkpoint_streams_each_parameter_onto_its_shards(monkeypatch, name, tp):
    """Every variable is placed by `make_array_from_callback`, each device asking for 1/tp of a
    split parameter (never the whole); tensors are read per parameter, not all up front; the
    values are those of the one-device load. llama3 has 2 KV heads on 4 devices: its Q/K/V
    copies are made on the host per parameter too."""
    events = []  # ("read", name) and ("place", shape, sharding, [piece shapes])
    real_place, real_open = jax.make_array_from_callback, safetensors.safe_open

    def place(shape, sharding, callback, *args, **kwargs):
        pieces = []

        def recorded(index):
            piece = callback(index)
            pieces.append(piece.shape)
            return piece
        events.append(("place", tuple(shape), sharding, pieces))
        return real_place(shape, sharding, recorded, *args, **kwargs)

    class Reader:  # safe_open whose get_tensor logs each tensor read
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def get_tensor(self, stored):
            events.append(("read", stored))
            return self.inner.get_tensor(stored)

    config, replicas = _config(name, tp)
    path = str(GOLDEN / name)
    monkeypatch.setattr(jax, "make_array_from_callback", place)
    monkeypatch.setattr(safetensors, "safe_open", Reader)
    _, state = loader.build_model(config, jnp.float32, "safetensors", path,
                                  mesh=make_mesh(tp), kv_head_replicas=replicas)
    monkeypatch.undo()
    arrays = _flat(state)

    placements = [e for e in events if e[0] == "place"]
    assert len(placements) == len(arrays)
    split_placements = 0
    for _, shape, sharding, pieces in placements:
        if MODEL_AXIS in tuple(sharding.spec):  # one slice per device, 1/tp of the whole
            split_placements += 1
            assert len(pieces) == tp
            assert all(math.prod(p) * tp == math.prod(shape) for p in pieces), (shape, pieces)
        else:  # asked for once, sent to every device
            assert pieces and all(p == shape for p in pieces)
    assert split_placements == sum(map(_split, arrays.values())) > 0

    # Streaming: at most Q, K and V (one fused parameter's inputs) are read between placements.
    reads = [e for e in events if e[0] == "read"]
    assert len(reads) == len(expected_state_dict_shapes(_config(name, 1)[0]))
    run = longest = 0
    for event in events:
        run = run + 1 if event[0] == "read" else 0
        longest = max(longest, run)
    assert longest <= 3

    for array in arrays.values():
        for shard in array.addressable_shards:
            assert shard.data.size * (tp if _split(array) else 1) == array.size
    _, single = loader.build_model(_config(name, 1)[0], jnp.float32, "safetensors", path,
                                   mesh=make_mesh(1))
    for key, value in _flat(single).items():
        if replicas == 1 or "qkv_proj" not in key:
            np.testing.assert_array_equal(np.asarray(arrays[key]), np.asarray(value), key)


def test_dummy_weights_are_drawn_on_their_shards_the_same_on_any_mesh(monkeypatch):
    """Dummy Llama 2 weights on 1 and 2 devices: equal values, each device holding 1/tp of
    every split parameter, and nothing placed from a whole array (no device_put, no host
    copy). Variables the model sets by value (norm weights, rotary frequencies) keep the
    constructor's exact values; the drawn ones its scale."""
    puts = []
    real_put, real_place = jax.device_put, jax.make_array_from_callback
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(a) or real_put(*a, **k))
    monkeypatch.setattr(jax, "make_array_from_callback",
                        lambda *a, **k: puts.append(a) or real_place(*a, **k))
    config = _config("llama2", 1)[0]
    states = {tp: loader.build_model(config, jnp.float32, "dummy", "", seed=3,
                                     mesh=make_mesh(tp))[1] for tp in (1, 2)}
    monkeypatch.undo()
    assert not puts

    one, two = _flat(states[1]), _flat(states[2])
    split = [a for a in two.values() if _split(a)]
    assert len(split) > len(two) // 3
    for array in split:
        assert all(s.data.size * 2 == array.size for s in array.addressable_shards)
    for key, value in one.items():
        np.testing.assert_array_equal(np.asarray(two[key]), np.asarray(value), key)

    # Drawn on the shards, not whole and then sliced: the draw of the largest split parameter
    # needs half the working memory per device on two devices (drawn whole and sliced, it
    # needs about as much as on one).
    path, variable = max(((p, v) for p, v in nnx.to_flat_state(states[2]) if _split(v.get_value())),
                         key=lambda item: item[1].get_value().size)
    largest, temp = variable.get_value(), []
    for state in (states[1], states[2]):
        program = loader._draw_program(dict(nnx.to_flat_state(state))[path].get_value().sharding)
        temp.append(program.lower(3, largest.shape, largest.dtype, 1.0, loader._logical_axes(
            variable), 1, np.uint32(0)).compile().memory_analysis().temp_size_in_bytes)
    assert temp[1] <= 0.55 * temp[0], (path, largest.shape, temp)

    for path, variable in nnx.to_flat_state(states[1]):
        key, value = "/".join(map(str, path)), np.asarray(variable.get_value())
        if "init_std" in variable.get_metadata():
            assert np.std(value) == pytest.approx(variable.get_metadata()["init_std"], rel=0.1)
        elif key == "inv_freq":
            np.testing.assert_array_equal(value, np.float32(
                model_class(config.architecture).rope_inv_freq(config)))
        else:
            np.testing.assert_array_equal(value, np.ones_like(value), key)  # norm weights
    assert sum("init_std" in v.get_metadata() for _, v in nnx.to_flat_state(states[1])) > 4


def test_dummy_model_gives_the_same_outputs_on_one_device_and_on_two():
    """Multi-query Falcon on 1 and 2 devices: the 2-device model draws its Q/K/V with the
    checkpoint's one KV head and copies it, so it is the same model: the same greedy tokens
    and prompt logprobs."""
    options = dict(load_format="dummy", dtype="float32", max_model_len=64, page_size=8,
                   max_num_seqs=2, max_num_batched_tokens=16, compilation_cache_dir=None,
                   skip_tokenizer_init=True, attention_backend="reference", seed=1)
    prompts = [[5, 17, 3, 99, 42], [7, 7, 8]]
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                  prompt_logprobs=1)
    tokens, logprobs = [], []
    for tp in (1, 2):
        assert _config("falcon_mqa", tp)[1] == tp
        with pjllm.LLM(str(GOLDEN / "falcon_mqa"), tensor_parallel_size=tp, **options) as llm:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)
        tokens.append([o.outputs[0].token_ids for o in outputs])
        logprobs.append([[o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
                         for o, p in zip(outputs, prompts)])
    assert tokens[0] == tokens[1]
    for ours, theirs in zip(*logprobs):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.ptp(np.concatenate(logprobs[0])) > 0.1  # a model, not a constant
