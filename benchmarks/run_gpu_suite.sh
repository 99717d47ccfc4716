#!/usr/bin/env bash
# The speed issue's measurements on one GPU, Llama-3-8B config with dummy weights, bf16.
# Usage (repository root): bash benchmarks/run_gpu_suite.sh [engine|compare|kernels] ...
# Results (JSON + logs) land in $OUT when set (the device tool), else benchmarks/results/.
set -u
results=${OUT:-benchmarks/results}
model=benchmarks/configs/llama-3-8b.json
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
bench=(python -m pjllm.entrypoints.cli bench)
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, keep the log, print its end
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$results/$name.log" 2>&1
  echo "== $name: exit $?"; grep -v -i "warn\|tpu" "$results/$name.log" | tail -n 12
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for group in "$@"; do
  case $group in
    kernels)
      step kernels 120 "${bench[@]}" kernels --output-json "$results/kernels.json" ;;
    engine)
      step chat 180 "${bench[@]}" throughput --model $model --load-format dummy --dataset chat \
        --output-json "$results/throughput-chat.json"
      step latency 100 "${bench[@]}" latency --model $model --load-format dummy --batch-sizes 1,8 \
        --input-len 128 --output-len 64 --num-iters 3 --output-json "$results/latency.json"
      step startup 150 "${bench[@]}" startup --model $model --load-format dummy \
        --output-json "$results/startup.json" ;;
    compare)  # HF with its CUDA graphs; 300 prompts keep its run under 2 minutes
      step chat-both 480 "${bench[@]}" throughput --model $model --load-format dummy --dataset chat \
        --num-prompts 300 --backend both --hf-cb-config '{"use_cuda_graph": true}' \
        --output-json "$results/throughput-chat300-both.json" ;;
  esac
done
