"""Experts trained by 2 gloo processes under torchrun equal a serial run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from astkit import Trajectory

TINY = ["--set", "model.width=8", "--set", "experts.num_experts=3", "--set", "experts.epochs=2",
        "--set", "distill.max_start_epoch=1", "--set", "distill.expert_epochs=1", "--quiet"]


def on_two_ranks(*args: str, env: dict, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS``, with this environment's torchrun."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_experts_equal_serial_experts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    parallel = on_two_ranks("-m", "astkit", "experts", *TINY, "--out", "par", cwd=tmp_path, env=env)
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


def test_sharded_meta_gradient_equals_single_process(tmp_path):
    """The synthetic batch split over 2 gloo ranks gives the single-process meta-gradient."""
    from safetensors.torch import load_file

    worker = str(Path(__file__).parent / "_sharded_meta_gradient.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    (tmp_path / "single").mkdir()
    (tmp_path / "sharded").mkdir()
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = on_two_ranks(worker, str(tmp_path / "sharded"), env=env)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    for case in ("full", "batch_momentum_dsa", "recompute", "soft_labels", "soft_labels_recompute"):
        reference = load_file(str(tmp_path / "single" / f"{case}.rank0.safetensors"))
        ranks = [load_file(str(tmp_path / "sharded" / f"{case}.rank{r}.safetensors")) for r in (0, 1)]
        assert ("labels" in reference) == case.startswith("soft")
        for key in reference:
            assert torch.equal(ranks[0][key], ranks[1][key]), (case, key)  # identical on every rank
            torch.testing.assert_close(ranks[0][key], reference[key], rtol=1e-9, atol=1e-12, msg=f"{case} {key}")
        assert all(reference[key].abs().sum() > 0 for key in ("images", "lr", *(("labels",) if "labels" in reference else ())))


RUN = TINY + ["--set", "distill.ipc=2", "--set", "distill.iterations=3", "--set", "distill.syn_steps=3",
              "--set", "distill.batch_syn=7", "--set", "evaluate.num_nets=3", "--set", "evaluate.epochs=5",
              "--set", "distill.checkpoint_every=2"]


def test_torchrun_run_splits_distillation_and_evaluation(tmp_path):
    """`torchrun -m astkit run` on 2 ranks: the serial run's files, images and accuracies (to float tolerance)."""
    from astkit import DistilledSet, Engine, RunConfig

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    parallel = on_two_ranks("-m", "astkit", "run", *RUN, "--out", "par", cwd=tmp_path, env=env, timeout=600)
    assert parallel.returncode == 0, f"stdout:\n{parallel.stdout[-3000:]}\nstderr:\n{parallel.stderr[-6000:]}"
    serial = subprocess.run([sys.executable, "-m", "astkit", "run", *RUN, "--out", "ser"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert serial.returncode == 0, serial.stderr[-3000:]
    assert parallel.stdout.count("accuracy") == serial.stdout.count("accuracy") > 0  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == sorted(p.name for p in (tmp_path / "ser").iterdir())
    a = DistilledSet.load(tmp_path / "par" / "distilled.safetensors")
    b = DistilledSet.load(tmp_path / "ser" / "distilled.safetensors")
    assert a.iteration == b.iteration == 3
    # The ranks sum each meta-gradient in another order, so float32 results differ by rounding. An error of
    # that kind is relative to the size of what was summed (the change distillation made to the images), not
    # to each pixel's value: a float32 sum of n terms is exact to n * eps of the sum of their magnitudes
    # (Higham's gamma_n); the longest reduction here is the matching loss over the model's P parameters.
    engine = Engine(RunConfig.load(tmp_path / "ser" / "config.toml"))
    start = engine.make_distiller(engine.load_experts(tmp_path / "ser" / "experts")).images.detach()
    change = (b.images - start).abs().max().item()
    parameters = sum(p.numel() for p in engine.model_spec.build(engine.models).parameters())
    bound = parameters * torch.finfo(torch.float32).eps * change
    assert change > 1.0  # distillation moved the images, so the bound is not vacuous
    assert (a.images - b.images).abs().max().item() <= bound, (bound, change)
    assert abs(a.lr - b.lr) < 1e-6
    finals = [json.loads(line) for line in (tmp_path / "par" / "metrics.jsonl").read_text().splitlines()]
    serial_finals = [json.loads(line) for line in (tmp_path / "ser" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in finals] == [r["event"] for r in serial_finals]  # written once, by rank 0
    par_acc = finals[-1]["architectures"]["convnet"]["accuracies"]
    ser_acc = serial_finals[-1]["architectures"]["convnet"]["accuracies"]
    assert len(par_acc) == 3 and max(abs(x - y) for x, y in zip(par_acc, ser_acc)) < 0.02


def test_torchrun_distill_refuses_batch_norm_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = [*RUN, "--set", "model.norm=batchnorm", "--set", "experts.num_experts=2", "--set", "experts.epochs=1"]
    result = on_two_ranks("-m", "astkit", "run", *args, "--out", "bn", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "error: distillation across processes needs a model without batch norm" in result.stderr
    assert "astkit/" not in result.stderr  # no astkit traceback (torchrun's launcher prints its own)
    assert not (tmp_path / "bn" / "experts").exists()  # refused before any expert was trained


def test_batch_shard_checks_the_smallest_mini_batch(monkeypatch, tmp_path):
    """With 4 ranks, MTT's last chunk (10 images in chunks of 3: 3, 3, 3, 1) is too small to split."""
    import pytest

    from astkit import Engine, RunConfig
    from astkit import distributed
    from astkit.collectives import BatchShard
    from astkit.errors import UserError

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    engine = Engine(RunConfig.load(overrides=["model.width=8", "distill.ipc=1", "distill.batch_syn=3",
                                              f"out={tmp_path}"]))
    module = engine.model_spec.build(engine.models)
    with pytest.raises(UserError, match="at least 4 images, this run has 1"):
        engine._batch_shard(module)
    engine.config.distill.batch_syn = None
    assert engine._batch_shard(module) == BatchShard(0, 4)
    assert [BatchShard(r, 4).rows(10) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]


def test_a_bare_cuda_device_means_the_local_rank_gpu_under_torchrun(monkeypatch):
    from astkit import distributed

    cuda = torch.device("cuda")
    assert distributed.local_device(cuda) == cuda  # one process: left to torch
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device(cuda) == torch.device("cuda", 3)
    assert distributed.local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # explicit index kept
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_init_registers_leaving_the_group_at_exit(monkeypatch, tmp_path):
    """A live gloo group at interpreter shutdown can abort a rank; init arranges to destroy it first."""
    import atexit

    import torch.distributed as dist

    from astkit import distributed

    registered = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: registered.append(backend))
    distributed.init(torch.device("cpu"))
    assert registered == ["gloo", distributed.leave]
    monkeypatch.undo()

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert distributed.world_size() == 1
    distributed.leave()
    assert not dist.is_initialized()
    distributed.leave()  # twice is harmless


def test_leave_stops_the_process_group_threads(tmp_path):
    """No gloo thread survives leave(): one alive at interpreter shutdown can abort its rank (SIGABRT)."""
    import pytest

    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts threads through /proc")
    worker = str(Path(__file__).parent / "_leave_stops_threads.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = on_two_ranks(worker, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
