"""The ``tensorboard`` plugin (issue 16, item 6): a tiny run's event files hold
what metrics.jsonl holds; images at the start, every ``image_every`` and at
the end; a missing package or a bad option is one line before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astkit import DistilledSet, IterationMetrics, RunContext, RunFolder, Trajectory

from conftest import TINY, tiny_config

pytest.importorskip("tensorboard", reason="tensorboard is the `tensorboard` extra: pip install -e '.[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SCALARS = ("loss", "lr", "grad_norm", "inner_weight", "start_epoch", "lr_img", "seconds")


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def one_error_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    """``astkit run --plugins tensorboard`` on digits: 3 iterations, an evaluation at 2, images every iteration."""
    cwd = tmp_path_factory.mktemp("tb")
    sets = [x for option in TINY for x in ("--set", option)]
    result = subprocess.run(
        [sys.executable, "-m", "astkit", "run", "--plugins", "tensorboard", *sets, "--set", "experts.epochs=3",
         "--set", "experts.batch_size=512", "--set", "evaluate.epochs=5", "--set", "distill.eval_every=2",
         "--set", "tensorboard.image_every=1", "--out", "run", "--quiet"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    return cwd / "run"


def test_a_run_writes_the_metrics_of_metrics_jsonl_as_event_files(tb_run):
    folder = RunFolder(tb_run)
    assert list(folder.tensorboard.glob("events.out.tfevents.*"))
    tb = events(folder.tensorboard)
    records = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    iterations = [r for r in records if r["event"] == "iteration"]
    assert [r["iteration"] for r in iterations] == [0, 1, 2]
    for key in SCALARS:
        logged = scalars(tb, f"distill/{key}")
        assert sorted(logged) == [0, 1, 2], key
        for record in iterations:
            assert logged[record["iteration"]] == pytest.approx(record[key], rel=1e-6, abs=1e-7), key

    (evaluation,) = [r for r in records if r["event"] == "evaluation"]
    (final,) = [r for r in records if r["event"] == "final_evaluation"]
    means, stds = scalars(tb, "evaluation/convnet/accuracy_mean"), scalars(tb, "evaluation/convnet/accuracy_std")
    assert sorted(means) == [2, 3]  # the evaluation at iteration 2, the final one after the last (3)
    assert means[2] == pytest.approx(evaluation["architectures"]["convnet"]["mean"], abs=1e-7)
    assert means[3] == pytest.approx(final["architectures"]["convnet"]["mean"], abs=1e-7)
    assert stds[3] == pytest.approx(final["architectures"]["convnet"]["std"], abs=1e-7)

    experts = [Trajectory.load(folder.expert(i)) for i in range(2)]
    assert scalars(tb, "experts/final_test_accuracy") == {
        i: pytest.approx(t.test_accuracy[-1], abs=1e-7) for i, t in enumerate(experts)}
    assert scalars(tb, "experts/avg_var") == {i: pytest.approx(t.avg_var, rel=1e-6) for i, t in enumerate(experts)}

    images = tb.Images("synthetic")
    assert sorted(e.step for e in images) == [0, 1, 2, 3]  # start, every iteration, the saved set at the end
    assert {(e.width, e.height) for e in images} == {(4 * (1 + 2 * 9), 4 * (1 + 10 * 9))}  # 10 rows of 2, 8x8 x4


def _config(tmp_path, *overrides):
    from astkit.plugins import PluginSet, declared_options

    config = tiny_config(tmp_path, *overrides)
    config.resolve_options(declared_options(PluginSet.discover().catalog()))
    return config


def test_images_only_at_the_start_and_the_end_by_default(tmp_path, digits):
    from astkit_plugins import tensorboard_log as tb

    config = _config(tmp_path)
    assert config.plugin("tensorboard") == {"image_every": 0, "flush_secs": 120}
    run = RunContext(RunFolder(tmp_path / "run"), tuple(digits.mean), tuple(digits.std))
    images, labels = digits.train_images[:20], digits.train_labels[:20]
    tb.astkit_on_distill_start(images=images, labels=labels, iteration=0, run=run, config=config)
    for it in range(3):
        metrics = IterationMetrics(it, 0.5 + it, 0.01, 1, 0, 1.0, [0.5], 0.1, grad_norm=2.0, lr_img=100.0)
        tb.astkit_on_iteration_end(metrics=metrics, images=images, run=run, config=config)
    tb.astkit_on_distill_end(distilled=DistilledSet(images, labels, 0.01, 3), run=run, config=config)
    assert not tb._LOGS  # closed at the end
    accumulator = events(run.folder.tensorboard)
    assert sorted(e.step for e in accumulator.Images("synthetic")) == [0, 3]
    assert scalars(accumulator, "distill/loss") == {0: 0.5, 1: 1.5, 2: 2.5}


def test_the_grid_has_one_row_per_class_in_pixels(digits):
    from astkit_plugins.tensorboard_log import class_grid

    soft = torch.zeros(3, 10)
    soft[0, 4] = soft[1, 2] = soft[2, 4] = 1.0
    pixels = torch.rand(3, 1, 40, 40)
    grid = class_grid(pixels, soft)
    assert grid.shape == (1, 1 + 2 * 41, 1 + 2 * 41)  # classes 2 and 4, at most 2 images each
    assert torch.equal(grid[:, 1:41, 1:41], pixels[1]) and torch.equal(grid[:, 42:82, 42:82], pixels[2])


def test_a_missing_tensorboard_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from astkit.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    sets = [x for option in TINY for x in ("--set", option)]
    code = main(["run", "--plugins", "tensorboard", *sets, "--out", str(out), "--quiet"])
    one_error_line(capsys, code, "tensorboard", "pip install 'astkit[tensorboard]'")
    assert not out.exists()


@pytest.mark.parametrize("option, fragment", [("image_every=-1", "tensorboard.image_every must be a whole number >= 0"),
                                              ("flush_secs=0", "tensorboard.flush_secs must be a number of seconds > 0")])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, option, fragment):
    from astkit.cli import main

    out = tmp_path / "run"
    code = main(["experts", "--plugins", "tensorboard", "--set", f"tensorboard.{option}", "--out", str(out), "-q"])
    one_error_line(capsys, code, fragment)
    assert not out.exists()
