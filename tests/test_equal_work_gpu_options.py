"""benchmarks/equal_work.py's class count, batch_syn and device options, and benchmarks/gpu_equal_work.sh.

CPU only: the GPU path is checked for refusing cleanly where no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch sees no CUDA device, even on a GPU machine


def _load_equal_work():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("equal_work_under_test", BENCHMARKS / "equal_work.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ew = _load_equal_work()


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process checks are tiny; with several threads on busy cores they wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(*args: str, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "equal_work.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------- syntax
@pytest.mark.parametrize("text, expected", [
    ("28g:10x20", {"shape": "28g", "classes": 10, "ipc": 10, "syn_steps": 20, "batch_syn": None}),
    ("32c:10x30", {"shape": "32c", "classes": 10, "ipc": 10, "syn_steps": 30, "batch_syn": None}),
    ("32c100:10x20", {"shape": "32c", "classes": 100, "ipc": 10, "syn_steps": 20, "batch_syn": None}),
    ("32c100:50x80b125", {"shape": "32c", "classes": 100, "ipc": 50, "syn_steps": 80, "batch_syn": 125}),
    (" 32C100:50X80B125 ", {"shape": "32c", "classes": 100, "ipc": 50, "syn_steps": 80, "batch_syn": 125}),
])
def test_config_syntax_parses(text, expected):
    assert ew.parse_config(text) == expected


@pytest.mark.parametrize("name", ["28g:10x20", "32c:1x50", "32c100:10x20", "32c100:50x80b125", "28g20:3x4b7"])
def test_config_names_round_trip_and_ten_classes_keep_the_old_name(name):
    assert ew.config_name(ew.parse_config(name)) == name
    assert ew.config_name(ew.parse_config("32c10:10x20")) == "32c:10x20"


@pytest.mark.parametrize("text, why", [
    ("64c:10x20", "SHAPE[CLASSES]:IPCxSTEPS[bBATCH]"),
    ("32c100:10", "SHAPE[CLASSES]:IPCxSTEPS[bBATCH]"),
    ("32c100:10x20b", "SHAPE[CLASSES]:IPCxSTEPS[bBATCH]"),
    ("32c100:10x20/5", "SHAPE[CLASSES]:IPCxSTEPS[bBATCH]"),
    ("32c100:0x20", "ipc and steps must be >= 1"),
    ("32c1:10x20", "classes must be >= 2"),
    ("32c100:10x20b0", "batch (bBATCH) must be >= 1"),
])
def test_bad_configs_are_refused_in_one_line(text, why):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        ew.parse_config(text)
    assert why in str(info.value) and "\n" not in str(info.value)


def test_bad_config_on_the_command_line_is_one_error_line_without_traceback():
    proc = _run("--configs", "32c100:10x20b0", timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "bad configuration '32c100:10x20b0'" in last and "must be >= 1" in last


# ------------------------------------------------------- same work, in process
def _spec(config: str, **extra) -> dict:
    return {**ew.parse_config(config), "width": 4, "seed": 0, "device": "cpu", **extra}


def test_hundred_classes_same_work_in_process():
    check = ew.same_work_check(_spec("32c100:1x2"))
    assert check["loss_rel_diff"] <= 1e-6 and check["image_grad_rel_diff"] <= 1e-5 and check["lr_grad_rel_diff"] <= 1e-5
    assert check["image_grad_norm"] > 0


def test_batch_syn_same_work_with_a_reshuffle():
    """7 of 20 images per step over 5 steps: chunks 7, 7, 6, then a new shuffle; both sides take the same ones."""
    spec = _spec("28g:2x5b7")
    module, start, target, images, labels, augment = ew.problem(spec)
    mtt = ew.MTTStep(module, start, target, images, labels, augment, 5, 0, batch_syn=7)
    plans = mtt.plans()
    assert [idx.numel() for idx, _ in plans] == [7, 7, 6, 7, 7]
    assert sorted(torch.cat([idx for idx, _ in plans[:3]]).tolist()) == list(range(20))  # one pass over the set
    assert all(p.batch_size == idx.numel() for idx, p in plans)
    distiller = ew.astkit_distiller(module, start, target, images, labels, augment, 5, 0, 4, batch_syn=7)
    assert distiller.config.distill.batch_syn == 7
    check = ew.same_work_check(spec)
    assert check["loss_rel_diff"] <= 1e-6 and check["image_grad_rel_diff"] <= 1e-5 and check["lr_grad_rel_diff"] <= 1e-5
    assert check["image_grad_norm"] > 0


def test_batch_syn_changes_the_work():
    """The same problem on all images per step gives another loss: batch_syn is not ignored."""
    with_batch = ew.same_work_check(_spec("28g:2x5b7"))
    without = ew.same_work_check(_spec("28g:2x5"))
    assert abs(with_batch["loss_mtt"] - without["loss_mtt"]) > 1e-6


# ------------------------------------------------------ the --quick run, end to end
def test_quick_hundred_classes_with_batch_syn_passes_the_same_work_check(tmp_path):
    out = tmp_path / "ew.json"
    proc = _run("--quick", "--configs", "32c100:2x3b50", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["device"] == "cpu" and data["environment"]["device"] == {"type": "cpu"}
    (check,) = data["checks"]
    assert check["ok"] and check["name"] == "32c100:2x3b50", check
    assert check["loss_rel_diff"] <= 1e-6 and check["image_grad_rel_diff"] <= 1e-5 and check["lr_grad_rel_diff"] <= 1e-5
    assert check["image_grad_norm"] > 0
    assert [(r["side"], r["config"], r["ok"]) for r in data["results"]] == [
        ("mtt", "32c100:2x3b50", True), ("astkit", "32c100:2x3b50", True)]
    assert data["results"][0]["num_params"] == data["results"][1]["num_params"]
    assert all("gpu_peak_allocated_bytes" not in r for r in data["results"])  # the CPU reports VmHWM only
    (summary,) = data["summary"]
    assert summary["classes"] == 100 and summary["batch_syn"] == 50 and summary["speedup_median"] > 0


# ------------------------------------------------------------ failures
def test_budget_spent_reports_not_run_without_starting_a_process():
    result = ew.Runner(timeout=None, budget=0).run({"side": "mtt"})
    assert result["ok"] is False and "--budget" in result["error"]


def test_cuda_out_of_memory_is_one_line():
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee documentation")
    reason = ew.failure_reason(exc)
    assert reason.startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB") and "\n" not in reason


def test_a_failing_child_is_reported_with_its_reason():
    """A child whose job raises emits a failure that the parent turns into ok: False and a one-line error."""
    result = ew.Runner(timeout=120, budget=None).run({"side": "mtt", "shape": "28g", "classes": 10, "ipc": 1,
                                                       "syn_steps": 1, "width": 4, "seed": 0, "threads": 1,
                                                       "warmup": 0, "iterations": 1, "device": "no-such-device"})
    assert result["ok"] is False and "\n" not in result["error"] and "device" in result["error"].lower()
    assert result["side"] == "mtt" and result["ipc"] == 1  # the spec stays with the failure, for the table


def test_published_anchors_sit_beside_the_cifar100_medians():
    summary = [{"shape": "32c", "classes": 100, "ipc": 10, "name": "32c100:10x20", "mtt_seconds_median": 1.5,
                "mtt_peak_bytes_median": 50e9, "astkit_seconds_median": 0.5, "astkit_peak_bytes_median": 20e9},
               {"shape": "32c", "classes": 100, "ipc": 50, "name": "32c100:50x80b125", "mtt_seconds_median": None,
                "mtt_peak_bytes_median": None, "astkit_seconds_median": 2.0, "astkit_peak_bytes_median": 30e9,
                "mtt_errors": ["out of memory: CUDA out of memory. Tried to allocate 9.00 GiB"]},
               {"shape": "32c", "classes": 10, "ipc": 10, "name": "32c:10x30", "mtt_seconds_median": 0.2,
                "mtt_peak_bytes_median": 5e9, "astkit_seconds_median": 0.1, "astkit_peak_bytes_median": 2e9}]
    rows = ew.anchor_rows(summary, "H100")
    cells = [" | ".join(r) for r in rows]
    assert any("32c100:10x20 | MTT (published" in c and "1.92 | 61.6" in c for c in cells)
    assert any("32c100:10x20 | TESLA (published" in c and "5.71 | 10.3" in c for c in cells)
    assert any("32c100:50x80b125 | MTT (published" in c and "out of memory" in c for c in cells)
    assert any("32c100:50x80b125 | TESLA (published" in c and "28.20 | 44.2" in c for c in cells)
    assert any("astkit (measured), H100 | 0.50 | 20.0" in c for c in cells)
    assert any("32c100:50x80b125 | MTT formulation (measured), H100 | out of memory" in c for c in cells)
    assert not any(c.startswith("32c:10x30") for c in cells)  # NCFM gives no CIFAR-10 figure


# --------------------------------------------------------------- no CUDA
def test_equal_work_refuses_cuda_without_a_gpu(tmp_path):
    out = tmp_path / "ew.json"
    proc = _run("--quick", "--device", "cuda", "--json", str(out), env=NO_GPU, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is visible" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_gpu_script_refuses_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_equal_work.sh"), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**NO_GPU, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is visible to torch" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_name("gpu_check.json").exists()
