#!/usr/bin/env bash
# On the GPU machine: install the brought wheels into /tmp/site, then run benchmarks/gpu_check.py (the package
# benchmarks/gpu_check/) on the brought Multi30k data, writing results.jsonl, table.txt and log.txt into
# RESULTS_DIR (docs/gpu_check.md).
#   bash benchmarks/gpu_check.sh RESULTS_DIR [gpu_check.py options, e.g. --parts speed,decode --budget-s 200]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh RESULTS_DIR [gpu_check.py options]}
shift
if [[ ! -d .whl || ! -d .gpu_check_data ]]; then
  echo "error: .whl/ or .gpu_check_data/ is missing: run benchmarks/gpu_check_prepare.sh, and carry both" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
exec python3 benchmarks/gpu_check.py --out "$out" --data .gpu_check_data "$@"
