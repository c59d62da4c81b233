"""Real baselines under a run's protocol (`astkit baseline`, `Engine.real_subset`)
and DD-Ranking's scores (astkit/scores.py): by hand, against scikit-learn, and
through the command line on digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from astkit import Engine, UserError, baselines, scores
from astkit.results import DistilledSet

from conftest import tiny_config
from test_cli import TINY, assert_one_error_line, astkit, ok


# ------------------------------------------------------------------ scores
def test_scores_by_hand():
    assert scores.hlr(0.9, 0.7) == pytest.approx(0.2)
    assert scores.ior(0.6, 0.5) == pytest.approx(0.1)
    a = scores.alpha(0.1, 0.2)  # 0.5 * 0.1 - 0.5 * 0.2
    assert a == pytest.approx(-0.05)
    # (e^-0.05 - e^-1) / (e - e^-1) = (0.951229 - 0.367879) / 2.350402
    assert scores.lrs(a) == pytest.approx(0.248192, abs=1e-6)
    assert scores.lrs(1.0) == pytest.approx(1.0) and scores.lrs(-1.0) == pytest.approx(0.0)
    s = scores.Scores.of("convnet", syn_any=0.6, syn_hard=0.7, rdm_any=0.5, real_hard=0.9)
    assert (s.ior, s.hlr, s.alpha) == pytest.approx((0.1, 0.2, -0.05))
    assert s.line() == "scores (convnet): IOR +0.1000, HLR +0.2000, LRS 0.2482"


def _evaluation(mean: float, epochs: int = 5, **extra) -> dict:
    return {"lr": 0.01, "epochs": epochs, **extra,
            "architectures": {"convnet": {"model": "convnet", "mean": mean, "std": 0.0, "accuracies": [mean]}}}


def test_scores_pick_their_inputs_from_the_records():
    records = [
        {"event": "final_evaluation", **_evaluation(0.6)},
        {"event": "baseline", "kind": "random", "ipc": 2, "labels": "hard", **_evaluation(0.1, epochs=50)},  # other protocol
        {"event": "baseline", "kind": "random", "ipc": 5, "labels": "hard", **_evaluation(0.2)},  # other ipc
        {"event": "baseline", "kind": "random", "ipc": 2, "labels": "hard", **_evaluation(0.5)},
    ]
    s = scores.from_records(records, ipc=2, soft=False)["convnet"]
    assert s.ior == pytest.approx(0.1) and s.hlr is None and s.lrs is None
    assert "astkit baseline --real full" in s.line() and "HLR n/a" in s.line()

    measured = records + [{"event": "baseline", "kind": "full", "ipc": None, "labels": "hard", **_evaluation(0.8, 30)}]
    s = scores.from_records(measured, ipc=2, soft=False)["convnet"]
    assert (s.syn_hard, s.real_hard, s.hlr) == pytest.approx((0.6, 0.8, 0.2))  # a hard set: syn-hard is syn-any
    stated = measured + [baselines.stated_full(0.9)]  # the latest full line wins
    s = scores.from_records(stated, ipc=2, soft=False)["convnet"]
    assert s.real_hard == pytest.approx(0.9) and s.lrs == pytest.approx(scores.lrs(0.5 * 0.1 - 0.5 * 0.3))

    # a soft-labelled set: rdm-any must be soft-labelled too, syn-hard measured apart
    s = scores.from_records(stated, ipc=2, soft=True)["convnet"]
    assert s.ior is None and s.hlr is None
    soft = stated + [{"event": "baseline", "kind": "random", "ipc": 2, "labels": "soft", **_evaluation(0.55)},
                     {"event": "baseline", "kind": "syn-hard", "ipc": 2, "labels": "hard", **_evaluation(0.4)}]
    s = scores.from_records(soft, ipc=2, soft=True)["convnet"]
    assert (s.ior, s.hlr) == pytest.approx((0.05, 0.5))
    assert scores.from_records(soft[1:], ipc=2, soft=True) == {}  # no evaluation of the set: nothing


def test_bad_kinds_and_accuracies_are_refused():
    assert baselines.parse_kinds("random, kmeans,random") == ["random", "kmeans"]
    with pytest.raises(UserError, match="unknown --real kind 'herding'; choose from random, kmeans, full"):
        baselines.parse_kinds("random,herding")
    with pytest.raises(UserError, match="--real-accuracy must be a fraction"):
        baselines.stated_full(93)


# ------------------------------------------------------------------ subsets
def test_kmeans_picks_the_image_nearest_each_centroid(digits):
    from sklearn.cluster import KMeans

    seed, ipc = 3, 3
    images, labels = baselines.kmeans_subset(digits, ipc, seed)
    assert images.shape == (ipc * digits.num_classes, *digits.train_images.shape[1:])
    assert labels.tolist() == [k for k in range(digits.num_classes) for _ in range(ipc)]
    for label, indices in enumerate(digits.class_indices()):
        x = digits.train_images[indices].flatten(1).double().numpy()
        centres = KMeans(n_clusters=ipc, n_init=10, random_state=seed + label).fit(x).cluster_centers_
        nearest = [int(np.argmin(((x - c) ** 2).sum(1))) for c in centres]
        assert len(set(nearest)) == ipc
        expected = digits.train_images[indices[nearest]]
        assert torch.equal(images[label * ipc:(label + 1) * ipc], expected)


def test_engine_real_subset_keeps_its_random_default(tmp_path, digits):
    engine = Engine(tiny_config(tmp_path), dataset=digits)
    generator = torch.Generator().manual_seed(engine.config.seed)
    from astkit import _defaults

    images, labels = _defaults.astkit_init_synthetic(dataset=digits, ipc=2, generator=generator)
    subset = engine.real_subset(2)
    assert torch.equal(subset.images, images) and torch.equal(subset.labels, labels)
    assert subset.lr == engine.config.distill.lr_teacher and subset.meta["origin"] == "random real subset"
    kmeans = engine.real_subset(2, "kmeans", lr=0.5, seed=3)
    assert torch.equal(kmeans.images, baselines.kmeans_subset(digits, 2, 3)[0]) and kmeans.lr == 0.5
    assert Engine(tiny_config(tmp_path, "evaluate.lr=0.02"), dataset=digits).real_subset(2).lr == 0.02
    with pytest.raises(UserError, match="exceeds the smallest class of digits"):
        engine.real_subset(10_000)


# -------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("baseline")


@pytest.fixture(scope="module")
def run_dir(workdir) -> Path:
    ok(astkit("run", *TINY, "--out", "run", "--grid-every", "0", "-q", cwd=workdir))
    return workdir / "run"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_baseline_random_kmeans_full_are_recorded_with_the_runs_protocol(run_dir, workdir):
    result = ok(astkit("baseline", "run", "--real", "random,kmeans,full", "--full-epochs", "1", "-q", cwd=workdir))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("protocol: 1 net x 5 epochs on convnet") and "distill.lr_teacher" in lines[0]
    assert any(line.startswith("random real, ipc 2, hard labels: accuracy (convnet, 1 net): ") for line in lines)
    assert any(line.startswith("full real training set (") and "1 epochs" in line for line in lines)
    found = [r for r in records(run_dir) if r["event"] == "baseline"]
    assert [r["kind"] for r in found] == ["random", "kmeans", "full"]
    random, kmeans, full = found
    assert random["ipc"] == kmeans["ipc"] == 2 and full["ipc"] is None
    assert random["epochs"] == kmeans["epochs"] == 5 and full["epochs"] == 1  # the run's evaluate.epochs; --full-epochs
    assert random["lr"] == 0.01 and random["labels"] == "hard" and random["images"] == 20
    assert len(random["architectures"]["convnet"]["accuracies"]) == 1 and random["seconds"] > 0
    assert full["images"] > 1000

    report = (run_dir / "report.md").read_text()
    assert report.index("## Evaluation") < report.index("## Baselines") < report.index("## Scores") < report.index("## Files")
    assert "| random | 2 | hard | 5 | 0.01 | convnet | 1 |" in report and "| full | - | hard | 1 |" in report
    final = next(r for r in records(run_dir) if r["event"] == "final_evaluation")
    s = scores.Scores.of("convnet", final["architectures"]["convnet"]["mean"], final["architectures"]["convnet"]["mean"],
                         random["architectures"]["convnet"]["mean"], full["architectures"]["convnet"]["mean"])
    assert s.line() in lines
    assert f"| {s.lrs:.4f} |" in report

    # again: the sections are replaced, not added; `evaluate` shows the scores
    ok(astkit("baseline", "run", "--real", "random", "-q", cwd=workdir))
    assert (run_dir / "report.md").read_text().count("## Baselines") == 1
    result = ok(astkit("evaluate", "run/distilled.safetensors", "-q", cwd=workdir))
    assert result.stdout.splitlines()[1].startswith("scores (convnet): IOR ")


def test_a_soft_labelled_set_gets_teacher_labelled_subsets_and_a_hard_label_evaluation(run_dir, workdir):
    soft_dir = workdir / "soft"
    shutil.copytree(run_dir, soft_dir)
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] != "baseline"]
    (soft_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    hard = DistilledSet.load(soft_dir / "distilled.safetensors")
    logits = torch.nn.functional.one_hot(hard.labels, 10).float() * 3
    DistilledSet(hard.images, logits, hard.lr, hard.iteration, hard.meta, hard.zca).save(soft_dir / "distilled.safetensors")
    result = ok(astkit("baseline", "soft", "--real", "random", "--real-accuracy", "0.9", "-q", cwd=workdir))
    assert "random real, ipc 2, soft labels" in result.stdout and "syn-hard" in result.stdout
    found = [r for r in records(soft_dir) if r["event"] == "baseline"]
    assert [(r["kind"], r["labels"]) for r in found] == [("random", "soft"), ("syn-hard", "hard"), ("full", "hard")]
    assert found[0]["teacher"].startswith("expert_000.safetensors") and found[1]["ipc"] == 2
    assert found[2] == baselines.stated_full(0.9)
    assert "| full (stated) | - | hard |" in (soft_dir / "report.md").read_text()
    assert any(line.startswith("scores (convnet): IOR ") and "LRS 0." in line for line in result.stdout.splitlines())


def test_baseline_of_a_config_writes_under_its_out(workdir):
    config = workdir / "plain.toml"
    config.write_text('out = "fromconfig"\n[model]\nwidth = 8\n[evaluate]\nepochs = 2\nnum_nets = 1\n')
    result = ok(astkit("baseline", "--config", "plain.toml", "--real", "random", "--ipc", "1", "-q", cwd=workdir))
    out = workdir / "fromconfig"
    assert (out / "config.toml").is_file() and "random real, ipc 1" in result.stdout
    assert [r["kind"] for r in records(out)] == ["random"] and records(out)[0]["epochs"] == 2
    assert "No evaluation of the distilled set yet" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, fragments", [
    (["baseline", "nowhere"], ["nowhere is not an astkit run folder (no config.toml)"]),
    (["baseline", "run", "--real", "random,herding"], ["unknown --real kind 'herding'"]),
    (["baseline", "run", "--ipc", "1000"], ["--ipc 1000 exceeds the smallest class of digits"]),
    (["baseline", "run", "--config", "plain.toml"], ["give RUN_DIR, or --config FILE"]),
])
def test_baseline_refuses_in_one_line_and_writes_nothing(run_dir, workdir, args, fragments):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = astkit(*args, cwd=workdir)
    assert result.returncode == 2
    assert_one_error_line(result, *fragments)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert not (workdir / "nowhere").exists()


def test_baseline_records_outlive_a_rewrite_of_the_log(tmp_path):
    from astkit.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).write({"event": "iteration", "iteration": 0, "loss": 1.0})
    MetricsLog(path).write(baselines.stated_full(0.9))
    MetricsLog(path).write({"event": "final_evaluation", "epochs": 5, "architectures": {}})
    rewritten = MetricsLog(path, [{"iteration": 0, "loss": 2.0}]).records()  # a resume or a fresh distillation
    assert rewritten == [{"event": "iteration", "iteration": 0, "loss": 2.0}, baselines.stated_full(0.9)]
