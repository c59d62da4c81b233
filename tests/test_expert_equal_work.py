"""benchmarks/expert_equal_work.py --quick: the reference expert loops and astkit's do the same work.

Smoke tests only: the speed figures depend on the machine and are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "expert_equal_work.py"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("expert-equal-work") / "result.json"
    proc = run("--quick", "--json", str(out))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "command:" in proc.stdout and "same work (mtt" in proc.stdout and "same work (ast" in proc.stdout
    return json.loads(out.read_text())


def test_quick_writes_the_promised_json(quick):
    assert quick["benchmark"] == "expert_equal_work" and quick["quick"] is True
    assert {"command", "settings", "environment", "checks", "results", "summary"} <= set(quick)
    settings = quick["settings"]
    assert settings["width"] == 8 and settings["rounds"] == 1 and settings["threads"] == 1
    assert settings["presets"] == {"mtt": "mtt", "ast": "ast-reference"}
    assert settings["reference"]["ast"] == {"lr": 0.003, "momentum": 0.9, "weight_decay": 1e-3, "smooth": True}
    assert settings["reference"]["mtt"] == {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "smooth": False}


@pytest.mark.parametrize("mode", ["mtt", "ast"])
def test_both_sides_do_the_same_work(quick, mode):
    """Same initial weights, same batches and DSA draws: the same update after three steps."""
    check = next(c for c in quick["checks"] if c["mode"] == mode)
    assert check["ok"], check
    assert check["steps"] == 3 and check["same_names"] and check["init_max_abs_diff"] == 0.0
    assert check["update_norm"] > 0  # an update that is there to compare
    assert check["update_rel_diff"] <= 1e-4 and check["param_rel_diff"] <= 1e-6
    # the same comparison sees a change of the work (here: DSA left out of the baseline)
    assert check["update_rel_diff_without_augmentation"] > 1e-2
    assert check["test_accuracy_baseline"] == pytest.approx(check["test_accuracy_astkit"], abs=0.011)


def test_runs_alternate_and_give_ratios(quick):
    order = [(r["mode"], r["side"], r["round"]) for r in quick["results"]]
    assert order == [("mtt", "baseline", 1), ("mtt", "astkit", 1), ("ast", "baseline", 1), ("ast", "astkit", 1)]
    for r in quick["results"]:
        assert r["ok"], r
        assert _number(r["seconds_per_epoch"]) and r["seconds_per_epoch"] > 0 and r["peak_rss_bytes"] > 0
        assert r["num_train"] == 640 and r["threads"] == 1
    params = {r["num_params"] for r in quick["results"]}
    assert len(params) == 1  # the same network on both sides
    for s in quick["summary"]:
        assert len(s["pairs"]) == 1 and _number(s["speedup_median"]) and _number(s["memory_ratio_median"])


@pytest.mark.parametrize("args, fragment", [
    (["--width", "0"], "--width"),
    (["--modes", "sgd"], "invalid choice"),
    (["--rounds", "two"], "--rounds"),
    (["--data-root", "/nonexistent/fashion-mnist", "--modes", "mtt"], "/nonexistent/fashion-mnist"),
])
def test_a_bad_argument_is_one_error_line(args, fragment):
    proc = run(*args, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
