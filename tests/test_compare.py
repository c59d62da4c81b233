"""`astkit compare` of two tiny digits runs, and `distill --evaluate` recording
its evaluation in metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from astkit import baselines
from astkit.compare import MARK, Comparison
from astkit.metrics_log import MetricsLog

from test_cli import TINY, assert_one_error_line, astkit, ok

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def runs(workdir) -> tuple[Path, Path]:
    """``a``: astkit run with a periodic evaluation; ``b``: distill --evaluate from a's experts, another lr_img."""
    ok(astkit("run", *TINY, "--set", "distill.eval_every=2", "--out", "a", "--grid-every", "0", "-q", cwd=workdir))
    ok(astkit("distill", *TINY, "--set", "distill.eval_every=2", "--set", "distill.lr_img=50", "--experts", "a/experts",
              "--out", "b", "--grid-every", "0", "--evaluate", "-q", cwd=workdir))
    return workdir / "a", workdir / "b"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_distill_evaluate_records_a_final_evaluation(runs):
    _, b = runs
    found = records(b)
    assert [r["event"] for r in found][-1] == "final_evaluation"
    final = found[-1]
    assert final["epochs"] == 5 and len(final["architectures"]["convnet"]["accuracies"]) == 1
    assert final["seconds"] > 0  # evaluations record their time
    assert all(r["seconds"] > 0 for r in found if r["event"] == "evaluation")


def test_compare_two_runs(runs, workdir):
    result = ok(astkit("compare", "a", "b", "--out", "cmp", cwd=workdir))
    assert "distill.lr_img" in result.stdout and "accuracy (convnet)" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("written: ")
    out = workdir / "cmp"
    data = json.loads((out / "compare.json").read_text())
    assert data["astkit"] == MARK
    assert "distill.lr_img" in data["differing_keys"] and "experts.dir" in data["differing_keys"]
    assert "out" not in data["differing_keys"] and "distill.ipc" not in data["differing_keys"]
    a, b = data["runs"]
    assert (a["config"]["distill.lr_img"], b["config"]["distill.lr_img"]) == (1000.0, 50.0)
    assert a["iterations"] == b["iterations"] == 3 and a["accuracy"]["convnet"]["nets"] == 1
    assert a["wall_seconds"] > 0 and a["untimed_evaluations"] == 0
    md = (out / "compare.md").read_text()
    assert MARK in md.splitlines()[0]
    assert "| distill.lr_img | 1000.0 | 50.0 |" in md and "| accuracy (convnet) |" in md
    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG) and MARK.encode() in png[:4096]

    ok(astkit("compare", "a", "b", "--out", "cmp", cwd=workdir))  # its own files are replaced


def test_compare_shows_baselines_and_scores(runs, tmp_path):
    a, b = runs
    copy = tmp_path / "a"
    shutil.copytree(a, copy)
    final = records(copy)[-1]
    log = MetricsLog(copy / "metrics.jsonl")
    log.write({"event": "baseline", "kind": "random", "ipc": 2, "labels": "hard", "lr": 0.01,
               "epochs": final["epochs"], "architectures": {"convnet": {"mean": 0.05, "std": 0.0, "accuracies": [0.05]}}})
    log.write(baselines.stated_full(0.95))
    rows = dict(Comparison.of([copy, b]).rows())
    mean = final["architectures"]["convnet"]["mean"]
    assert rows["random real (convnet)"][0] == "0.0500 ± 0.0000 (1 net)" and rows["random real (convnet)"][1] == "-"
    assert rows["full real (convnet)"] == ["0.9500 (stated)", "-"]
    assert rows["IOR (convnet)"] == [f"{mean - 0.05:+.4f}", "n/a"]
    assert rows["HLR (convnet)"] == [f"{0.95 - mean:+.4f}", "n/a"]
    assert rows["LRS (convnet)"][1] == "n/a" and float(rows["LRS (convnet)"][0]) > 0


def test_compare_refuses_a_folder_that_is_not_a_run(runs, workdir):
    (workdir / "empty").mkdir(exist_ok=True)
    result = astkit("compare", "a", "empty", "--out", "nope", cwd=workdir)
    assert result.returncode == 2
    assert_one_error_line(result, "empty is not an astkit run folder (no config.toml)")
    assert not (workdir / "nope").exists()


def test_compare_refuses_to_overwrite_another_programs_file(runs, workdir):
    out = workdir / "theirs"
    out.mkdir()
    (out / "compare.md").write_text("# my notes\n")
    result = astkit("compare", "a", "b", "--out", "theirs", cwd=workdir)
    assert result.returncode == 2
    assert_one_error_line(result, "compare.md exists and was not written by astkit compare")
    assert sorted(p.name for p in out.iterdir()) == ["compare.md"]
    assert (out / "compare.md").read_text() == "# my notes\n"
