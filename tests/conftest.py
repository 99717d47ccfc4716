"""Test-wide setup, before jax is imported: run on CPU unless JAX_PLATFORMS says otherwise, with
eight host devices."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if (os.environ["JAX_PLATFORMS"] == "cpu"
        and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
    # Eight CPU devices for the tensor-parallel tests; every other test runs on the first.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
