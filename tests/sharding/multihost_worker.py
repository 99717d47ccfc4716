"""One process of tests/sharding/test_multihost.py: `python -m tests.sharding.multihost_worker
GOLDEN PORT PROCESS_ID NUM_PROCESSES OUT_JSON`, on one CPU device, with the model split over every
process's devices. Process 0 checks the golden's prompt logprobs and greedy tokens and writes what
it saw to OUT_JSON; the others follow its steps until it exits and write that they did."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"


def main() -> None:
    name, port, process_id, num_processes, out = sys.argv[1:6]
    process_id, num_processes = int(process_id), int(num_processes)
    import jax

    import pjllm
    from pjllm.sharding import MODEL_AXIS, distributed
    from tests.golden_outputs import GOLDEN, assert_matches_golden

    # Every process alike: messages past 256 bytes (those admitting prompts) take the second
    # broadcast, decodes fit in the first.
    distributed._FIRST_BYTES = 256

    llm = pjllm.LLM(str(GOLDEN / name), dtype="float32", max_model_len=128, page_size=8,
                    max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=None,
                    skip_tokenizer_init=True, attention_backend="reference",
                    tensor_parallel_size=num_processes, coordinator_address=f"localhost:{port}",
                    num_processes=num_processes, process_id=process_id)
    report = {"process_id": process_id, "devices": jax.device_count(),
              "local_devices": jax.local_device_count()}
    if process_id == 0:
        runner = llm.engine.model_runner
        kv = runner.kv_caches[0]
        report["kv_devices"] = len(kv.sharding.device_set)
        report["kv_split"] = kv.sharding.spec[1] == MODEL_AXIS
        report["kv_local_heads"] = kv.addressable_shards[0].data.shape[1]
        report["kv_heads"] = kv.shape[1]
        assert_matches_golden(llm, name)  # raises if the split model's outputs differ
        params = pjllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], params, use_tqdm=False)
        report["tokens"] = outputs[0].outputs[0].token_ids
        report["golden_ok"] = True
    else:
        report["outputs"] = llm.generate([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)
        report["followed"] = True
        llm.shutdown()  # already shut down once it stopped following
    with open(out, "w") as f:
        json.dump(report, f)
    # Process 0 leaves its LLM open: its exit tells the others to stop (the serving test covers
    # an explicit shutdown).


if __name__ == "__main__":
    main()
