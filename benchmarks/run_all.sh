#!/bin/sh
# Every benchmark in one run, then the plots: about 75 minutes on 2 cores.
#   pip install -e ".[bench]"                 # tf-keras, tensorflow-model-optimization, matplotlib
#   apt-get install dataset-fashion-mnist     # Fashion-MNIST in /usr/share/datasets/fashion-mnist
#   sh benchmarks/run_all.sh
set -e
cd "$(dirname "$0")/.."
python benchmarks/accuracy_vs_sparsity.py
python benchmarks/artifact_sizes.py
sh benchmarks/seeds_at_90.sh
python benchmarks/train_step_overhead.py --repeats=15
python benchmarks/mask_update_time.py
python benchmarks/rewrite_time.py
python benchmarks/channels.py
python benchmarks/channels_accuracy.py --lr=cosine --finetune_epochs=6
python benchmarks/plots.py
