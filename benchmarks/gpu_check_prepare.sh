#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI, the two git-ignored folders benchmarks/gpu_check.sh needs on the
# GPU machine (which reaches nothing): both travel with the run tool's `carry`.
#   .whl/             the packages the GPU image lacks, as wheels for its Python 3.12 (all pure Python, ~1 MB):
#                     datasets 5.2.0 and what it needs beyond the image (dill, multiprocess), ml_collections,
#                     tensorboardX (docs/gpu_check.md lists them)
#   .gpu_check_data/  the first 6,000 Multi30k training pairs, val and test2016 (~1.3 MB; never committed)
# Usage: bash benchmarks/gpu_check_prepare.sh [MULTI30K_DIR]     (default: ../shared/data/multi30k)
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=${1:-../shared/data/multi30k}
wheels=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ml_collections==1.1.0 tensorboardX==2.6.5)
train_pairs=6000

for f in train.en train.de val.en val.de test2016.en test2016.de; do
  [[ -f "$source_dir/$f" ]] || { echo "error: $source_dir/$f is missing; give the Multi30k folder as the argument" >&2; exit 1; }
done

rm -rf .whl.tmp .gpu_check_data.tmp
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl.tmp "${wheels[@]}"

mkdir .gpu_check_data.tmp
for lang in en de; do
  head -n "$train_pairs" "$source_dir/train.$lang" > ".gpu_check_data.tmp/train.$lang"
  cp "$source_dir/val.$lang" "$source_dir/test2016.$lang" .gpu_check_data.tmp/
done

rm -rf .whl .gpu_check_data
mv .whl.tmp .whl
mv .gpu_check_data.tmp .gpu_check_data
ls -l .whl
du -sh .whl .gpu_check_data
echo "carry both: git status must not list them (they are in .gitignore)"
