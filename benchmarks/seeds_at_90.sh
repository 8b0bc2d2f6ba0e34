#!/bin/sh
# Seed spread at 90% (layer-wise, global, reference): seeds 1 and 2 beside accuracy_vs_sparsity.py's seed 0.
set -e
cd "$(dirname "$0")/.."
for seed in 1 2; do
  python benchmarks/accuracy_vs_sparsity.py --seed=$seed --sparsities=0.9 --keep_models_at=-1 \
      --name=accuracy_at_90_seed$seed
done
