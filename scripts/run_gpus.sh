#!/usr/bin/env bash
# One worker per visible GPU, or per group of SFLLM_TENSOR_PARALLEL_SIZE GPUs (one tensor-parallel
# engine each), and the gateway over them, in the foreground; Ctrl-C stops everything.
# `make run` starts this when more than one GPU is visible (scripts/run.sh); run it directly to pick
# the group size:  SFLLM_TENSOR_PARALLEL_SIZE=2 bash scripts/run_gpus.sh [MODEL HOST PORT WORKER_PORT METRICS_PORT]
# Worker g listens on WORKER_PORT+g (metrics METRICS_PORT+g) and sees only its GPUs (CUDA_VISIBLE_DEVICES).
set -euo pipefail
MODEL=${1:-}; HOST=${2:-127.0.0.1}; PORT=${3:-8000}; WORKER_PORT=${4:-50051}; METRICS_PORT=${5:-9400}
TP=${SFLLM_TENSOR_PARALLEL_SIZE:-1}
unset SFLLM_TENSOR_PARALLEL_SIZE  # given to each worker as a flag below
cd "$(dirname "$0")/.."
BIN=.venv/bin
# NVLink multicast (NVLS) off unless asked for: the lent H200 machines require it off.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
groups=$(( ${#gpus[@]} / TP ))
if [ "$groups" -lt 1 ]; then
  echo "${#gpus[@]} GPU(s) visible, fewer than SFLLM_TENSOR_PARALLEL_SIZE=$TP" >&2
  exit 1
fi
[ $(( ${#gpus[@]} % TP )) -eq 0 ] || echo "warning: $(( ${#gpus[@]} % TP )) GPU(s) left out (not a whole group of $TP)" >&2

model_args=()
[ -n "$MODEL" ] && model_args=(--model "$MODEL")
pids=(); targets=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for (( g = 0; g < groups; g++ )); do
  ids=$(IFS=,; echo "${gpus[*]:$(( g * TP )):$TP}")
  port=$(( WORKER_PORT + g ))
  CUDA_VISIBLE_DEVICES=$ids "$BIN/sfllm-worker" "${model_args[@]}" --device cuda:0 --tensor-parallel-size "$TP" \
    --host 127.0.0.1 --port "$port" --metrics-port $(( METRICS_PORT + g )) &
  pids+=($!); targets+=("127.0.0.1:$port")
  echo "worker $g: GPUs $ids, gRPC 127.0.0.1:$port, metrics :$(( METRICS_PORT + g ))"
done
"$BIN/sfllm-gateway" --workers "$(IFS=,; echo "${targets[*]}")" --host "$HOST" --port "$PORT" &
pids+=($!)

echo "Waiting for the workers to load the model..."
serving() {
  "$BIN/python" - "$@" <<'PY' 2>/dev/null
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
for target in sys.argv[1:]:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
PY
}
until serving "${targets[@]}"; do
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited"; exit 1; }; done
  sleep 2
done
cat <<MSG

SFLLM is serving on http://$HOST:$PORT/v1 with $groups worker(s) of $TP GPU(s) each (gRPC ${targets[*]}).
Ctrl-C stops it.
MSG
wait
