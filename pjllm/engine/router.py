"""Data-parallel routing: which replica a request goes to, and the seed of a request without one.

A data-parallel engine (`engine/data_parallel.py` offline, `AsyncLLM` for serving) runs
`data_parallel_size` independent replicas; each new request goes to the replica with the fewest
outstanding requests (added and not yet finished or aborted), the lowest index on a tie, as
vLLM's data-parallel front end routes them.

Sampling keys depend only on a request's seed, its sample index and its step, so a seeded
request gives the same tokens on any replica. A request without a seed gets one drawn from a
generator seeded with the engine's `seed` (`draw_seed`), in the order requests are added: one
generator for all replicas draws the same seeds one engine would, so outputs do not depend on
how requests were spread.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pjllm.sampling_params import SamplingParams


def draw_seed(rng: np.random.Generator) -> int:
    """The seed of a request that has none (the engine's and the router's, one rule)."""
    return int(rng.integers(2**31))


class ReplicaRouter:
    """Least-outstanding routing over `num_replicas` replicas (plain Python, not thread-safe:
    the caller serializes), and the seeds of unseeded requests."""

    def __init__(self, num_replicas: int, seed: int):
        self.outstanding = [0] * num_replicas  # requests routed to each and not yet released
        self.seed_rng = np.random.default_rng(seed)

    def route(self) -> int:
        """The replica for a new request (the fewest outstanding, lowest index on a tie),
        counted as outstanding there until `release`."""
        replica = self.outstanding.index(min(self.outstanding))
        self.outstanding[replica] += 1
        return replica

    def release(self, replica: int) -> None:
        """A request routed to `replica` has finished (or was aborted, or refused)."""
        self.outstanding[replica] -= 1

    def seeded(self, params: SamplingParams) -> SamplingParams:
        """`params` with a drawn seed if it has none (a copy; the caller's stays as it is)."""
        if params.seed is not None:
            return params
        return dataclasses.replace(params, seed=draw_seed(self.seed_rng))
