"""Test-wide setup: run on CPU unless JAX_PLATFORMS says otherwise (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
