#!/usr/bin/env bash
# The GPU rehearsal on the GPU machine, from the repository root: installs the kit (.whl/, from
# `make gpu-kit`) into a temporary folder beside the machine's own torch, then runs
# `python -m icm_lab.tools.rehearsal OUT_DIR [args]` (docs/gpu.md).
#   bash icm_lab/tools/gpu_rehearsal.sh OUT_DIR [--only sd15 ...]
set -euo pipefail
out=${1:?usage: gpu_rehearsal.sh OUT_DIR [rehearsal args]}
shift
python=${PYTHON:-python3}  # the machine's own, with its torch
ls .whl/*.whl >/dev/null 2>&1 || {
  echo "no wheels in $PWD/.whl/: run 'make gpu-kit' in the repository root first" >&2; exit 2; }
site=$(mktemp -d /tmp/icm_lab-kit.XXXXXX)
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
"$python" -m icm_lab.tools.rehearsal "$out" "$@"
