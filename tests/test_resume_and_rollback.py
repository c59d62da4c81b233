"""Ctrl-C anywhere resumes bit for bit; rollback keeps only sane states."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from astkit import DistilledSet, Engine, Trajectory, hookimpl
from astkit.errors import DivergenceError
from astkit.checkpoint import Checkpoint
from astkit.distill import Distiller

from conftest import TINY, tiny_config

ITERATIONS = "distill.iterations=5"


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    return Engine(tiny_config(tmp_path_factory.mktemp("resume")), dataset=digits).train_experts()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits, experts):
    """Five iterations with an evaluation after the second and fourth, never stopped."""
    engine = Engine(tiny_config(tmp_path_factory.mktemp("full"), ITERATIONS, "distill.eval_every=2"), dataset=digits)
    distilled = engine.distill(experts)
    return distilled, _events(engine.out)


def _events(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["iteration"], r.get("start_epoch"), r.get("expert")) for r in records]


def _interrupt_then_resume(tmp_path, digits, experts, plugin=None, monkeypatch=None):
    """Distil until Ctrl-C (from ``plugin`` or a patch), undo the patch, resume in a new engine;
    return the resumed set, its metrics events and the iteration the Ctrl-C checkpoint was written at."""
    config = tiny_config(tmp_path, ITERATIONS, "distill.eval_every=2")
    with pytest.raises(KeyboardInterrupt):
        Engine(config, dataset=digits, plugins=[plugin] if plugin else []).distill(experts)
    cut_at = Checkpoint.read_iteration(tmp_path / "run" / "checkpoint.safetensors")
    if monkeypatch is not None:
        monkeypatch.undo()
    engine = Engine(tiny_config(tmp_path, ITERATIONS, "distill.eval_every=2"), dataset=digits)
    return engine.distill(experts, resume=True), _events(engine.out), cut_at


def _equals_uninterrupted(resumed, events, cut_at, uninterrupted):
    assert cut_at is not None  # the stop left a checkpoint to resume from
    full, full_events = uninterrupted
    assert torch.equal(resumed.images, full.images) and resumed.lr == full.lr
    assert events == full_events  # the same experts and start epochs drawn, the same evaluations made


class CtrlCInWeight:
    """Ctrl-C from a hook of iteration 2, after it drew its expert and start epoch."""

    astkit_plugin_name = "ctrl-c-in-weight"

    @hookimpl
    def astkit_inner_loss_weight(self, iteration):
        if iteration == 2:
            raise KeyboardInterrupt


class CtrlCInPerturbation:
    """Ctrl-C from the perturbation hook of iteration 2 (after its draws too)."""

    astkit_plugin_name = "ctrl-c-in-perturbation"

    @hookimpl
    def astkit_perturb_expert(self, iteration):
        if iteration == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("plugin", [CtrlCInWeight, CtrlCInPerturbation])
def test_ctrl_c_inside_an_iteration_resumes_bit_for_bit(tmp_path, digits, experts, uninterrupted, plugin):
    _equals_uninterrupted(*_interrupt_then_resume(tmp_path, digits, experts, plugin()), uninterrupted)


def test_ctrl_c_inside_the_unroll_resumes_bit_for_bit(tmp_path, digits, experts, uninterrupted, monkeypatch):
    import astkit.distill

    unroll, calls = astkit.distill.unroll, []

    def interrupted_unroll(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return unroll(*args, **kwargs)

    monkeypatch.setattr(astkit.distill, "unroll", interrupted_unroll)
    _equals_uninterrupted(*_interrupt_then_resume(tmp_path, digits, experts, monkeypatch=monkeypatch), uninterrupted)


def test_a_signal_during_the_update_is_held_until_the_iteration_is_whole(tmp_path, digits, experts, uninterrupted,
                                                                          monkeypatch):
    """A real SIGINT that arrives between the image and the lr update is delivered after the iteration."""
    check, seen = Distiller.state_problem, []

    def signalled(self):
        seen.append(self.iteration)
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return check(self)

    monkeypatch.setattr(Distiller, "state_problem", signalled)
    resumed, events, cut_at = _interrupt_then_resume(tmp_path, digits, experts, monkeypatch=monkeypatch)
    assert 2 in seen and cut_at == 3  # iteration 2 completed before the signal was delivered
    _equals_uninterrupted(resumed, events, cut_at, uninterrupted)


def test_ctrl_c_in_an_evaluation_resumes_and_makes_that_evaluation(tmp_path, digits, experts, uninterrupted,
                                                                    monkeypatch):
    import astkit.engine

    train, calls = astkit.engine.train_on_synthetic, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after iteration 4
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(astkit.engine, "train_on_synthetic", interrupted)
    # the evaluation after iteration 4 is made on resume
    _equals_uninterrupted(*_interrupt_then_resume(tmp_path, digits, experts, monkeypatch=monkeypatch), uninterrupted)


def test_a_planned_stop_resumes_bit_for_bit_over_many_iterations(tmp_path, digits, experts):
    """Checkpoint at 4 of 16 iterations, resume in a new distiller: every later iteration equal to the bit
    (images whose 1-channel strides looked channels-last once took other convolution kernels after a resume)."""
    config = tiny_config(tmp_path, "distill.iterations=16", "distill.checkpoint_every=0")
    engine = Engine(config, dataset=digits)
    original = engine.make_distiller(experts)
    states = []
    for _ in range(16):
        original.step()
        states.append(original.images.detach().clone())
        if original.iteration == 4:
            original.save_checkpoint(tmp_path / "ck.safetensors", {})
    resumed = engine.make_distiller(experts, tmp_path / "ck.safetensors")
    for it in range(4, 16):
        resumed.step()
        assert torch.equal(resumed.images.detach(), states[it]), f"iteration {it}"
    assert resumed.images.stride() == original.images.stride() == torch.empty(original.images.shape).stride()


def test_evaluation_leaves_the_random_state_alone(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path), dataset=digits)
    subset = engine.real_subset(2)
    before = torch.get_rng_state()
    engine.evaluate(subset)
    assert torch.equal(torch.get_rng_state(), before)


def test_ctrl_c_in_expert_training_resumes_bit_for_bit(tmp_path, digits, monkeypatch):
    """Ctrl-C while the second expert trains; `run(resume=True)` gives the uninterrupted run's files."""
    full = Engine(tiny_config(tmp_path / "full", "distill.iterations=2"), dataset=digits).run()

    import astkit.engine

    train = astkit.engine.train_expert

    def interrupted(index, *args, on_epoch, **kwargs):
        def stop_in_second_expert(epoch, loss, acc):
            if index == 1 and epoch == 1:
                raise KeyboardInterrupt
            on_epoch(epoch, loss, acc)

        return train(index, *args, on_epoch=stop_in_second_expert, **kwargs)

    monkeypatch.setattr(astkit.engine, "train_expert", interrupted)
    cut = Engine(tiny_config(tmp_path / "cut", "distill.iterations=2"), dataset=digits)
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert [p.name for p in (cut.out / "experts").iterdir()] == ["expert_000.safetensors"]
    monkeypatch.setattr(astkit.engine, "train_expert", train)
    resumed = Engine(tiny_config(tmp_path / "cut", "distill.iterations=2"), dataset=digits).run(resume=True)
    for a, b in zip(full.experts, resumed.experts):
        assert torch.equal(a.snapshots, b.snapshots)
    assert torch.equal(full.distilled.images, resumed.distilled.images)


def test_sigint_to_the_cli_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real Ctrl-C (SIGINT) to `astkit run` wherever it lands, then `--resume`: the same distilled set."""
    args = [sys.executable, "-m", "astkit", "run", "--quiet"]
    for item in [*TINY, "distill.iterations=30", "distill.checkpoint_every=0"]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*args, "--out", "full"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    process = subprocess.Popen([*args, "--out", "cut"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 5:  # inside distillation
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume" in stderr
    resumed = subprocess.run([*args, "--out", "cut", "--resume"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = DistilledSet.load(tmp_path / "full" / "distilled.safetensors")
    b = DistilledSet.load(tmp_path / "cut" / "distilled.safetensors")
    assert a.iteration == b.iteration == 30
    assert torch.equal(a.images, b.images) and a.lr == b.lr
    for name in ("expert_000.safetensors", "expert_001.safetensors"):
        assert torch.equal(Trajectory.load(tmp_path / "full" / "experts" / name).snapshots,
                           Trajectory.load(tmp_path / "cut" / "experts" / name).snapshots)


# ------------------------------------------------------------------ rollback
def test_an_lr_that_explodes_in_one_step_is_rolled_back_to_the_last_sane_state(tmp_path, digits, experts):
    """lr_img 1e12: iteration 0's update is finite but enormous; it is not kept."""
    config = tiny_config(tmp_path, "distill.iterations=6", "distill.lr_img=1e12", "distill.divergence_lr_factor=1e-4",
                         "distill.max_divergences=4")
    engine = Engine(config, dataset=digits)
    distiller = engine.make_distiller(experts)
    start = distiller.images.detach().clone()
    metrics = distiller.step()
    assert metrics.rolled_back and "the images grew to" in metrics.rollback_reason
    assert torch.equal(distiller.images.detach(), start) and metrics.lr_img == 1e8
    assert distiller.state_problem() is None

    distilled = Engine(config, dataset=digits).distill(experts)  # 1e12 -> 1e8 -> 1e4: sane again
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rolled_back"] for r in records] == [True, True, False, False, False, False]
    assert [r["lr_img"] for r in records][:3] == [1e8, 1e4, 1e4]
    assert distilled.images.abs().max() <= 100 * max(start.abs().max().item(), 1.0)
    assert distilled.images.ne(start).any()  # it went on distilling from the sane state


def test_a_run_that_never_recovers_stops_with_a_sane_set_saved(tmp_path, digits, experts):
    config = tiny_config(tmp_path, "distill.iterations=6", "distill.lr_img=1e12", "distill.max_divergences=3")
    engine = Engine(config, dataset=digits)
    start = engine.make_distiller(experts).images.detach().clone()
    with pytest.raises(DivergenceError, match=r"the images grew to .* 3 times in a row, last at iteration 2; "
                                              r"the last sane set is saved"):
        engine.distill(experts)
    saved = DistilledSet.load(tmp_path / "run" / "distilled.safetensors")
    assert torch.equal(saved.images, start)  # no update was sane: the start is the last sane state


def test_a_learned_lr_beyond_its_bound_is_rolled_back(tmp_path, digits, experts):
    config = tiny_config(tmp_path, "distill.iterations=1", "distill.lr_lr=1e6", "distill.max_lr_growth=5")
    distiller = Engine(config, dataset=digits).make_distiller(experts)
    metrics = distiller.step()
    assert metrics.rolled_back and "the learned lr" in metrics.rollback_reason
    assert distiller.lr.item() == pytest.approx(0.01)  # lr_teacher, restored
    assert not distiller.opt_lr.state.get(distiller.lr)  # the failed step left no momentum behind


def test_image_scale_survives_resume(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "distill.iterations=2"), dataset=digits)
    scale = engine.make_distiller(experts).image_scale
    engine.distill(experts)
    resumed = Engine(tiny_config(tmp_path, "distill.iterations=3"), dataset=digits)
    distiller = resumed.make_distiller(experts, tmp_path / "run" / "checkpoint.safetensors")
    assert distiller.image_scale == scale


class HardKill:
    """Stops the process's work without a checkpoint (as kill -9 would) at the end of iteration ``at``."""

    astkit_plugin_name = "hard-kill"

    def __init__(self, at: int):
        self.at = at

    @hookimpl
    def astkit_on_iteration_end(self, metrics):
        if metrics.iteration == self.at:
            raise SystemExit("killed")


def test_a_hard_kill_after_an_evaluation_resumes_without_a_second_record_of_it(tmp_path, digits, experts,
                                                                              uninterrupted):
    """The checkpoint at 2 was written before the evaluation at 2; the kill came after it was logged."""
    config = tiny_config(tmp_path, ITERATIONS, "distill.eval_every=2")
    with pytest.raises(SystemExit):
        Engine(config, dataset=digits, plugins=[HardKill(at=2)]).distill(experts)
    assert Checkpoint.read_iteration(tmp_path / "run" / "checkpoint.safetensors") == 2
    engine = Engine(tiny_config(tmp_path, ITERATIONS, "distill.eval_every=2"), dataset=digits)
    _equals_uninterrupted(engine.distill(experts, resume=True), _events(engine.out), 2, uninterrupted)


def test_a_fresh_run_uses_its_own_experts_not_other_files_of_the_folder(tmp_path, digits):
    import shutil

    engine = Engine(tiny_config(tmp_path, "distill.iterations=1", "evaluate.epochs=1"), dataset=digits)
    engine.folder.experts.mkdir(parents=True)
    first = Engine(tiny_config(tmp_path / "other"), dataset=digits).train_experts([0])[0]
    shutil.copy(tmp_path / "other" / "run" / "experts" / "expert_000.safetensors", engine.folder.expert(4))
    result = engine.run()
    assert len(result.experts) == 2  # experts.num_experts, not the leftover expert_004
    assert torch.equal(result.experts[0].snapshots, first.snapshots)  # expert 0 is seeded by (seed, 0) alone
