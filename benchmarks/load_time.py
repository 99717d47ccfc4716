"""Weights load time: an HF safetensors checkpoint against its `pjllm convert --format orbax` copy.

    python -m benchmarks.load_time benchmarks/configs/llama-3-8b.json --workdir /tmp/load \
        --output-json out.json

Writes a bf16 safetensors checkpoint of the config (values from a repeated random block: a load
does not look at them), converts it to orbax, then times `build_model` from each format in a
fresh process, on a one-device mesh, each array ready on the device. Both checkpoints were just
written, so both are read from the page cache: this measures the loaders, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHARD_BYTES = 4 << 30

_TIMED_LOAD = """
import json, sys, time
start = time.perf_counter()
import jax, jax.numpy as jnp
from pjllm.config import ModelConfig
from pjllm.models.loader import build_model
from pjllm.models.weights import load_hf_config
from pjllm.sharding import make_mesh
path, load_format = sys.argv[1], sys.argv[2]
config = ModelConfig.from_hf_config(load_hf_config(path))
mesh = make_mesh(1)
ready = time.perf_counter()
_, state = build_model(config, jnp.bfloat16, load_format, path, mesh=mesh)
jax.block_until_ready(jax.tree.leaves(state))
done = time.perf_counter()
print(json.dumps({"load_format": load_format, "load_s": done - ready, "process_s": done - start}))
"""


def write_safetensors(config_path: str, out: str) -> dict:
    """A bf16 HF checkpoint of `config_path`'s model in ~4 GiB shards with an index."""
    import ml_dtypes

    from pjllm.config import ModelConfig
    from pjllm.models.weights import expected_state_dict_shapes, load_hf_config

    hf_config = load_hf_config(config_path)
    shapes = expected_state_dict_shapes(ModelConfig.from_hf_config(hf_config))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    block = (np.random.default_rng(0).normal(size=1 << 20) * 0.02).astype(ml_dtypes.bfloat16)
    block = block.view(np.uint16)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(os.path.join(out, file_name), "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in names:
                count = int(np.prod(shapes[name]))
                reps = -(-count // block.size)
                f.write(np.tile(block, reps)[:count].tobytes())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return {"tensors": len(shapes), "files": len(shards),
            "bytes": sum(2 * int(np.prod(s)) for s in shapes.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    record: dict = {"config": args.config}

    def save() -> None:
        print(json.dumps(record), flush=True)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(record, f, indent=1)

    safetensors_dir = os.path.join(args.workdir, "safetensors")
    orbax_dir = os.path.join(args.workdir, "orbax")
    start = time.perf_counter()
    record["checkpoint"] = write_safetensors(args.config, safetensors_dir)
    record["write_safetensors_s"] = time.perf_counter() - start
    save()
    start = time.perf_counter()
    from pjllm.models.orbax_checkpoint import convert_to_orbax

    convert_to_orbax(safetensors_dir, orbax_dir, "bfloat16")
    record["convert_s"] = time.perf_counter() - start
    save()
    record["loads"] = []
    for _ in range(args.repeats):
        for path, load_format in ((safetensors_dir, "safetensors"), (orbax_dir, "orbax")):
            out = subprocess.run([sys.executable, "-c", _TIMED_LOAD, path, load_format],
                                 check=True, capture_output=True, text=True).stdout
            record["loads"].append(json.loads(out.strip().splitlines()[-1]))
            save()


if __name__ == "__main__":
    main()
