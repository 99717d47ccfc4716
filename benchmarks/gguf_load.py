"""GGUF load time on real files: pjllm's GGUF reading against gguf-py used as it comes.

    python -m benchmarks.gguf_load                       # the known models cached by `pjllm download`
    python -m benchmarks.gguf_load path/to/model.gguf --repeats 9

Two pieces, each timed --repeats times after one untimed run (which also pages the file in):
- header: the metadata (the tokenizer's vocabulary included) and the tensor table read into
  Python values. pjllm: `gguf_file.read_gguf`, its cache cleared. gguf-py: `gguf.GGUFReader`
  and every field's `contents()`.
- dequantize: every tensor the model's state dict needs, to float32, all kept until the last is
  done (as a load keeps them; freeing each at once measured slower, the allocator handing pages
  back and faulting them in again). pjllm: `GGUFFile.tensor` (gguf-py's dequantizer, fed flat
  runs of blocks). gguf-py: `gguf.quants.dequantize` on each whole tensor as `GGUFReader` shapes it.
Prints the median seconds of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import gguf

from pjllm.config import ModelConfig
from pjllm.models import gguf_file
from pjllm.models.default_model import DEFAULT_CACHE_DIR, KNOWN_MODELS
from pjllm.models.weights import expected_state_dict_shapes


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls after an untimed one; what it returns is
    freed after its time is taken."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: str, repeats: int) -> dict[str, float]:
    """Median seconds of each piece, pjllm's way and gguf-py's, for the GGUF file at `path`."""
    parsed = gguf_file.read_gguf(path)
    config = ModelConfig.from_hf_config(gguf_file.gguf_to_hf_config(parsed))
    names = gguf_file.gguf_tensor_names(parsed, expected_state_dict_shapes(config))

    def pjllm_header() -> gguf_file.GGUFFile:
        gguf_file._read_gguf.cache_clear()
        return gguf_file.read_gguf(path)

    def gguf_py_header() -> dict:
        reader = gguf.GGUFReader(path)
        return {name: field.contents() for name, field in reader.fields.items()}

    def pjllm_dequantize() -> list:
        return [parsed.tensor(gguf_name) for gguf_name in names.values()]

    wanted = set(names.values())
    needed = [tensor for tensor in gguf.GGUFReader(path).tensors if tensor.name in wanted]

    def gguf_py_dequantize() -> list:
        return [gguf.quants.dequantize(tensor.data, tensor.tensor_type) for tensor in needed]

    return {"header pjllm": median_seconds(pjllm_header, repeats),
            "header gguf-py": median_seconds(gguf_py_header, repeats),
            "dequantize pjllm": median_seconds(pjllm_dequantize, repeats),
            "dequantize gguf-py": median_seconds(gguf_py_dequantize, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="GGUF files; default: the known models cached")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cache = os.path.expanduser(DEFAULT_CACHE_DIR)
    paths = args.paths or [os.path.join(cache, model.file_name) for model in KNOWN_MODELS.values()
                           if os.path.exists(os.path.join(cache, model.file_name))]
    if not paths:
        parser.error(f"no GGUF files given and none cached in {cache} (pjllm download NAME)")
    for path in paths:
        for piece, seconds in measure(path, args.repeats).items():
            print(f"{os.path.basename(path)}  {piece:20s} {seconds * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
