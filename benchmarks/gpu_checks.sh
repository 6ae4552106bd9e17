#!/usr/bin/env bash
# The GPU checks and benchmarks, one step per call (each fits a 10-minute command), on a
# machine with one CUDA GPU and the image's python3 (torch, triton, transformers, safetensors;
# ray/nixl are not needed by these steps; benchmarks/gpu_wheels.sh brings them for the serving
# runs). Output goes to stdout and, when $OUT is set, to
# $OUT/<step>.log.
#
#   bash benchmarks/gpu_checks.sh tests     # every `gpu`-marked test + the parity suite on CUDA
#   bash benchmarks/gpu_checks.sh decode    # V2-Lite shapes, batch 1/32/128, 1k context, vs HF
#   bash benchmarks/gpu_checks.sh fp8       # the same with FP8 routed experts (ours only)
#   bash benchmarks/gpu_checks.sh prefill   # 8 x 2048-token prompts
#   bash benchmarks/gpu_checks.sh eplb      # EPLB load/prepare/execute timings on the GPU
#   bash benchmarks/gpu_checks.sh ep        # a one-rank NCCL EP pool, grouped GEMM backends
#   bash benchmarks/gpu_checks.sh kv        # NIXL KV transfer GPU->GPU between two actors,
#                                           # scattered vs consecutive pages (gpu_wheels.sh)
#   bash benchmarks/gpu_checks.sh serve     # pdserve serve + bench: the disaggregated pair
#                                           # sharing the GPU, then colocated (needs the
#                                           # packages of benchmarks/gpu_wheels.sh on PYTHONPATH)
#   bash benchmarks/gpu_checks.sh all [S]   # tests, decode, prefill, eplb, ep, fp8 in that order
#                                           # within S seconds in all (default 540): each step
#                                           # gets a share of what is left (tests 40%, each
#                                           # benchmark half, fp8 the rest), a step that cannot
#                                           # start with 30 s left is skipped and says so (one
#                                           # device call when the device time is short)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step=${1:?usage: gpu_checks.sh tests|decode|fp8|prefill|eplb|ep|kv|serve|all [seconds]}
if [ "$step" = all ]; then
  deadline=$((SECONDS + ${2:-540}))
  status=0
  # The most a step may take of what is left (percent), so that a hung test cannot eat the
  # benchmarks' time: tests 40%, then each benchmark half of the rest, the last one all.
  declare -A share=([tests]=40 [decode]=50 [prefill]=50 [eplb]=50 [ep]=50 [fp8]=100)
  for s in tests decode prefill eplb ep fp8; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
      echo "== $s: skipped (${left} s left)"
      status=1
      continue
    fi
    cap=$((left * share[$s] / 100))
    cap=$((cap < 30 ? 30 : cap))
    echo "== $s (up to ${cap} of ${left} s left)"
    timeout -k 5 "$cap" bash "$0" "$s" || { echo "== $s: exit $?"; status=1; }
  done
  exit "$status"
fi
log=/dev/null
if [ -n "${OUT:-}" ]; then log="$OUT/$step.log"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__)" | tee -a "$log"

case "$step" in
  tests)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_cuda_graph.py \
      tests/test_fused_moe_kernel.py tests/test_mla_decode_kernel.py tests/test_kernel_engine.py \
      tests/test_gpu_sampling.py tests/test_speculative.py tests/test_mtp.py \
      2>&1 | tee -a "$log"
    ;;
  decode)
    "$PY" benchmarks/offline.py --model v2-lite --device cuda --dtype bfloat16 --batch 1 32 128 \
      --input-len 1024 --output-len 64 --transformers-output-len 8 2>&1 | tee -a "$log"
    ;;
  fp8)
    "$PY" benchmarks/offline.py --model v2-lite --fp8-experts --device cuda --dtype bfloat16 \
      --batch 1 32 128 --input-len 1024 --output-len 64 --no-transformers 2>&1 | tee -a "$log"
    ;;
  prefill)
    "$PY" benchmarks/offline.py --model v2-lite --device cuda --dtype bfloat16 --batch 8 \
      --input-len 2048 --output-len 2 --no-transformers 2>&1 | tee -a "$log"
    ;;
  eplb)
    "$PY" benchmarks/eplb_phases.py --device cuda 2>&1 | tee -a "$log"
    ;;
  ep)
    "$PY" benchmarks/ep_pool.py --device cuda --dtype bfloat16 --model v2-lite --num-layers 8 \
      --ranks 1 --grouped-gemm-backend torch deep_gemm --batch 64 --input-len 512 \
      --output-len 64 2>&1 | tee -a "$log"
    ;;
  kv)
    "$PY" benchmarks/kv_transfer.py --device cuda --reps 10 2>&1 | tee -a "$log"
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_transfer.py \
      tests/test_transfer_ahead.py 2>&1 | tee -a "$log"
    "$PY" benchmarks/kv_write_ahead.py --device cuda --dtype bfloat16 --hidden 2048 \
      --layers 27 --input-len 1024 4096 --reps 5 2>&1 | tee -a "$log"
    ;;
  serve)
    # The built-in tiny model measures the serving machinery (HTTP, Ray, NIXL between two
    # actors sharing the GPU), not the GPU's arithmetic. DEVICE/DTYPE/BENCH_ARGS override.
    bench_args=${BENCH_ARGS:---num-prompts 512 --input-len 128 --output-len 128 --concurrency 128}
    for topology in disaggregated colocated; do
      extra=()
      if [ "$topology" = colocated ]; then extra=(--colocated); fi
      serve_log=$(mktemp)
      "$PY" -m orchestrator.cli serve --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
        --port 30000 "${extra[@]}" > "$serve_log" 2>&1 &
      server=$!
      for _ in $(seq 300); do
        grep -q "serving .* on http" "$serve_log" && break
        kill -0 "$server" 2> /dev/null || break
        sleep 1
      done
      if ! grep -q "serving .* on http" "$serve_log"; then
        echo "pdserve serve did not come up ($topology):" | tee -a "$log"
        tail -30 "$serve_log" | tee -a "$log"
        kill "$server" 2> /dev/null
        exit 1
      fi
      echo "== $topology" | tee -a "$log"
      # shellcheck disable=SC2086
      "$PY" -m orchestrator.cli bench --url http://127.0.0.1:30000 $bench_args 2>&1 | tee -a "$log"
      echo "== $topology, sampled (temperature 0.8, top_p 0.95)" | tee -a "$log"
      # shellcheck disable=SC2086
      "$PY" -m orchestrator.cli bench --url http://127.0.0.1:30000 $bench_args \
        --temperature 0.8 --top-p 0.95 2>&1 | tee -a "$log"
      "$PY" -m orchestrator.cli status --url http://127.0.0.1:30000 2>&1 | tee -a "$log"
      kill -TERM "$server"
      wait "$server"
      rm -f "$serve_log"
    done
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
