"""`pjllm bench kernels` with device time per call: on GPU, each timed executable also runs under
the JAX profiler, and the records gain device_ms (GPU busy time per call: every kernel of the call,
the split-KV combine included, without host gaps), span_ms, kernels_us (per kernel name) and the
KV GB/s and TFLOP/s at device time. Off GPU it is the plain bench.

    python -m benchmarks.profile_kernels --output-json kernels.json      # the bench's options
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.device_profile import device_times
from pjllm.bench import kernels as bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_options(parser)
    return bench.run(parser.parse_args(argv), device_timer=device_times)


if __name__ == "__main__":
    sys.exit(main())
