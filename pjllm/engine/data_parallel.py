"""Offline data parallelism: `data_parallel_size` engine replicas in this process, stepped together.

Replica i is an `LLMEngine` on its own devices (`sharding.replica_devices`: [i x TP, (i + 1) x
TP)), with its own weights, KV cache (sized from its own devices' memory), scheduler and
compiled programs; the replicas share nothing but the generator of unseeded requests' seeds.
Each request goes to the replica with the fewest outstanding requests (`engine/router.py`).
`run_to_completion` steps the busy replicas at once, one thread each: a step's host work holds
the GIL, but waiting for the device does not, so one replica's host work overlaps the others'
device work. (Host-bound workloads would want a process per replica, as `AsyncLLM` runs them.)
"""

from __future__ import annotations

import threading
from typing import Any

from pjllm.config import EngineConfig
from pjllm.engine.engine import LLMEngine
from pjllm.engine.input_processor import PromptType
from pjllm.engine.router import ReplicaRouter
from pjllm.outputs import RequestOutput
from pjllm.sampling_params import SamplingParams
from pjllm.sharding import replica_devices


class DataParallelEngine:
    """`config.data_parallel_size` `LLMEngine` replicas behind the part of LLMEngine's interface
    that `LLM` uses: `add_request` (routed), `abort_request` (to the request's replica),
    `run_to_completion`, `has_unfinished_requests`, `reset_prefix_cache`, `shutdown`, and the
    model's description (tokenizer, configs, limits), which every replica shares."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.router = ReplicaRouter(config.data_parallel_size, config.seed)
        self.replicas: list[LLMEngine] = []
        try:
            for replica in range(config.data_parallel_size):
                devices = replica_devices(config.tensor_parallel_size, config.data_parallel_size,
                                          replica)
                self.replicas.append(LLMEngine(config, devices=devices,
                                               seed_rng=self.router.seed_rng))
        except BaseException:
            self.shutdown()
            raise
        first = self.replicas[0]
        self.inputs, self.tokenizer = first.inputs, first.tokenizer
        self.model_config, self.max_model_len, self.dtype = (first.model_config,
                                                             first.max_model_len, first.dtype)
        self._owner: dict[str, int] = {}  # request id -> its replica, until it ends

    def default_sampling_params(self) -> SamplingParams:
        return self.replicas[0].default_sampling_params()

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0) -> None:
        """Validates and queues a request on the replica with the fewest outstanding requests
        (see LLMEngine.add_request)."""
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = self.router.route()
        try:
            self.replicas[replica].add_request(request_id, prompt, params, priority)
        except BaseException:
            self.router.release(replica)
            raise
        self._owner[request_id] = replica

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Aborts a request on its replica (see LLMEngine.abort_request)."""
        replica = self._owner.pop(request_id, None)
        if replica is None:
            return None
        self.router.release(replica)
        return self.replicas[replica].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    def run_to_completion(self, progress: Any = None) -> dict[str, RequestOutput]:
        """Steps every replica that has work, concurrently, until none has; returns each
        request's final output by id. If this thread is interrupted, or a replica's loop
        raises, the other replicas stop after their current step and the error is raised here
        (their requests stay queued; `LLM.generate` aborts them)."""
        finished: dict[str, RequestOutput] = {}
        lock = threading.Lock()  # `finished` and `progress` are shared by the loops
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop(engine: LLMEngine) -> None:
            try:
                while engine.has_unfinished_requests() and not stop.is_set():
                    for output in engine.step(include_unfinished=False):
                        if output.finished:
                            with lock:
                                finished[output.request_id] = output
                                if progress is not None:
                                    progress.update(1)
            except BaseException as error:  # noqa: BLE001 - raised on the caller's thread
                errors.append(error)
                stop.set()

        threads = [threading.Thread(target=loop, args=(engine,), daemon=True,
                                    name=f"pjllm-replica-{index}")
                   for index, engine in enumerate(self.replicas)
                   if engine.has_unfinished_requests()]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            raise
        finally:
            for request_id in finished:
                self.router.release(self._owner.pop(request_id))
        if errors:
            raise errors[0]
        return finished

    def reset_prefix_cache(self) -> bool:
        return all([replica.reset_prefix_cache() for replica in self.replicas])

    def shutdown(self) -> None:
        """Shuts every replica down (see LLMEngine.shutdown). Idempotent."""
        for replica in self.replicas:
            replica.shutdown()
        self._owner = {}
