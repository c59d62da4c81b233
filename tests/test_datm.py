"""DATM (plugin ``datm``): the growing start-epoch window against a transcription
of DATM's loop, the "correct"/"real" initialisation and its soft labels by hand
and against the experts, a tiny run that learns the labels (saved, shown,
evaluated), a planned stop resumed bit for bit, bad options refused in one
line with nothing written, and the ``datm-reference`` preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from astkit import DistilledSet, Engine, RunConfig, UserError
from astkit.data.dataset import Dataset
from astkit.functional import ParamLayout
from astkit.plugins import PluginSet, declared_options
from astkit.trajectory import ModelSpec, Trajectory
from astkit_plugins import datm

from conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def found() -> PluginSet:
    return PluginSet.discover()


def manager(found, *overrides: str, plugins=("datm",)):
    """The plugin manager of ``plugins`` and a config with their options resolved."""
    config = RunConfig.load(overrides=list(overrides))
    config.resolve_options(declared_options(found.catalog()))
    return found.manager(found.resolve(list(plugins))), config


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------ the window
def datm_upper_bound(it, args):
    """DATM's distill/DATM.py L484-491, transcribed (args as its cfg)."""
    if args["Sequential_Generation"]:
        Upper_Bound = args["current_max_start_epoch"] + int(
            (args["max_start_epoch"] - args["current_max_start_epoch"]) * it / (args["expansion_end_epoch"]))
        Upper_Bound = min(Upper_Bound, args["max_start_epoch"])
    else:
        Upper_Bound = args["max_start_epoch"]
    return Upper_Bound


def test_the_upper_bound_is_datms_at_the_cifar10_ipc10_setting():
    args = {"Sequential_Generation": True, "min_start_epoch": 0, "current_max_start_epoch": 10,
            "max_start_epoch": 20, "expansion_end_epoch": 1000}
    iterations = [0, 1, 99, 100, 999, 1000, 5000]
    assert [datm_upper_bound(it, args) for it in iterations] == [10, 10, 10, 11, 19, 20, 20]
    assert [datm.upper_bound(it, 10, 20, 1000) for it in iterations] == [10, 10, 10, 11, 19, 20, 20]


@pytest.mark.parametrize("cur, maximum, end", [(10, 20, 1000), (20, 40, 2000), (30, 50, 2000), (15, 20, 2000),
                                               (1, 3, 7), (5, 5, 3)])
def test_the_upper_bound_equals_datms_loop_at_every_iteration(cur, maximum, end):
    args = {"Sequential_Generation": True, "current_max_start_epoch": cur, "max_start_epoch": maximum,
            "expansion_end_epoch": end}
    for it in range(0, 2 * end + 5):
        assert datm.upper_bound(it, cur, maximum, end) == datm_upper_bound(it, args), it
    args["Sequential_Generation"] = False
    assert datm.upper_bound(123, None, maximum, end) == datm_upper_bound(123, args) == maximum


@pytest.mark.parametrize("low", [0, 4])
def test_the_hook_draws_uniformly_in_the_window(found, low):
    pm, config = manager(found, f"datm.min_start_epoch={low}", "datm.initial_max_start_epoch=10",
                         "datm.expansion_end=1000")
    for it, upper in [(0, 10), (100, 11), (550, 15), (1000, 20), (5000, 20)]:
        generator, twin = torch.Generator().manual_seed(it), torch.Generator().manual_seed(it)
        draws = [pm.hook.astkit_draw_start_epoch(expert_index=0, max_start_epoch=20, num_epochs=30, iteration=it,
                                                 generator=generator, state={}, config=config) for _ in range(600)]
        assert set(draws) == set(range(low, upper)), it  # every value of [min, U) drawn, nothing outside
        assert draws == [int(torch.randint(low, upper, (1,), generator=twin)) for _ in range(600)]


def test_without_an_initial_bound_the_window_is_fixed_and_at_min_0_the_baseline(found):
    pm, config = manager(found)
    base = found.manager([])
    for it in (0, 7, 10_000):
        a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        kwargs = dict(expert_index=0, max_start_epoch=6, num_epochs=10, iteration=it, state={}, config=config)
        mine = [pm.hook.astkit_draw_start_epoch(generator=a, **kwargs) for _ in range(200)]
        theirs = [base.hook.astkit_draw_start_epoch(generator=b, **kwargs) for _ in range(200)]
        assert mine == theirs and set(mine) == set(range(6))


@pytest.mark.parametrize("overrides, fragment", [
    (["datm.min_start_epoch=20"], "datm.min_start_epoch = 20"),            # min >= max (20)
    (["datm.min_start_epoch=-1"], "datm.min_start_epoch = -1"),
    (["datm.min_start_epoch=5", "datm.initial_max_start_epoch=5"], "datm.initial_max_start_epoch = 5 must be in 6..20"),
    (["datm.initial_max_start_epoch=21"], "datm.initial_max_start_epoch = 21 must be in 1..20"),
    (["datm.initial_max_start_epoch=2.5"], "datm.initial_max_start_epoch must be a whole number"),
    (["datm.initial_max_start_epoch=ten"], "datm.initial_max_start_epoch must be a whole number"),
    (["datm.initial_max_start_epoch=10", "datm.expansion_end=0"], "datm.expansion_end = 0 must be >= 1"),
])
def test_bad_window_values_are_refused_in_one_line(found, overrides, fragment):
    pm, config = manager(found, *overrides)
    with pytest.raises(UserError) as exc:
        pm.hook.astkit_draw_start_epoch(expert_index=0, max_start_epoch=20, num_epochs=30, iteration=0,
                                        generator=torch.Generator(), state={}, config=config)
    assert fragment in one_line(exc)


# ---------------------------------------------------- initialisation by hand
def linear(channels, num_classes, image_size, **_):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size[0] * image_size[1], num_classes))


REGISTRY = {"linear": linear}
SPEC = ModelSpec("linear", 1, 2, (1, 2))
LAYOUT = ParamLayout.of(linear(1, 2, (1, 2)))


def expert(first, final) -> Trajectory:
    """A 1-epoch expert of the linear model: snapshots ``(W, b)`` at epoch 0 and 1."""
    flat = [torch.cat([torch.tensor(w, dtype=torch.float32).flatten(), torch.tensor(b, dtype=torch.float32)])
            for w, b in (first, final)]
    return Trajectory(torch.stack(flat), LAYOUT, SPEC, registry=REGISTRY)


SWAP = ([[0, 1], [1, 0]], [0, 0])
E0 = expert(SWAP, ([[1, 0], [0, 1]], [0, 0]))          # logits (x0, x1); at epoch 0: (x1, x0)
E1 = expert(SWAP, SWAP)                                  # logits (x1, x0)
E2 = expert(SWAP, ([[2, 0], [0, 1]], [1, 0]))           # logits (2 x0 + 1, x1)
# class 0: p, q, r; class 1: s, t.  Correct: E0 on p, s; E1 on q, r, t; E2 on p, s.
P, Q, R, S, T = (2.0, 0.0), (0.0, 2.0), (0.0, 3.0), (0.0, 4.0), (5.0, 0.0)


@pytest.fixture(scope="module")
def tiny():
    images = torch.tensor([P, Q, R, S, T]).view(5, 1, 1, 2)
    labels = torch.tensor([0, 0, 0, 1, 1])
    return Dataset("tiny", images, labels, images.clone(), labels.clone(), ["zero", "one"], (0.0,), (1.0,))


def init(found, dataset, ipc, experts, *overrides, seed=0):
    pm, config = manager(found, *overrides)
    return pm.hook.astkit_init_synthetic(dataset=dataset, ipc=ipc, experts=experts,
                                         generator=torch.Generator().manual_seed(seed), config=config)


def rows(images):
    return [tuple(x) for x in images.view(len(images), 2).tolist()]


def test_correct_init_keeps_expert_0s_correct_images_with_the_mean_logits_of_the_correct_experts(found, tiny):
    images, labels = init(found, tiny, 1, [E0, E1, E2])
    assert rows(images) == [P, S]  # expert 0 is right on p and s only, whatever the order
    # p: E0 (2, 0) and E2 (5, 0) are right, E1 (0, 2) is not; s: E0 (0, 4) and E2 (1, 4)
    torch.testing.assert_close(labels, torch.tensor([[3.5, 0.0], [0.5, 4.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_class_that_runs_out_continues_with_the_next_expert(found, tiny, seed):
    images, labels = init(found, tiny, 2, [E0, E1, E2], seed=seed)
    got = rows(images)
    assert got[0] == P and got[1] in (Q, R)  # expert 0 finds p only; expert 1 adds q or r (first in the order)
    assert got[2:] == [S, T]
    by_hand = {P: [3.5, 0.0], Q: [2.0, 0.0], R: [3.0, 0.0], S: [0.5, 4.0], T: [0.0, 5.0]}  # q, r, t: E1 only
    assert labels.tolist() == [by_hand[x] for x in got]
    # the order is the class's random permutation from the generator: p, then the first of q, r in it
    generator = torch.Generator().manual_seed(seed)
    order = [tiny.class_indices()[0][i].item() for i in torch.randperm(3, generator=generator)]
    assert got[1] == (Q if order.index(1) < order.index(2) else R)


def test_no_expert_classifying_enough_images_is_one_error_line(found, tiny):
    with pytest.raises(UserError) as exc:
        init(found, tiny, 2, [E0, E2])  # both right on p only in class 0
    message = one_line(exc)
    assert "only 1 images of class 0" in message and "datm.init=real" in message


def test_hard_labels_when_soft_labels_are_off(found, tiny):
    images, labels = init(found, tiny, 2, [E0, E1, E2], "datm.soft_labels=false")
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(images, init(found, tiny, 2, [E0, E1, E2])[0])


def test_real_init_is_the_baselines_images_with_expert_0s_logits(found, tiny):
    baseline = found.manager([]).hook.astkit_init_synthetic(dataset=tiny, ipc=2, experts=[E0, E1],
                                                            generator=torch.Generator().manual_seed(5),
                                                            config=RunConfig())
    images, labels = init(found, tiny, 2, [E0, E1], "datm.init=real", seed=5)
    assert torch.equal(images, baseline[0])
    torch.testing.assert_close(labels, images.view(4, 2), rtol=0, atol=0)  # E0's final logits are (x0, x1)
    _, at_0 = init(found, tiny, 2, [E0, E1], "datm.init=real", "datm.label_snapshot=0", seed=5)
    torch.testing.assert_close(at_0, images.view(4, 2).flip(1), rtol=0, atol=0)  # epoch 0 swaps
    _, hard = init(found, tiny, 2, [E0, E1], "datm.init=real", "datm.soft_labels=false", seed=5)
    assert torch.equal(hard, baseline[1])


def test_label_snapshot_selects_the_filter_and_the_logits(found, tiny):
    # at epoch 0 every expert swaps: right on q, r (class 0) and t (class 1)
    images, labels = init(found, tiny, 1, [E0, E1], "datm.label_snapshot=0")
    assert rows(images)[0] in (Q, R) and rows(images)[1] == T
    assert labels.tolist() == [list(reversed(rows(images)[0])), [0.0, 5.0]]


@pytest.mark.parametrize("overrides, fragment", [
    (["datm.init=kmeans"], "datm.init must be 'correct' or 'real'"),
    (["datm.label_snapshot=2"], "datm.label_snapshot = 2, but expert 0 has snapshots 0..1"),
    (["datm.label_snapshot=-3"], "datm.label_snapshot = -3"),
    (["datm.expansion_end=0"], "datm.expansion_end = 0"),
])
def test_bad_init_values_are_refused_in_one_line(found, tiny, overrides, fragment):
    with pytest.raises(UserError) as exc:
        init(found, tiny, 1, [E0, E1], "distill.max_start_epoch=1", *overrides)
    assert fragment in one_line(exc)


# ------------------------------------------------------ on digits, with experts
EXPERTS = "experts.lr=0.1"  # experts good enough to find 40 correct digits per class


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    engine = Engine(tiny_config(tmp_path_factory.mktemp("datm-experts"), EXPERTS), dataset=digits)
    return engine.train_experts(), engine.folder.experts


@pytest.fixture(scope="module")
def experts(trained):
    return trained[0]


def datm_select(images, c, ipc, models):
    """DATM's distill/DATM.py L185-236 for one class, transcribed: the positions (into ``images``, already in
    random order) it keeps; ``models[cur % E]`` stands for its buffer file/index counter."""
    index, select_times, cur, batch_size = [], 0, 0, 256
    model = models[0]
    while len(index) < ipc:
        if batch_size * select_times > len(images):
            select_times, cur = 0, cur + 1
            assert cur < 10 * len(models), "DATM would loop forever"
            model = models[cur % len(models)]
            continue
        with torch.no_grad():
            prediction_class = model(images[batch_size * select_times: batch_size * (select_times + 1)]).argmax(1)
        for i in range(len(prediction_class)):
            if prediction_class[i] == c and len(index) < ipc:
                index.append(batch_size * select_times + i)
                index = list(set(index))
        select_times += 1
    return index


def test_correct_init_on_digits_equals_datms_selection_and_label_averaging(found, digits, experts):
    ipc = 40
    images, labels = init(found, digits, ipc, experts, seed=11)
    models = [e.build_model(snapshot=-1).eval() for e in experts]
    classes = torch.arange(10).repeat_interleave(ipc)
    with torch.no_grad():
        logits_tensor = torch.stack([m(images) for m in models])
    generator, switched = torch.Generator().manual_seed(11), []
    for c, indices in enumerate(digits.class_indices()):
        candidates = digits.train_images[indices[torch.randperm(len(indices), generator=generator)]]
        expected = candidates[datm_select(candidates, c, ipc, models)]
        mine = images[ipc * c: ipc * (c + 1)]
        assert sorted(map(tuple, mine.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist())), c
        switched.append(bool((logits_tensor[0, ipc * c: ipc * (c + 1)].argmax(1) != c).any()))
    assert any(switched) and not all(switched)  # some class needed expert 1, as DATM's counter does
    # DATM L270-307: sum of the correct experts' logits / their number
    correct_predictions = logits_tensor.argmax(2) == classes.view(1, -1)
    mask = correct_predictions.unsqueeze(2)
    average = (logits_tensor * mask.float()).sum(0) / correct_predictions.sum(0, dtype=torch.float).unsqueeze(1)
    torch.testing.assert_close(labels, average)
    assert labels.shape == (10 * ipc, 10) and labels.dtype == torch.float32


def _events(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["start_epoch"] for r in records if r["event"] == "iteration"]


WINDOW = ["plugins=datm", "distill.learn_labels=true", "distill.max_start_epoch=3", "datm.initial_max_start_epoch=1",
          "datm.expansion_end=4", "distill.checkpoint_every=0"]


def test_a_run_learns_soft_labels_that_are_saved_shown_and_evaluated(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, *WINDOW, "distill.iterations=6"), dataset=digits)
    assert engine.enabled == ["datm"]
    _, start = engine.init_synthetic(experts, torch.Generator().manual_seed(engine.config.seed))  # the run's start
    distilled = engine.distill(experts)
    starts = _events(engine.out)
    # U = min(3, 1 + int(2 it / 4)): 1, 1, 2, 2, 3, 3
    assert all(0 <= s < u for s, u in zip(starts, [1, 1, 2, 2, 3, 3])) and starts[:2] == [0, 0]
    assert [m.start_epoch for m in engine.history] == starts
    assert distilled.labels.dtype == torch.float32 and distilled.labels.shape == (20, 10)
    assert not torch.equal(distilled.labels, start)  # learned
    saved = DistilledSet.load(engine.folder.distilled)
    assert saved.soft_labels and torch.equal(saved.labels, distilled.labels)
    env = {"PYTHONWARNINGS": "ignore"}
    shown = subprocess.run([sys.executable, "-m", "astkit", "show", str(engine.folder.distilled), "--no-png"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert shown.returncode == 0, shown.stderr
    assert "soft (20x10 logits)" in shown.stdout
    evaluated = subprocess.run([sys.executable, "-m", "astkit", "evaluate", str(engine.folder.distilled),
                                "--epochs", "3", "--num-nets", "1"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               env={**os.environ, **env})
    assert evaluated.returncode == 0, evaluated.stderr
    assert "accuracy (convnet, 1 net):" in evaluated.stdout


def test_a_planned_stop_resumes_the_window_and_the_labels_bit_for_bit(tmp_path, digits, experts):
    full = Engine(tiny_config(tmp_path / "full", *WINDOW, "distill.iterations=6"), dataset=digits)
    whole = full.distill(experts)
    Engine(tiny_config(tmp_path / "cut", *WINDOW, "distill.iterations=3"), dataset=digits).distill(experts)
    resumed_engine = Engine(tiny_config(tmp_path / "cut", *WINDOW, "distill.iterations=6"), dataset=digits)
    resumed = resumed_engine.distill(experts, resume=True)
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.labels, whole.labels)
    assert resumed.lr == whole.lr
    assert _events(resumed_engine.out) == _events(full.out)


def test_a_bad_option_stops_distillation_before_anything_is_written(tmp_path, digits, experts):
    with pytest.raises(UserError) as exc:  # refused when the engine is built (astkit_check_config)
        Engine(tiny_config(tmp_path, "plugins=datm", "datm.initial_max_start_epoch=9"), dataset=digits).distill(experts)
    assert "datm.initial_max_start_epoch = 9 must be in 1..2" in one_line(exc)
    assert not (tmp_path / "run").exists()


def test_a_bad_option_on_the_command_line_is_one_error_line_and_writes_nothing(tmp_path, trained):
    sets = [x for item in [*TINY, EXPERTS, "datm.expansion_end=0", "datm.initial_max_start_epoch=1"]
            for x in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "astkit", "distill", "-p", "datm", "--experts", str(trained[1]),
                             "--out", str(tmp_path / "out"), *sets], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "datm.expansion_end = 0 must be >= 1" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_learning_labels_without_soft_labels_is_refused(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "plugins=datm", "datm.soft_labels=false", "distill.learn_labels=true"),
                    dataset=digits)
    with pytest.raises(UserError, match="learn_labels needs soft labels"):
        engine.distill(experts)


# ----------------------------------------------------------------- preset
def test_the_preset_names_datm_and_ftd_with_datms_values(found):
    preset = found.presets()["datm-reference"]
    assert preset.plugins == ["datm", "ftd"]
    settings = preset.settings()
    assert settings == {
        "experts.optimizer": "sgd", "experts.lr": 0.01, "experts.momentum": 0.0, "experts.weight_decay": 0.0,
        "experts.lr_decay": 1.0, "distill.learn_labels": True, "distill.lr_labels": 2.0,
        "distill.labels_momentum": 0.9, "distill.max_loss_to_update": 1.0, "evaluate.batch_size": 128,
        "datm.init": "correct", "datm.soft_labels": True, "datm.min_start_epoch": 0,
        "datm.initial_max_start_epoch": 10, "datm.expansion_end": 1000,
        "ftd.sharpness": "gsam", "ftd.rho": 0.01, "ftd.alpha": 0.3, "ftd.ema_decay": 0.0,
    }
    assert "distill.max_start_epoch" in preset.description  # the user sets it (and the other per-dataset values)


def test_the_preset_resolves(found):
    if "ftd" not in found.available:
        pytest.skip("plugin ftd is not installed yet: the preset resolves once it declares its options")
    engine = Engine(RunConfig.load(overrides=["plugins=datm-reference", "distill.max_start_epoch=20",
                                              "experts.epochs=22"]), plugin_set=found)
    assert engine.enabled == ["datm", "ftd"]
    c = engine.config
    assert (c.experts.lr, c.experts.momentum, c.experts.weight_decay, c.experts.lr_decay) == (0.01, 0.0, 0.0, 1.0)
    assert (c.distill.learn_labels, c.distill.lr_labels, c.distill.labels_momentum) == (True, 2.0, 0.9)
    assert c.distill.max_loss_to_update == 1.0 and c.evaluate.batch_size == 128
    assert c.options["datm"]["initial_max_start_epoch"] == 10 and c.options["datm"]["expansion_end"] == 1000
    assert c.options["ftd"]["ema_decay"] == 0.0 and c.options["ftd"]["rho"] == 0.01 and c.options["ftd"]["alpha"] == 0.3
    user = Engine(RunConfig.load(overrides=["plugins=datm-reference", "distill.lr_labels=10",
                                            "datm.expansion_end=2000"]), plugin_set=found)
    assert user.config.distill.lr_labels == 10.0 and user.config.options["datm"]["expansion_end"] == 2000


def test_bad_options_are_refused_when_the_engine_is_built(tmp_path, digits):
    """astkit_check_config: `astkit run` refuses before any expert is trained."""
    from conftest import tiny_config

    for option, words in (("datm.min_start_epoch=5", "datm.min_start_epoch = 5"), ("datm.init=best", "datm.init")):
        config = tiny_config(tmp_path, option)
        config.plugins = ["datm"]
        with pytest.raises(UserError, match=words):
            Engine(config, dataset=digits)
        assert not (tmp_path / "run").exists()
