#!/usr/bin/env bash
# Speed on equal work on one GPU: MTT's distillation step (plain PyTorch) against astkit's Distiller.step,
# at CIFAR-10 ipc 10 and CIFAR-100 ipc 10 and 50, in under 10 minutes on one H100/H200.
#
#   bash benchmarks/gpu_equal_work.sh [OUT_JSON]      # default benchmarks/results/gpu_equal_work.json
#   PYTHON=.venv/bin/python bash benchmarks/gpu_equal_work.sh
#
# What runs (benchmarks/equal_work.py --device cuda; fake experts, random images, DSA, ConvNet width 128
# depth 3 with instance norm, 3x32x32 inputs; MTT's published syn_steps and batch_syn):
#   32c:10x30          CIFAR-10  ipc 10, 30 student steps, all 100 images per step
#   32c100:10x20       CIFAR-100 ipc 10, 20 student steps, all 1000 images per step
#   32c100:50x80b125   CIFAR-100 ipc 50, 80 student steps, 125 of the 5000 images per step
# 2 rounds of (baseline, astkit) per configuration, each run in a fresh process: 1 warm-up + 3 timed
# iterations, at most 90 s; all runs together within a budget, so the script ends within about 9 minutes
# whatever happens (a run that does not fit is reported as not run). A same-work check on the GPU comes first
# (a tiny CIFAR-100-shaped problem, both sides' loss and gradients in one process), written to
# OUT_JSON's name with _check before .json. The end of the output prints NCFM's published A100 figures
# (CVPR 2025, Table 3) beside the measured ones.
# Needs astkit installed (pip install -e .) with a CUDA build of torch; no data set is read.
set -euo pipefail
out="${1:-benchmarks/results/gpu_equal_work.json}"
py="${PYTHON:-python}"
here="$(cd "$(dirname "$0")" && pwd)"
budget=540  # seconds for everything this script starts (the 10-minute promise, with room to spare)

"$py" - <<'EOF' || exit 2
import sys
try:
    import torch
    import astkit  # noqa: F401
except ImportError as exc:
    sys.exit(f"gpu_equal_work.sh: {exc}; install astkit (pip install -e .) or point PYTHON at its interpreter")
if not torch.cuda.is_available():
    sys.exit("gpu_equal_work.sh: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
             "run it on a machine with an NVIDIA GPU")
print(f"gpu_equal_work.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

mkdir -p "$(dirname "$out")"
check="${out%.json}_check.json"
check_status=0
"$py" "$here/equal_work.py" --quick --device cuda --configs 32c100:2x3b50 \
    --timeout 60 --budget 100 --json "$check" || check_status=$?

left=$((budget - SECONDS))
status=0
"$py" "$here/equal_work.py" --device cuda --configs 32c:10x30 32c100:10x20 32c100:50x80b125 \
    --width 128 --rounds 2 --warmup 1 --iterations 3 --timeout 90 --budget "$left" --json "$out" || status=$?

if [ "$check_status" -ne 0 ]; then
    echo "gpu_equal_work.sh: the same-work check on the GPU did not run to the end; see $check" >&2
fi
if [ "$status" -ne 0 ]; then
    echo "gpu_equal_work.sh: some runs failed (their reasons are in the table above and in $out)" >&2
fi
echo "gpu_equal_work.sh: wrote $out and $check in ${SECONDS} s"
exit $(( status != 0 || check_status != 0 ))
