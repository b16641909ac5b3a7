#!/usr/bin/env bash
# Regenerates the Python stubs of protos/sfllm/v1/*.proto beside the protos (what `make proto` runs).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. in place)
# The include root is the repository root, so the stubs import as `protos.sfllm.v1.worker_pb2`
# from a checkout and from an installed package alike.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"
cd "$root"
"$python" -m grpc_tools.protoc -I. \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/sfllm/v1/*.proto
