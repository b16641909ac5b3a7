#!/usr/bin/env bash
# Download every Python package the images install into a wheelhouse, for builds that must not reach
# a package index (air-gapped sites; containers here, where pip lacks the host's index settings):
#   scripts/build_wheelhouse.sh [DIR]        # DIR: deploy/wheelhouse by default, inside the build context
#   docker build --build-arg PIP_FROM=wheelhouse ...
# Run it on a host of the images' platform and Python (Linux x86_64, CPython 3.11), with pip set up
# for an index. torch comes first and alone, so that its build is the one asked for:
#   TORCH_PIP_ARGS=""    the index's torch 2.13.0, which on PyPI is the CUDA build (GPU images);
#                        on hosts whose pip finds a CPU wheel on local disk, that one (it sorts first)
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"   the CPU build (CPU images)
# Files already in DIR are kept, so a second run only fetches what pyproject.toml added.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-deploy/wheelhouse}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
start=$(date +%s)

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
# pip warns about every configured index folder that lacks a package; only real errors are worth showing.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
"$PY" deploy/pyproject_deps.py --only torch > "$reqs"
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
quiet "$PY" -m pip download -q --no-deps -d "$DIR" -r "$reqs" ${TORCH_PIP_ARGS:-}
# The rest, torch's own dependencies included. --find-links DIR: the torch just fetched satisfies the pin.
"$PY" deploy/pyproject_deps.py --all > "$reqs"
# pip, setuptools and wheel: the images upgrade pip and build the project without build isolation.
quiet "$PY" -m pip download -q -d "$DIR" --find-links "$DIR" -r "$reqs" pip "setuptools>=68" wheel

echo "wheelhouse $DIR: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $(($(date +%s) - start)) s"
echo "torch: $(cd "$DIR" && ls torch-*.whl)"
