"""Experts trained by 2 gloo processes under torchrun equal a serial run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from astkit import Trajectory

TINY = ["--set", "model.width=8", "--set", "experts.num_experts=3", "--set", "experts.epochs=2",
        "--set", "distill.max_start_epoch=1", "--set", "distill.expert_epochs=1", "--quiet"]


def test_torchrun_experts_equal_serial_experts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    parallel = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "astkit", "experts", *TINY, "--out", "par"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    serial = subprocess.run([sys.executable, "-m", "astkit", "experts", *TINY, "--out", "ser"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert serial.returncode == 0, serial.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "par" / "experts").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ser" / "experts").iterdir())
    assert names == ["expert_000.safetensors", "expert_001.safetensors", "expert_002.safetensors"]
    for name in names:
        a = Trajectory.load(tmp_path / "par" / "experts" / name)
        b = Trajectory.load(tmp_path / "ser" / "experts" / name)
        assert torch.equal(a.snapshots, b.snapshots)
        assert a.test_accuracy == b.test_accuracy
