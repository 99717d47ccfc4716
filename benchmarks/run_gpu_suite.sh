#!/usr/bin/env bash
# The speed issue's measurements on one GPU, Llama-3-8B config with dummy weights, bf16; and the
# model families' (parity on the Pallas path, chat throughput, the sliding-window decode kernel).
# Usage (repository root): bash benchmarks/run_gpu_suite.sh [engine|compare|profile-hf|gemm|kernels|
#                          parity|families|window|scaling|steps] ...
# Results (JSON + logs) land in $OUT when set (the device tool), else benchmarks/results/.
set -u
results=${OUT:-benchmarks/results}
model=benchmarks/configs/llama-3-8b.json
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
bench=(python -m pjllm.entrypoints.cli bench)
compare=(python -m benchmarks.compare_hf)  # pjllm beside HF transformers (needs torch)
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, keep the log, print its end
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$results/$name.log" 2>&1
  echo "== $name: exit $?"; grep -v -i "warn\|tpu" "$results/$name.log" | tail -n 12
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for group in "$@"; do
  case $group in
    kernels)  # pjllm bench kernels, with device time per call from the JAX profiler
      step kernels 120 python -m benchmarks.profile_kernels --output-json "$results/kernels.json" ;;
    engine)
      step chat 180 "${bench[@]}" throughput --model $model --load-format dummy --dataset chat \
        --output-json "$results/throughput-chat.json"
      step latency 100 "${bench[@]}" latency --model $model --load-format dummy --batch-sizes 1,8 \
        --input-len 128 --output-len 64 --num-iters 3 --output-json "$results/latency.json"
      step startup 150 "${bench[@]}" startup --model $model --load-format dummy \
        --output-json "$results/startup.json" ;;
    compare)  # HF with its CUDA graphs; its KV cache at 50% of free memory (its graphs OOM at 80-90%)
      hf_config='{"use_cuda_graph": true, "max_memory_percent": 0.5}'
      step latency-both 200 "${compare[@]}" latency --model $model --load-format dummy --batch-sizes 1,8 \
        --input-len 128 --output-len 64 --num-iters 3 --backend both --hf-cb-config "$hf_config" \
        --output-json "$results/latency-both.json"
      # HF takes ~5.5 min on chat x 1000: run the two backends as separate steps (10 min per device call)
      step chat-pjllm 180 "${compare[@]}" throughput --model $model --load-format dummy --dataset chat \
        --backend pjllm --output-json "$results/throughput-chat-pjllm.json"
      step chat-hf 560 "${compare[@]}" throughput --model $model --load-format dummy --dataset chat \
        --backend hf --hf-cb-config "$hf_config" --output-json "$results/throughput-chat-hf.json" ;;
    profile-hf)  # where HF's time goes: torch profiler over chat x 300
      step hf-profile 300 "${compare[@]}" throughput --model $model --load-format dummy --dataset chat \
        --num-prompts 300 --backend hf --hf-cb-config '{"use_cuda_graph": true, "max_memory_percent": 0.5}' \
        --profile-dir /tmp/pjllm-hf-profile --output-json "$results/throughput-chat300-hf-profile.json" ;;
    parity)  # every family's HF goldens (float32) through the Pallas kernels
      step parity 400 python -m pytest -q -p no:cacheprovider tests/models/test_hf_parity.py -k pallas ;;
    families)  # chat beside Llama-3-8B's, the same context limit (Llama-3-8B's 8,192)
      for config in ${FAMILY_CONFIGS:-qwen3-8b gemma-3-12b-text llama-3-8b}; do
        step "chat-$config" 280 "${bench[@]}" throughput --model benchmarks/configs/$config.json \
          --load-format dummy --dataset chat --max-model-len 8192 \
          --output-json "$results/throughput-chat-$config.json"
      done ;;
    window)  # a decode with a 1,024-token window at context 4,096, beside unwindowed 1,024 and 4,096
      step window 200 python -m benchmarks.profile_kernels --cases "B64 ctx4096,B64 ctx1024" \
        --impls pallas --output-json "$results/kernels-window.json" ;;
    scaling)  # the multi-GPU issue's runs (a host with 4 GPUs): TP 1, 2, 4 on the 8B config,
              # 70B at TP 4, data parallel 2 x TP 1 against TP 2; NVLink multicast stays off
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      for tp in 1 2 4; do
        step "chat-tp$tp" 400 "${bench[@]}" throughput --model $model --load-format dummy --dataset chat \
          --max-model-len 8192 --tensor-parallel-size $tp --output-json "$results/throughput-chat-tp$tp.json"
        step "latency-tp$tp" 300 "${bench[@]}" latency --model $model --load-format dummy --batch-sizes 1,8 \
          --input-len 128 --output-len 64 --num-iters 3 --max-model-len 8192 --tensor-parallel-size $tp \
          --output-json "$results/latency-tp$tp.json"
      done
      step chat-dp2 400 "${bench[@]}" throughput --model $model --load-format dummy --dataset chat \
        --max-model-len 8192 --data-parallel-size 2 --output-json "$results/throughput-chat-dp2.json"
      step chat-70b-tp4 560 "${bench[@]}" throughput --model benchmarks/configs/llama-3-70b.json \
        --load-format dummy --dataset chat --max-model-len 8192 --tensor-parallel-size 4 \
        --output-json "$results/throughput-chat-70b-tp4.json"
      step latency-70b-tp4 400 "${bench[@]}" latency --model benchmarks/configs/llama-3-70b.json \
        --load-format dummy --batch-sizes 1 --input-len 128 --output-len 64 --num-iters 3 \
        --max-model-len 8192 --tensor-parallel-size 4 --output-json "$results/latency-70b-tp4.json" ;;
    steps)  # chat x1000 step by step against the schedule model at the H200's measured rates,
            # with steps 500-539 (the decode tail) traced
      step step-times 300 python -m benchmarks.step_times --model $model --load-format dummy --dataset chat \
        --max-model-len 8192 --matmul-tflops 706 --weight-tbps 2.6 --attention-tbps 4.0 --step-overhead-ms 1.1 \
        --trace-steps 500:540 --trace-dir /tmp/pjllm-step-trace --output-json "$results/step-times-chat.json" ;;
    gemm)  # matmul rates at the step's shapes, and whole prefill steps of the engine
      step gemm 120 python -m benchmarks.gemm_rates --config $model --output-json "$results/gemm-rates.json"
      step prefill-profile 200 python -m benchmarks.profile_steps --config $model --prefill --num-seqs 256 \
        --context 512 --steps 8 --top 14 ;;
  esac
done
