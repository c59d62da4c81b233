#!/usr/bin/env bash
# The Fashion-MNIST comparison at the paper's width on one GPU, in about 10 minutes on an H100.
#
#   bash benchmarks/gpu_fmnist.sh [OUT_DIR]        # default runs/gpu-fmnist
#
# Protocol: reproduce_fmnist.py's GPU dictionary (ConvNet width 128, 4 experts x 12 epochs per set,
# SGD and smooth expert sets, MTT and AST at ipc 1 and 10 with 500 iterations, 3 evaluation networks
# of 1000 epochs, random and K-Means real subsets). Writes OUT_DIR/reproduce_fmnist_gpu.json.
# Every stage resumes, so a run cut by a time limit continues when started again.
# Needs astkit installed (pip install -e .) and Fashion-MNIST in /usr/share/datasets/fashion-mnist
# (Debian package dataset-fashion-mnist) or data.root set through --work's configs.
set -euo pipefail
out="${1:-runs/gpu-fmnist}"
here="$(cd "$(dirname "$0")" && pwd)"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible; run this on a GPU machine')"
mkdir -p "$out"
python "$here/reproduce_fmnist.py" --scale gpu --device cuda --work "$out/work" \
    --json "$out/reproduce_fmnist_gpu.json" 2>&1 | tee "$out/log.txt"
