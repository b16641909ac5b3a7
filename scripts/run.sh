#!/usr/bin/env bash
# Start one worker and the gateway in the foreground; Ctrl-C stops both.
# With more than one GPU visible: one worker per GPU (or per tensor-parallel group) instead, scripts/run_gpus.sh.
set -euo pipefail
MODEL=${1:-}; HOST=${2:-127.0.0.1}; PORT=${3:-8000}; WORKER_PORT=${4:-50051}; METRICS_PORT=${5:-9400}
cd "$(dirname "$0")/.."
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  num_gpus=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
else
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "${num_gpus:-0}" -gt 1 ]; then
  exec bash scripts/run_gpus.sh "$@"
fi
BIN=.venv/bin
model_args=()
[ -n "$MODEL" ] && model_args=(--model "$MODEL")

"$BIN/sfllm-worker" "${model_args[@]}" --host 127.0.0.1 --port "$WORKER_PORT" --metrics-port "$METRICS_PORT" &
worker=$!
trap 'kill -TERM $worker ${gateway:-} 2>/dev/null; wait' EXIT INT TERM
"$BIN/sfllm-gateway" --workers "127.0.0.1:$WORKER_PORT" --host "$HOST" --port "$PORT" &
gateway=$!

echo "Waiting for the worker to load the model (the first start converts and caches it)..."
healthy() { "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; }
until healthy "http://$HOST:$PORT/health"; do
  kill -0 $worker 2>/dev/null || { echo "worker exited"; exit 1; }
  sleep 1
done
cat <<MSG

SFLLM is serving on http://$HOST:$PORT/v1 (worker gRPC on 127.0.0.1:$WORKER_PORT, metrics on :$METRICS_PORT)
Try:
  curl -s http://$HOST:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "gemma3-270m", "prompt": "<bos>The capital of France is", "max_tokens": 32, "temperature": 0}'
Ctrl-C stops it.
MSG
wait
