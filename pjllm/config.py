"""Configuration dataclasses: what the engine and the model are, validated at construction.

Every switch lives here, in explicit fields; nothing is read from environment variables.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pjllm.validation import as_float32, is_int

# The allowed values of the string options (also the choices of the `pjllm bench` flags).
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "pallas", "reference")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
WARMUP_MODES = ("auto", "background", "blocking", "off")
GENERATION_CONFIG_MODES = ("auto", "none")
SCHEDULING_POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
PAGE_SIZES = (8, 16, 32, 64, 128)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_int(field: str, value: Any, minimum: int | None, or_none: bool = False) -> None:
    if not is_int(value) or (minimum is not None and value < minimum):
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{field} must be {allowed}{' or None' if or_none else ''}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model, in HF config terms (transformers' field names where
    they differ are resolved by each family's `adapt_hf_config`); each family reads the fields
    it uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5  # families with LayerNorm (GPT-2, GPT-NeoX)
    hidden_act: str = "silu"  # the MLP's activation, by transformers' name
    # The share of each head's features that rotary embeddings rotate (GPT-NeoX's rotary_pct).
    partial_rotary_factor: float = 1.0
    # Attention and MLP both read the layer's input and add to the residual (GPT-NeoX, Falcon),
    # through one shared LayerNorm or (2) each its own (Falcon's new decoder architecture).
    parallel_residual: bool = False
    parallel_norms: int = 1
    # Gemma 3: attention scores scaled by query_pre_attn_scalar ** -0.5 (not head_dim's), the
    # sliding-window layers' own rotary base, and logits capped by tanh at +-this value.
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    final_logit_softcapping: float | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Local attention: a windowed layer's token sees itself and the sliding_window - 1 tokens
    # before it. Which layers: layer_types ("sliding_attention" / "full_attention" per layer,
    # as transformers names them), or every layer when layer_types is None (Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # ALiBi position biases instead of position embeddings (BLOOM, Falcon-RW).
    alibi: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.mlp_bias:
            raise ValueError("ModelConfig.mlp_bias=True is not supported; supported: False")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every layer has the same one (then KV before it is never read
        again), else None."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return windows.pop() if len(windows) == 1 else None

    @property
    def has_full_causal_layers(self) -> bool:
        """Whether some layer attends to its whole context with no position bias: the layers
        cascade attention serves (a shared prefix read once for every sequence)."""
        return not self.alibi and any(self.layer_window(i) is None for i in range(self.num_layers))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def max_context_len(self) -> int:
        """The longest context the model supports: max_position_embeddings, stretched by linear
        or dynamic rope scaling where the family's configs state the original context (llama3
        configs, and Gemma 3's, state the extended one)."""
        from pjllm.models.registry import model_class

        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in ("linear", "dynamic") and model_class(self.architecture).rope_scaling_extends_context:
            return int(self.max_position_embeddings * scaling.get("factor", 1.0))
        if kind == "yarn":  # as vLLM: the original context, stretched
            return int(scaling["original_max_position_embeddings"] * scaling["factor"])
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a ModelConfig from the dict of an HF `config.json`."""
        from pjllm.models.registry import model_class, resolve_architecture

        architecture = resolve_architecture(hf.get("architectures") or [hf.get("model_type", "")])
        family = model_class(architecture)
        hf = family.adapt_hf_config(hf)  # the family's own names and defaults
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_parameters = hf.get("rope_parameters")
        partial_rotary_factor = hf.get("partial_rotary_factor", 1.0)
        rope_local_theta = hf.get("rope_local_base_freq")
        if isinstance(rope_parameters, dict) and "full_attention" in rope_parameters:
            # Per layer type (Gemma 3): the global layers' settings, and the local layers' base.
            rope_local_theta = rope_parameters.get("sliding_attention", {}).get(
                "rope_theta", rope_local_theta)
            rope_parameters = rope_parameters["full_attention"]
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            partial_rotary_factor = rope_parameters.get("partial_rotary_factor",
                                                        partial_rotary_factor)
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        if rope_scaling is not None and rope_scaling.get("rope_type",
                                                          rope_scaling.get("type")) == "default":
            rope_scaling = None
        if (rope_scaling is not None and rope_scaling.get("rope_type") == "yarn"
                and "original_max_position_embeddings" not in rope_scaling):
            # (transformers' default for YaRN's original context.)
            rope_scaling = {**rope_scaling,
                            "original_max_position_embeddings": hf.get("max_position_embeddings")}
        sliding_window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        layer_types = hf.get("layer_types")
        if layer_types is None and sliding_window and architecture == "Qwen2ForCausalLM":
            # Older Qwen2 configs: the layers from max_window_layers on are windowed.
            layer_types = ["sliding_attention" if i >= hf.get("max_window_layers", 0)
                           else "full_attention" for i in range(hf["num_hidden_layers"])]
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            layer_norm_eps=hf.get("layer_norm_epsilon", hf.get("layer_norm_eps", 1e-5)),
            hidden_act=hf.get("hidden_act", "silu"),
            partial_rotary_factor=float(partial_rotary_factor),
            parallel_residual=bool(hf.get("use_parallel_residual", False)),
            parallel_norms=hf.get("num_ln_in_parallel_attn") or 1,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            rope_local_theta=rope_local_theta,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama exposes it as `attention_bias`.
            attention_bias=bool(hf.get("attention_bias", architecture == "Qwen2ForCausalLM")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding_window,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            alibi=bool(hf.get("alibi", False)),
        )


@dataclasses.dataclass
class EngineConfig:
    """Everything the engine needs to know beyond the request stream.

    `model` is an HF directory, a `.gguf` file, or a `config.json` path/dir with
    `load_format="dummy"` (random weights, for benchmarks).
    """

    model: str
    tokenizer: str | None = None
    # No tokenizer: prompts must be token ids and outputs carry no text (as vLLM's option).
    skip_tokenizer_init: bool = False
    dtype: str = "auto"  # "auto": bfloat16 on accelerators, float32 on CPU
    load_format: str = "auto"
    max_model_len: int | None = None
    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_pages: int | None = None
    # Batch limits of one step (vLLM's offline defaults on large GPUs): more sequences per step
    # amortize each read of the weights; None tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS.
    max_num_seqs: int = 1024
    max_num_batched_tokens: int | None = None
    seed: int = 0
    # Prepare step N+1 on the host while the device runs step N (off: one step at a time).
    async_scheduling: bool = True
    # Automatic prefix caching (on, as in vLLM): a request starts after the longest run of
    # cached full pages matching its tokens; pages no request holds stay cached until evicted,
    # least recently used first.
    enable_prefix_caching: bool = True
    # Cascade attention (as vLLM's, which disable_cascade_attn turns off): when every sequence of
    # a step begins with the same cached pages (a shared system prompt), attention reads them
    # once for the whole step instead of once per sequence. Needs prefix caching, which is what
    # shares pages between requests.
    disable_cascade_attn: bool = False
    # The order requests are scheduled in: "fcfs" (arrival) or "priority" (each request's
    # `priority`, lower first, then arrival; the least urgent running one is preempted first).
    scheduling_policy: str = "fcfs"
    # What preemption does with a sequence's KV when pages run out: "recompute" (vLLM V1's only
    # mode: drop it, compute it again on readmission) or "swap" (copy it to host memory, up to
    # swap_space GiB, and back; past that, recompute).
    preemption_mode: str = "recompute"
    swap_space: float = 4.0
    attention_backend: str = "auto"
    # Tensor parallelism, as vLLM's: one model split across this many devices (attention by
    # heads, MLP by features, embeddings by vocabulary; pjllm/sharding). Pipeline parallelism
    # is not supported (only 1).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Data parallelism, as vLLM's: this many independent engine replicas, replica i on devices
    # [i x tensor_parallel_size, (i + 1) x tensor_parallel_size), each request routed to the
    # replica with the fewest outstanding requests (pjllm/engine/router.py).
    data_parallel_size: int = 1
    # Several hosts (JAX's distributed runtime, `jax.distributed.initialize`): every process
    # starts the same command with the coordinator's HOST:PORT, the number of processes and its
    # own id; the mesh spans all their devices. Process 0 schedules and (serving) answers HTTP;
    # the others follow its steps (pjllm/sharding/distributed.py).
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    # JAX's persistent compilation cache (a restart skips XLA's compiles), and in its
    # `pjllm-programs` subfolder the compiled step programs (a restart skips tracing and
    # lowering them too: runner/executable_store.py). None: neither.
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "pjllm", "xla"))
    # Compiling the step program of every token bucket ahead of use: "background" (the engine
    # serves at once; a step whose program is not built yet waits for that one), "blocking"
    # (the constructor returns when all are built), "off" (each compiles when first needed), or
    # "auto": background on accelerators, off on CPU.
    warmup: str = "auto"
    # The most top logprobs a request may ask for (`logprobs`, `prompt_logprobs`), as vLLM's
    # --max-logprobs: a step that returns any computes this many for every row (one program
    # for every count), and a request asking for more is refused.
    max_logprobs: int = 20
    # Default sampling parameters of a request that sets none: "auto" takes the model's
    # generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
    # max_new_tokens), as vLLM does; "none" keeps SamplingParams' own defaults.
    generation_config: str = "auto"

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """EngineConfig(model, **kwargs), refusing unknown keywords by name (a misspelt option
        must not pass silently)."""
        fields = {field.name for field in dataclasses.fields(cls)} - {"model"}
        unknown = set(kwargs) - fields
        if unknown:
            raise ValueError(f"unknown engine argument(s) {sorted(unknown)}; allowed: {sorted(fields)}")
        return cls(model=model, **kwargs)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a path to an HF directory, a .gguf file or a config.json")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ValueError(f"tokenizer must be a path or None; got {self.tokenizer!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("warmup", self.warmup, WARMUP_MODES)
        _check_choice("generation_config", self.generation_config, GENERATION_CONFIG_MODES)
        _check_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        _check_choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        if (isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float))
                or not 0 <= self.swap_space < float("inf")):
            raise ValueError(f"swap_space must be a number of GiB >= 0; got {self.swap_space!r}")
        _check_int("page_size", self.page_size, 1)
        _check_choice("page_size", self.page_size, PAGE_SIZES)
        for name, minimum in (("max_num_seqs", 1), ("seed", None), ("max_logprobs", 0),
                              ("tensor_parallel_size", 1), ("pipeline_parallel_size", 1),
                              ("data_parallel_size", 1), ("num_processes", 1), ("process_id", 0)):
            _check_int(name, getattr(self, name), minimum)
        for name in ("max_model_len", "num_pages", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, or_none=True)
        utilization = as_float32(self.gpu_memory_utilization)
        if utilization is None or not 0.0 < utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be a number in (0, 1]; "
                             f"got {self.gpu_memory_utilization!r}")
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size must be 1 (pipeline parallelism is not "
                             f"supported yet); got {self.pipeline_parallel_size}")
        for name in ("skip_tokenizer_init", "async_scheduling", "enable_prefix_caching",
                     "disable_cascade_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        self._check_processes()
        if self.compilation_cache_dir is not None and not isinstance(self.compilation_cache_dir, str):
            raise ValueError("compilation_cache_dir must be a path or None; "
                             f"got {self.compilation_cache_dir!r}")

    def _check_processes(self) -> None:
        """The multi-host fields: a process id below num_processes, a coordinator HOST:PORT
        with several processes, and what does not span processes yet refused by name."""
        if self.process_id >= self.num_processes:
            raise ValueError(f"process_id must be in [0, num_processes ({self.num_processes})); "
                             f"got {self.process_id}")
        address = self.coordinator_address
        if address is not None and (not isinstance(address, str) or address.rpartition(":")[0] == ""
                                    or not address.rpartition(":")[2].isdigit()):
            raise ValueError(f"coordinator_address must be HOST:PORT or None; got {address!r}")
        if self.num_processes == 1:
            return
        if address is None:
            raise ValueError(f"num_processes ({self.num_processes}) > 1 needs coordinator_address "
                             f"(HOST:PORT of process 0)")
        if self.data_parallel_size != 1:
            raise ValueError(f"data_parallel_size must be 1 with num_processes > 1 (one replica "
                             f"spans the processes); got {self.data_parallel_size}")
        if self.preemption_mode == "swap":
            raise ValueError("preemption_mode 'swap' is not supported with num_processes > 1; "
                             "use 'recompute'")
