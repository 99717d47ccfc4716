"""Rotary scalings without a transformers golden: dynamic NTK follows vLLM (one base for the
longest context), so its frequencies and the context lengths are checked by formula."""

import numpy as np
import pytest

from pjllm.config import ModelConfig
from pjllm.models.layers import rope_inv_freq
from pjllm.models.layers.rotary import rope_attention_factor

BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=64, intermediate_size=128,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=1024)


def test_dynamic_ntk_rescales_the_base_once_for_the_longest_context():
    factor, dim, theta = 4.0, 32, 10000.0
    want_theta = theta * (factor * (1024 * factor) / 1024 - (factor - 1)) ** (dim / (dim - 2))
    want = 1.0 / want_theta ** (np.arange(0, dim, 2) / dim)
    got = rope_inv_freq(dim, theta, {"rope_type": "dynamic", "factor": factor})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert rope_attention_factor({"rope_type": "dynamic", "factor": factor}) == 1.0


@pytest.mark.parametrize("scaling,context", [
    ({"rope_type": "linear", "factor": 2.0}, 2048),
    ({"rope_type": "dynamic", "factor": 2.0}, 2048),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 2048),
    ({"rope_type": "yarn", "factor": 4.0}, 4096),           # original: max_position_embeddings
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 128}, 1024),
])
def test_context_length_by_rope_scaling(scaling, context):
    assert ModelConfig.from_hf_config({**BASE, "rope_scaling": scaling}).max_context_len == context


def test_yarn_attention_factor():
    assert rope_attention_factor({"rope_type": "yarn", "factor": 4.0}) == pytest.approx(
        0.1 * np.log(4.0) + 1)
    assert rope_attention_factor({"rope_type": "yarn", "factor": 4.0,
                                  "attention_factor": 1.5}) == 1.5
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        rope_inv_freq(32, 10000.0, {"rope_type": "longrope"})
