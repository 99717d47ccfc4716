"""Write the golden files under tests/golden/ from HF transformers (PyTorch, CPU, float32).

Needs torch, transformers, accelerate, gguf and safetensors, which pjllm itself does not; run it
with a separate environment, e.g.

    python -m venv /tmp/goldens && /tmp/goldens/bin/pip install torch transformers accelerate gguf
    /tmp/goldens/bin/python scripts/make_goldens.py [--gguf PATH]

It writes:
- tests/golden/<name>/{config.json, model.safetensors, expected.json} for each tiny random model
  of TINY_MODELS (the Llama family's variants, qwen3, gpt2, gpt_neox, ...): expected.json holds, per prompt, the prompt's
  token logprobs, the top-5 next-token ids/logprobs at every position, and a 16-token greedy
  continuation.
- tests/golden/smollm2_gguf.npz: rows and sums of tensors transformers dequantizes from the SmolLM2
  GGUF (the file `pjllm.models.default_model` downloads), to check our dequantizer against.
- tests/golden/smollm2_chat.json: that model's chat template rendering, its token ids, sample
  tokenizations, transformers' greedy continuation, and the file's quant types.
- tests/golden/beam_search.json: HF beam search on two of the tiny models (`--only beam` writes
  just this, from the tiny models already there).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, BloomConfig, FalconConfig,
                          Gemma3TextConfig, GenerationConfig, GPT2Config, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
SEED = 1234
PROMPT_LENGTHS = (5, 13, 37)
GREEDY_TOKENS = 16
TOP_K = 5

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)

TINY_MODELS = {
    # Llama 2 style: MHA, untied, plain rope.
    "llama2": LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          rope_theta=10000.0, tie_word_embeddings=False),
    # Llama 3 style: GQA, head_dim 32 != hidden 64 / 4 heads, llama3 rope scaling whose
    # ramp covers several frequencies of this small head_dim.
    "llama3": LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                           "factor": 4.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}),
    # YaRN rope scaling (Qwen2.5's long-context setting), original context 64 x factor 4.
    "llama_yarn": LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                               "factor": 4.0,
                                               "original_max_position_embeddings": 64}),
    "mistral": MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
    # Mistral with its sliding window, shorter than two of the three prompts.
    "mistral_window": MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, rope_theta=10000.0, sliding_window=8,
                                    tie_word_embeddings=False),
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2": Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False),
    # Llama with tied embeddings and MQA (one KV head).
    "llama_tied_mqa": LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=16, rope_theta=10000.0, tie_word_embeddings=True),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 != hidden 64 / 4 heads, untied.
    "qwen3": Qwen3Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False),
    # GPT-2: learned positions, LayerNorm, gelu_new, Conv1D weights, biases, tied embeddings.
    "gpt2": GPT2Config(vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                       n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # GPT-NeoX / Pythia: rotary on a quarter of each head, parallel residual, fused per-head QKV.
    "gpt_neox": GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=256, rotary_pct=0.25,
                              use_parallel_residual=True, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0),
    # ... and with the residual in sequence, rotary on half of each head.
    "gpt_neox_sequential": GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128,
                                         max_position_embeddings=256, rotary_pct=0.5,
                                         use_parallel_residual=False, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0),
    # Gemma 3 text: two sliding-window layers (window 8, shorter than two of the prompts) and a
    # global one, each kind with its own rotary base; q/k norms, four unit-offset norms a layer,
    # scaled embeddings, GeGLU, query_pre_attn_scalar != head_dim, and (as Gemma 2 had) final
    # logit soft-capping.
    "gemma3": Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=0),
    # BLOOM: ALiBi (6 heads: slopes past the largest power of two), embedding LayerNorm.
    "bloom": BloomConfig(vocab_size=256, hidden_size=96, n_layer=2, n_head=6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
    # Falcon-7B style: multi-query, attention and MLP in parallel on one LayerNorm, no biases.
    "falcon_mqa": FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, multi_query=True, parallel_attn=True,
                               bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Falcon-40B/180B style: the new decoder architecture, 2 KV heads, two LayerNorms.
    "falcon_new": FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_kv_heads=2,
                               new_decoder_architecture=True, bias=False, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0),
    # Multi-head, attention then MLP (not parallel), with biases.
    "falcon_sequential": FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, multi_query=False,
                                      parallel_attn=False, bias=True, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0),
    # Falcon-RW: ALiBi instead of rotary (4 heads: power-of-two slopes, so the bias transformers
    # rounds to bfloat16 is exact over these short prompts), multi-head, sequential, biases.
    "falcon_alibi": FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, multi_query=False, parallel_attn=False,
                                 bias=True, alibi=True, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0),
    # head_dim 80 (Phi-2, GPT-NeoX 2.7B): not a power of two, which the Pallas kernels pad inside.
    "llama_hd80": LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=80,
                              rope_theta=10000.0, tie_word_embeddings=False),
}


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights with some spread (HF's 0.02 init gives near-uniform logits and tied argmaxes)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:  # norm weights (also per-head q/k norms)
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif any(part in name for part in ("embed_tokens", "lm_head", "wte", "embed_in",
                                               "embed_out", "word_embeddings")):
                # Also the output layer when tied: logits of std ~3 after the final norm.
                param.copy_(3.0 * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


def _prompt_record(model: torch.nn.Module, ids: list[int]) -> dict:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    prompt_logprobs = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    top = torch.topk(logprobs, TOP_K, dim=-1)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS,
                                  eos_token_id=None, pad_token_id=0, bos_token_id=None,
                                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gen_config,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    greedy = out.sequences[0, len(ids):].tolist()
    assert len(greedy) == GREEDY_TOKENS, greedy
    step_logprobs = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    margins = [float(torch.topk(lp, 2).values[0] - torch.topk(lp, 2).values[1]) for lp in step_logprobs]
    return {
        "prompt_ids": ids,
        "prompt_logprobs": prompt_logprobs.tolist(),
        "top5_ids": top.indices.tolist(),
        "top5_logprobs": top.values.tolist(),
        "greedy_ids": greedy,
        "greedy_logprobs": [float(lp[t]) for lp, t in zip(step_logprobs, greedy)],
        "greedy_min_margin": min(margins),
    }


# Greedy steps whose top-2 logprobs are closer than this could flip under float32 rounding
# differences between implementations; weight seeds are tried until every step clears it.
MIN_GREEDY_MARGIN = 0.05


def make_tiny(name: str, config) -> None:
    torch.manual_seed(SEED)
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM",
                             "gpt2": "GPT2LMHeadModel",
                             "gpt_neox": "GPTNeoXForCausalLM",
                             "gemma3_text": "Gemma3ForCausalLM",
                             "bloom": "BloomForCausalLM",
                             "falcon": "FalconForCausalLM"}[config.model_type]]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # continue through EOS: always 16 tokens
    rng = np.random.default_rng(SEED)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, n)] for n in PROMPT_LENGTHS]
    for attempt in range(100):
        weight_seed = SEED + sum(map(ord, name)) + attempt
        _randomize(model, torch.Generator().manual_seed(weight_seed))
        records = [_prompt_record(model, ids) for ids in prompts]
        if min(r["greedy_min_margin"] for r in records) >= MIN_GREEDY_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no weight seed gave greedy margins >= {MIN_GREEDY_MARGIN}")
    out_dir = os.path.join(GOLDEN, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))
    expected = {
        "doc": ("prompt_logprobs[i] = log p(prompt[i+1] | prompt[:i+1]) for i < L-1; "
                "top5_*[i] = top-5 of p(. | prompt[:i+1]) for i < L; greedy_ids = HF generate "
                "do_sample=False, no EOS stop; greedy_min_margin = smallest top1-top2 logprob gap "
                "over the greedy steps. float32, CPU."),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "weight_seed": weight_seed,
        "prompts": records,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    size = sum(os.path.getsize(os.path.join(out_dir, p)) for p in os.listdir(out_dir))
    print(f"{name}: {size / 1024:.0f} KiB, min greedy margin "
          f"{min(p['greedy_min_margin'] for p in expected['prompts']):.3f}")


# Rows chosen to span heads and half-heads, so a wrong q/k row permutation shows.
_ROWS = (0, 1, 2, 31, 32, 33, 63, 64, 65, 100)
_GGUF_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
)


def make_smollm2(gguf_path: str) -> None:
    import gguf

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    state = model.state_dict()
    last = model.config.num_hidden_layers - 1
    names = list(_GGUF_TENSORS) + [f"model.layers.{last}.{p}.weight" for p in
                                   ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj",
                                    "input_layernorm")]
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        tensor = state[name].float().numpy()
        rows = [r for r in _ROWS if r < tensor.shape[0]] + [tensor.shape[0] - 1]
        arrays[f"{name}:rows"] = np.array(rows, dtype=np.int64)
        arrays[f"{name}:values"] = tensor[rows] if tensor.ndim == 2 else tensor
        arrays[f"{name}:sum"] = np.array(tensor.astype(np.float64).sum())
        arrays[f"{name}:abs_sum"] = np.array(np.abs(tensor.astype(np.float64)).sum())
        arrays[f"{name}:shape"] = np.array(tensor.shape, dtype=np.int64)
    np.savez_compressed(os.path.join(GOLDEN, "smollm2_gguf.npz"), **arrays)

    reader = gguf.GGUFReader(gguf_path)
    quant_types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=24, output_scores=True,
                             return_dict_in_generate=True)
    generated = out.sequences[0, len(ids):].tolist()
    top2 = [torch.topk(torch.log_softmax(s[0].float(), -1), 2).values for s in out.scores]
    samples = ["Hello world!", "  leading spaces and 1234567 digits", "café naïve — ünïcödé 日本語",
               "<|im_start|>user\nhi<|im_end|>", "def f(x):\n\treturn x ** 2\n"]
    chat = {
        "gguf_file": filename,
        "quant_types": dict(sorted(quant_types.items())),
        "transformers_version": transformers.__version__,
        "config": {k: v for k, v in model.config.to_dict().items()
                   if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "head_dim",
                            "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                            "bos_token_id", "eos_token_id")},
        "messages": messages,
        "chat_text": text,
        "chat_ids": ids,
        "greedy_ids": generated,
        "greedy_text": tokenizer.decode(generated, skip_special_tokens=True),
        "greedy_text_raw": tokenizer.decode(generated),
        "greedy_min_margin": min(float(v[0] - v[1]) for v in top2),
        "tokenize_samples": [{"text": s, "ids": tokenizer(s, add_special_tokens=False)["input_ids"]}
                             for s in samples],
    }
    with open(os.path.join(GOLDEN, "smollm2_chat.json"), "w") as f:
        json.dump(chat, f, indent=1, ensure_ascii=False)
    print(f"smollm2: {dict(quant_types)}; greedy: {chat['greedy_text']!r}")


GEMMA3_270M_PROMPTS = ("The capital of France is", "Q: What is the capital of France?\nA:",
                       "def fibonacci(n):")
GEMMA3_270M_TOKENS = 24


def make_gemma3_270m(gguf_path: str) -> None:
    """tests/golden/gemma3_270m.json: transformers' greedy continuations (float32, from the same
    Q4_K_M GGUF that `pjllm download gemma-3-270m` fetches) of a few prompts."""
    directory, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                 dtype=torch.float32).eval()
    records = []
    for text in GEMMA3_270M_PROMPTS:
        ids = tokenizer(text).input_ids
        gen_config = GenerationConfig(do_sample=False, max_new_tokens=GEMMA3_270M_TOKENS,
                                      eos_token_id=None, pad_token_id=0,
                                      output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), generation_config=gen_config,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        greedy = out.sequences[0, len(ids):].tolist()
        margins = [float(torch.topk(s[0].float(), 2).values[0] - torch.topk(s[0].float(), 2).values[1])
                   for s in out.scores]
        records.append({"prompt": text, "prompt_ids": ids, "greedy_ids": greedy,
                        "greedy_text": tokenizer.decode(greedy), "greedy_min_margin": min(margins)})
        print(f"gemma3_270m: {text!r} -> {tokenizer.decode(greedy)!r} (min margin {min(margins):.3f})")
    with open(os.path.join(GOLDEN, "gemma3_270m.json"), "w") as f:
        json.dump({"doc": "transformers greedy (do_sample=False, no EOS stop), float32 on CPU, "
                          "logit margins of its steps", "gguf": name,
                   "transformers_version": transformers.__version__, "prompts": records}, f, indent=1)


BEAM_MODELS = ("llama3", "qwen2")
BEAM_CASES = ((4, 6, 1.0), (3, 5, 0.5))  # (num_beams, max_new_tokens, length_penalty)
# Beams whose scores lie closer than this could swap under float32 rounding differences.
MIN_BEAM_GAP = 1e-3


def make_beam_goldens() -> None:
    """tests/golden/beam_search.json: HF beam search (no EOS, every beam returned) on tiny
    models written by make_tiny, for the prompts of their expected.json. A case is kept only when
    its returned beams' scores are at least MIN_BEAM_GAP apart."""
    records = {}
    for name in BEAM_MODELS:
        model_dir = os.path.join(GOLDEN, name)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # else generate merges the config's EOS back in
        with open(os.path.join(model_dir, "expected.json")) as f:
            prompts = [p["prompt_ids"] for p in json.load(f)["prompts"]]
        cases = []
        for ids in prompts:
            for num_beams, max_new, length_penalty in BEAM_CASES:
                config = GenerationConfig(do_sample=False, num_beams=num_beams,
                                          num_return_sequences=num_beams, max_new_tokens=max_new,
                                          length_penalty=length_penalty, early_stopping=False,
                                          eos_token_id=None, pad_token_id=0, bos_token_id=None,
                                          output_scores=True, return_dict_in_generate=True)
                with torch.no_grad():
                    out = model.generate(torch.tensor([ids]), generation_config=config,
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                scores = out.sequences_scores.tolist()
                gaps = [a - b for a, b in zip(scores, scores[1:])]
                if gaps and min(gaps) < MIN_BEAM_GAP:
                    print(f"{name}: skipping prompt of {len(ids)} tokens, beams {num_beams}: "
                          f"scores {min(gaps):.2e} apart")
                    continue
                cases.append({"prompt_ids": ids, "beam_width": num_beams, "max_tokens": max_new,
                              "length_penalty": length_penalty,
                              "output_ids": out.sequences[:, len(ids):].tolist(),
                              "scores": scores})
        records[name] = cases
    golden = {"doc": ("HF generate num_beams=beam_width, num_return_sequences=beam_width, no EOS, "
                      "early_stopping=False; scores = sum of output logprobs / "
                      "output_len ** length_penalty, best first. float32, CPU."),
              "transformers_version": transformers.__version__, "torch_version": torch.__version__,
              "models": records}
    with open(os.path.join(GOLDEN, "beam_search.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print("beam_search.json:", {name: len(cases) for name, cases in records.items()}, "cases")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf "
                        "(default: pjllm's cached download)")
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--gemma3-gguf", help="path of gemma-3-270m-q4_k_m.gguf (`pjllm download "
                        "gemma-3-270m`): writes gemma3_270m.json")
    parser.add_argument("--only", action="append", choices=sorted(TINY_MODELS) + ["beam"],
                        help="write only this tiny model's goldens, or (beam) the beam search "
                             "goldens from the tiny models already written (repeatable)")
    args = parser.parse_args()
    os.makedirs(GOLDEN, exist_ok=True)
    torch.set_num_threads(4)
    if args.gemma3_gguf:
        make_gemma3_270m(args.gemma3_gguf)
        return
    for name, config in TINY_MODELS.items():
        if args.only is None or name in args.only:
            make_tiny(name, config)
    if args.only is None or "beam" in args.only:
        make_beam_goldens()
    if not args.skip_gguf:
        gguf_path = args.gguf
        if gguf_path is None:
            sys.path.insert(0, REPO)
            try:
                from pjllm.models.default_model import download_default_model
            except ImportError as e:
                raise SystemExit(f"cannot import pjllm here ({e}); pass --gguf PATH") from e
            gguf_path = download_default_model()
        make_smollm2(gguf_path)


if __name__ == "__main__":
    main()
