"""The benchmark scripts run (``--quick``) and write the JSON they promise.

Smoke tests only: the numbers themselves depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT --quick ARGS`` from the repository root."""
    return subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    proc = run_script(script, "--json", str(out), *extra)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "command:" in proc.stdout
    return json.loads(out.read_text())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def test_distill_speed_quick(tmp_path):
    data = run_quick("distill_speed.py", tmp_path)
    assert data["benchmark"] == "distill_speed" and data["quick"] is True
    assert {"command", "settings", "environment", "ceiling", "results"} <= set(data)
    ceiling = data["ceiling"]
    assert ceiling["ok"] and ceiling["gflops_per_second_best"] > 0
    results = data["results"]
    assert len(results) >= 2
    assert any(r["segment"] > 0 for r in results) and any(r["segment"] == 0 for r in results)
    for r in results:
        assert r["ok"], r
        for key in ("ipc", "syn_steps", "segment", "seconds_per_iteration", "peak_rss_bytes", "flops_per_iteration",
                    "gflops_per_second", "flop_method"):
            assert key in r, key
        assert _number(r["seconds_per_iteration"]) and r["seconds_per_iteration"] > 0
        assert r["peak_rss_bytes"] > 0 and r["flops_per_iteration"] > 0 and r["gflops_per_second"] > 0
        assert len(r["seconds_all"]) == data["settings"]["iterations"]
    # Recomputation redoes the forward work: more FLOPs per step than the full graph.
    full = [r for r in results if r["segment"] == 0]
    seg = [r for r in results if r["segment"] > 0]
    per_step = lambda r: r["flops_per_iteration"] / (r["syn_steps"] * r["num_images"])  # noqa: E731
    assert min(per_step(r) for r in seg) > max(per_step(r) for r in full)


def test_expert_speed_quick(tmp_path):
    data = run_quick("expert_speed.py", tmp_path)
    assert data["benchmark"] == "expert_speed" and data["quick"] is True
    modes = {r["mode"]: r for r in data["results"]}
    assert set(modes) == {"plain", "smooth", "smooth-fraction", "evaluate"}
    for mode in ("plain", "smooth", "smooth-fraction"):
        r = modes[mode]
        assert r["ok"], r
        assert _number(r["seconds_per_epoch"]) and r["seconds_per_epoch"] > 0
        assert r["peak_rss_bytes"] > 0 and 0 <= r["final_test_accuracy"] <= 1
    assert modes["plain"]["plugins"] == [] and modes["plain"]["optimizer"]["momentum"] == 0
    assert modes["smooth"]["optimizer"]["momentum"] == pytest.approx(0.9)
    assert modes["smooth"]["smooth_experts"]["penalty_fraction"] == 1.0
    assert modes["smooth-fraction"]["smooth_experts"]["penalty_fraction"] == pytest.approx(0.25)
    ev = modes["evaluate"]
    assert ev["ok"] and ev["num_images"] == 100 and ev["seconds_per_network"] > 0


def test_bad_config_is_rejected():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "distill_speed.py"), "--configs", "10by20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "IPCxSYN_STEPS" in proc.stderr


def test_reproduce_fmnist_quick_runs_every_stage_and_resumes(tmp_path):
    data = run_quick("reproduce_fmnist.py", tmp_path, "--work", str(tmp_path / "work"))
    assert data["benchmark"] == "reproduce_fmnist" and data["missing"] == []
    assert set(data["experts"]) == {"mtt", "sgd", "momentum", "penalty", "clipping", "smooth", "ast-reference"}
    assert data["experts"]["penalty"]["options"] == {"smooth-experts": {"clipping": False}}
    # the presets' expert optimisers, applied: Table VII's chain shares the ast preset's
    configs = {name: e["config"] for name, e in data["experts"].items()}
    assert configs["mtt"] | {"epochs": 0} == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                                               "lr_decay": 1.0, "lr_decay_epoch": None, "lr_decay_fraction": None,
                                               "reset_optimizer_on_decay": False, "epochs": 0}
    assert configs["smooth"]["lr"] == 0.003 and configs["smooth"]["weight_decay"] == 1e-3
    assert configs["smooth"]["lr_decay"] == 0.5 and configs["smooth"]["momentum"] == 0.9
    for name in ("momentum", "penalty", "clipping"):
        assert configs[name] == configs["smooth"], name
    assert configs["sgd"] == {**configs["smooth"], "momentum": 0.0}
    assert configs["ast-reference"]["lr_decay"] == 0.6 and configs["ast-reference"]["reset_optimizer_on_decay"]
    for summary in data["experts"].values():
        assert all(_number(v) and v >= 0 for v in summary["avg_var"])
        assert all(_number(s) and s > 0 for s in summary["seconds_per_expert"])
    for name, run in data["distill"].items():
        assert 0 <= run["final"]["mean"] <= 1, name
        assert [it for it, _ in run["accuracy_vs_iteration"]] == [1, 2], name  # eval_every 1, final at 2
        g = run["image_grad_norm"]
        assert g["iterations"] == 2 and 0 <= g["median"] <= g["max"] and g["max_iteration"] in (0, 1), name
        assert run["seconds"]["distill"] > 0 and run["seconds"]["evaluation"] > 0, name
    assert data["distill"]["ast"]["plugins"] == ["ast"] and data["distill"]["table7-smooth"]["plugins"] == []
    assert data["distill"]["table8-1-representative-init"]["plugins"] == [
        "ast", "no:balanced-inner-loss", "no:intermediate-matching", "no:weight-perturbation"]
    assert data["distill"]["ast-reference-ipc1"]["ipc"] == 1 and data["distill"]["mtt"]["experts"] == "mtt"
    assert set(data["baselines"]) == {f"{kind}-ipc{ipc}" for kind in ("random", "kmeans", "random-ast-lr") for ipc in (1, 10)}
    # a second call finds every stage done and trains nothing
    again = run_quick("reproduce_fmnist.py", tmp_path, "--work", str(tmp_path / "work"))
    assert again["distill"] == data["distill"] and again["baselines"] == data["baselines"]
    assert again["experts"] == data["experts"]


def test_reproduce_fmnist_report_carries_an_earlier_report_into_an_empty_work_dir(tmp_path):
    earlier = tmp_path / "earlier.json"
    experts = run_script("reproduce_fmnist.py", "--stage", "experts", "--only", "sgd", "--work", str(tmp_path / "a"))
    assert experts.returncode == 0, experts.stderr
    first = run_quick("reproduce_fmnist.py", tmp_path, "--stage", "report", "--work", str(tmp_path / "a"))
    assert first["experts"]["sgd"] is not None and "runs/table7-sgd" in first["missing"]
    earlier.write_text(json.dumps(first))
    merged = run_quick("reproduce_fmnist.py", tmp_path, "--stage", "report", "--work", str(tmp_path / "empty"),
                       "--previous", str(earlier))
    assert merged["experts"]["sgd"] == first["experts"]["sgd"] and merged["carried_from_previous"] == ["experts/sgd"]
    assert merged["missing"] == first["missing"]
    earlier.write_text(json.dumps({**first, "protocol": {**first["protocol"], "model": {"name": "convnet", "width": 9}}}))
    proc = run_script("reproduce_fmnist.py", "--stage", "report", "--work", str(tmp_path / "empty"), "--previous", str(earlier))
    assert proc.returncode != 0 and "protocol differs" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "earlier.txt").write_text("not json")
    for bad in ("missing.json", "earlier.txt"):
        proc = run_script("reproduce_fmnist.py", "--stage", "report", "--work", str(tmp_path / "empty"),
                          "--previous", str(tmp_path / bad))
        assert proc.returncode != 0 and "not a report JSON" in proc.stderr and "Traceback" not in proc.stderr, bad


def test_equal_work_quick_compares_equal_work(tmp_path):
    """MTT's formulation in plain PyTorch and astkit's Distiller.step compute the same loss and gradients."""
    data = run_quick("equal_work.py", tmp_path)
    assert data["benchmark"] == "equal_work" and data["quick"] is True
    assert len(data["checks"]) == len(data["summary"]) >= 2
    for check in data["checks"]:
        assert check["ok"], check
        assert check["loss_rel_diff"] <= 1e-6 and check["image_grad_rel_diff"] <= 1e-5 and check["lr_grad_rel_diff"] <= 1e-5
        assert check["image_grad_norm"] > 0  # a gradient that is there to compare
    sides = [(r["side"], r["round"]) for r in data["results"]]
    assert sides == [("mtt", 1), ("astkit", 1)] * len(data["summary"])  # alternating, one pair per configuration
    for r in data["results"]:
        assert r["ok"] and r["seconds_per_iteration"] > 0 and r["peak_rss_bytes"] > 0
    for s in data["summary"]:
        assert _number(s["speedup_median"]) and _number(s["memory_ratio_median"])


def test_reproduce_fmnist_records_a_diverged_run_and_goes_on(tmp_path, monkeypatch):
    """A run the engine stops as diverged is a result: recorded, shown as such, and the stage carries on."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_fmnist", BENCHMARKS / "reproduce_fmnist.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    work = tmp_path / "work"
    script.stage_experts(script.QUICK, work, 0, ["mtt"])
    # an lr step so large that the learned lr leaves its sane range on every iteration
    monkeypatch.setitem(script.RUNS, "mtt-ipc1", {**script.RUNS["mtt-ipc1"], "distill": {"ipc": 1, "lr_lr": 1e4, "iterations": 6, "max_divergences": 2}})
    script.stage_distill(script.QUICK, work, 0, ["mtt-ipc1", "mtt"])
    diverged = json.loads((work / "runs" / "mtt-ipc1" / "summary.json").read_text())
    assert "distillation diverged" in diverged["diverged"] and diverged["seconds"]["distill"] > 0
    assert 0 <= json.loads((work / "runs" / "mtt" / "summary.json").read_text())["final"]["mean"] <= 1
    script.stage_distill(script.QUICK, work, 0, ["mtt-ipc1"])  # done: not run again
    assert json.loads((work / "runs" / "mtt-ipc1" / "summary.json").read_text()) == diverged
    report = script.stage_report(script.QUICK, work, None)
    assert "runs/mtt-ipc1" not in report["missing"]
    text = script.markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.split(" | ")[4] == "diverged"  # MTT (SGD experts) at ipc 1
    assert f"* mtt-ipc1: {diverged['diverged']}" in text and "* MTT (SGD experts): diverged" in text
