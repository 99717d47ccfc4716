"""`pjllm convert` to orbax, and restoring it onto a mesh: the same outputs as the HF checkpoint
(transformers' goldens), each device holding only its shards."""

import pytest

import pjllm
from pjllm.entrypoints.cli import main
from pjllm.models.orbax_checkpoint import convert_to_orbax
from pjllm.sharding import MODEL_AXIS
from tests.golden_outputs import GOLDEN, assert_matches_golden

OPTIONS = dict(dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
               max_num_batched_tokens=32, compilation_cache_dir=None, skip_tokenizer_init=True,
               attention_backend="reference")


@pytest.mark.parametrize("name,tp", [("bloom", 2), ("llama3", 4)])
def test_convert_then_restore_sharded(tmp_path, capsys, name, tp):
    """BLOOM restored straight onto its two devices' shards; Llama 3's two KV heads over four
    devices, copied after the restore."""
    out = tmp_path / "orbax"
    assert main(["convert", str(GOLDEN / name), str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "config.json").exists() and (out / "params").is_dir()
    with pjllm.LLM(str(out), tensor_parallel_size=tp, **OPTIONS) as llm:
        assert llm.engine.config.load_format == "auto"
        assert_matches_golden(llm, name)
        weights = llm.engine.model_runner.weights
        split = [w for w in weights if MODEL_AXIS in tuple(w.sharding.spec)]
        assert split and all(len(w.sharding.device_set) == tp for w in weights)
        for w in split:  # each device holds a 1/tp slice, never the whole tensor
            assert w.addressable_shards[0].data.size == w.size // tp


def test_convert_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_to_orbax(str(GOLDEN / "llama2"), str(tmp_path))
