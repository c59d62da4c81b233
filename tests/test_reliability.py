"""Divergence, interruption, full disks, unwritable folders, bad plugin answers."""

import errno
import json
import os

import pytest
import torch

from astkit import DistilledSet, Engine, hookimpl
from astkit.errors import DivergenceError, UserError
from astkit import store

from conftest import tiny_config


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("rel")
    return Engine(tiny_config(tmp), dataset=digits).train_experts()


class NaNOnce:
    """Makes the inner loss weight NaN-producing for chosen iterations."""

    astkit_plugin_name = "nan-once"

    def __init__(self, bad):
        self.bad = set(bad)

    @hookimpl
    def astkit_perturb_expert(self, params, iteration):
        if iteration in self.bad:
            return {k: v * float("nan") for k, v in params.items()}
        return None


def test_nan_rolls_back_and_lowers_the_image_lr(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "distill.iterations=4"), dataset=digits, plugins=[NaNOnce({1})])
    distiller = engine.make_distiller(experts)
    distiller.step()
    before = distiller.images.detach().clone()
    m = distiller.step()
    assert m.rolled_back and m.lr_img == 50.0
    assert torch.equal(distiller.images.detach(), before)
    m = distiller.step()
    assert not m.rolled_back and torch.isfinite(distiller.images).all()


def test_repeated_divergence_stops_cleanly_with_the_last_good_set(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "distill.iterations=10", "distill.max_divergences=3"), dataset=digits,
                    plugins=[NaNOnce(range(2, 10))])
    with pytest.raises(DivergenceError, match="3 times in a row, last at iteration 4"):
        engine.distill(experts)
    saved = DistilledSet.load(engine.out / "distilled.safetensors")
    assert saved.iteration == 5 and torch.isfinite(saved.images).all()
    lines = [json.loads(x) for x in (engine.out / "metrics.jsonl").read_text().splitlines()]
    assert [x["rolled_back"] for x in lines] == [False, False, True, True, True]
    assert lines[-1]["rollback_reason"] == "the matching loss is NaN/Inf"


def test_clip_image_grad_scales_the_image_step_to_the_given_norm(tmp_path, digits, experts):
    """First step of SGD with momentum: images move by -lr_img * g, g scaled to norm clip when larger."""
    def one_step(*sets):
        distiller = Engine(tiny_config(tmp_path / "_".join(sets or ["none"]), "distill.iterations=1", *sets),
                           dataset=digits).make_distiller(experts)
        before = distiller.images.detach().clone()
        return distiller.step().grad_norm, distiller.images.detach() - before

    norm, step = one_step()
    clip = norm / 4
    clipped_norm, clipped_step = one_step(f"distill.clip_image_grad={clip!r}")
    assert clipped_norm == norm  # the log keeps the unclipped norm
    torch.testing.assert_close(step.norm(), torch.tensor(100.0 * norm), rtol=1e-4, atol=0)  # lr_img 100
    torch.testing.assert_close(clipped_step, step / 4, rtol=1e-3, atol=1e-7)
    assert one_step(f"distill.clip_image_grad={4 * norm!r}")[1].equal(step)  # below the bound: untouched
    with pytest.raises(UserError, match="distill.clip_image_grad must be > 0"):
        Engine(tiny_config(tmp_path / "bad", "distill.clip_image_grad=0"), dataset=digits)


class Interrupt:
    """Ctrl-C at the end of iteration ``at``."""

    astkit_plugin_name = "interrupt"

    def __init__(self, at: int = 1):
        self.at = at

    @hookimpl
    def astkit_on_iteration_end(self, metrics):
        if metrics.iteration == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_writes_a_checkpoint_and_resume_equals_uninterrupted(tmp_path, digits, experts):
    full = Engine(tiny_config(tmp_path / "full", "distill.iterations=4", "distill.checkpoint_every=0"),
                  dataset=digits).distill(experts)
    cut = Engine(tiny_config(tmp_path / "cut", "distill.iterations=4", "distill.checkpoint_every=0"), dataset=digits,
                 plugins=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        cut.distill(experts)
    assert (cut.out / "checkpoint.safetensors").is_file()
    resumed = Engine(tiny_config(tmp_path / "cut", "distill.iterations=4", "distill.checkpoint_every=0"),
                     dataset=digits).distill(experts, resume=True)
    assert torch.equal(full.images, resumed.images) and full.lr == resumed.lr


def test_resume_keeps_the_evaluations_made_before_the_checkpoint(tmp_path, digits, experts):
    def config():
        return tiny_config(tmp_path / "cut", "distill.iterations=6", "distill.checkpoint_every=2",
                           "distill.eval_every=1", "evaluate.num_nets=1", "evaluate.epochs=2")

    with pytest.raises(KeyboardInterrupt):
        Engine(config(), dataset=digits, plugins=[Interrupt(at=2)]).distill(experts)
    Engine(config(), dataset=digits).distill(experts, resume=True)
    records = [json.loads(line) for line in (tmp_path / "cut" / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["iteration"]) for r in records]
    # evaluation k is made after iteration k-1; the one at 3, cut by Ctrl-C before it ran, is made on resume
    assert events == [("iteration", 0), ("evaluation", 1), ("iteration", 1), ("evaluation", 2), ("iteration", 2),
                      ("evaluation", 3), ("iteration", 3), ("evaluation", 4), ("iteration", 4), ("evaluation", 5),
                      ("iteration", 5)]


def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    store.save(path, "distilled", {"images": torch.zeros(1)}, {})
    good = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match="disk full while writing"):
        store.save(path, "distilled", {"images": torch.ones(1)}, {})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to"):
        store.save(blocker / "sub" / "x.safetensors", "distilled", {"a": torch.zeros(1)}, {})


def test_a_bad_plugin_answer_is_a_clear_error(tmp_path, digits, experts):
    class BadWeight:
        astkit_plugin_name = "bad-weight"

        @hookimpl
        def astkit_inner_loss_weight(self):
            return -1.0

    engine = Engine(tiny_config(tmp_path), dataset=digits, plugins=[BadWeight()])
    with pytest.raises(UserError, match="must be a positive finite number"):
        engine.distill(experts)


def test_resume_with_another_config_is_refused_and_the_init_hook_is_not_called(tmp_path, digits, experts):
    Engine(tiny_config(tmp_path, "distill.iterations=2"), dataset=digits).distill(experts)
    with pytest.raises(UserError, match=r"holds images \(20, 1, 8, 8\), this run makes \(30, 1, 8, 8\)"):
        Engine(tiny_config(tmp_path, "distill.ipc=3"), dataset=digits).distill(experts, resume=True)

    class NoInit:
        astkit_plugin_name = "no-init"

        @hookimpl
        def astkit_init_synthetic(self):
            raise AssertionError("the init hook runs on resume")

    resumed = Engine(tiny_config(tmp_path, "distill.iterations=3"), dataset=digits, plugins=[NoInit()])
    assert resumed.distill(experts, resume=True).iteration == 3


def test_representative_init_takes_any_seed_the_config_accepts(tmp_path, digits, experts):
    """K-Means wants a seed below 2**32; the config accepts up to 2**63 - 1."""
    engine = Engine(tiny_config(tmp_path, f"seed={2**63 - 1}", "plugins=['representative-init']"), dataset=digits)
    images, labels = engine.init_synthetic(experts, torch.Generator().manual_seed(0))
    assert images.shape[0] == labels.shape[0] == 20
