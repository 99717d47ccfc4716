"""Parallelism on a jax.sharding mesh: the mesh, how model axes map onto it, and (distributed.py)
several processes running one model through JAX's distributed runtime."""

from pjllm.sharding.mesh import (DATA_AXIS, MODEL_AXIS, kv_cache_sharding, kv_head_replicas,
                                 make_mesh, param_sharding, place_host_array, replica_devices,
                                 replicate_kv_heads, replicated, vocab_sharded)

__all__ = ["DATA_AXIS", "MODEL_AXIS", "kv_cache_sharding", "kv_head_replicas", "make_mesh",
           "param_sharding", "place_host_array", "replica_devices", "replicate_kv_heads",
           "replicated", "vocab_sharded"]
