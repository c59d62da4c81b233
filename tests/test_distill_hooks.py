"""The hooks for the field's techniques: labels, draws, distance, set updates, state, events."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from astkit import DistilledSet, Engine, MatchPoint, RunConfig, UserError, hookimpl
from astkit.checkpoint import Checkpoint, pack_state, unpack_state
from astkit.functional import FlatModel
from astkit.labels import per_sample_loss
from astkit.matching import unroll
from astkit.models import build_model
from astkit.plugins import PluginSet

from conftest import tiny_config


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    return Engine(tiny_config(tmp_path_factory.mktemp("experts")), dataset=digits).train_experts()


def manager(*plugins):
    found = PluginSet.discover()
    return found.manager([found.add(p) for p in plugins])


class SoftInit:
    """Random real images with soft labels: 3 x one-hot logits plus noise."""

    astkit_plugin_name = "soft-init"

    @hookimpl
    def astkit_init_synthetic(self, dataset, ipc, generator):
        images, labels = [], []
        for c, idx in enumerate(dataset.class_indices()):
            images.append(dataset.train_images[idx[:ipc]])
            labels += [c] * ipc
        hard = torch.tensor(labels)
        soft = 3.0 * F.one_hot(hard, dataset.num_classes).float()
        return torch.cat(images), soft + 0.1 * torch.randn(soft.shape, generator=generator)


# ------------------------------------------------------------------ labels
def test_default_student_loss_is_cross_entropy_and_soft_cross_entropy_at_temperature():
    pm = manager()
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    hard = torch.tensor([1, 2])
    got = pm.hook.astkit_student_loss(logits=logits, labels=hard, config=RunConfig())
    torch.testing.assert_close(got, F.cross_entropy(logits, hard, reduction="none"))
    soft = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    config = RunConfig.load(overrides=["distill.label_temperature=2"])
    got = pm.hook.astkit_student_loss(logits=logits, labels=soft, config=config)
    # by hand: T^2 * sum_c -softmax(y/T)_c log softmax(z/T)_c, T = 2
    expected = []
    for z, y in zip(logits.tolist(), soft.tolist()):
        ey = [pow(2.718281828459045, v / 2) for v in y]
        ez = [pow(2.718281828459045, v / 2) for v in z]
        p = [v / sum(ey) for v in ey]
        logq = [torch.log(torch.tensor(v / sum(ez))).item() for v in ez]
        expected.append(4 * -sum(pc * lq for pc, lq in zip(p, logq)))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_a_student_loss_plugin_is_used_in_the_unroll_and_in_evaluation(tmp_path, digits, experts):
    calls = {"n": 0}

    class Doubled:
        astkit_plugin_name = "doubled"

        @hookimpl
        def astkit_student_loss(self, logits, labels):
            calls["n"] += 1
            return 2 * F.cross_entropy(logits, labels, reduction="none")

    plain = Engine(tiny_config(tmp_path / "a", "distill.iterations=1"), dataset=digits)
    doubled = Engine(tiny_config(tmp_path / "b", "distill.iterations=1", "distill.recompute_segment=2"),
                     dataset=digits, plugins=[Doubled()])
    a, b = plain.distill(experts), doubled.distill(experts)
    steps = doubled.config.distill.syn_steps
    recomputed = steps - 2  # segments of 2: the hook runs again for each step before the last segment
    assert calls["n"] == steps + recomputed
    assert not torch.equal(a.images, b.images)  # twice the loss: another student, another meta-gradient
    doubled.evaluate(b)
    assert calls["n"] > steps + recomputed  # evaluation trains with the same loss


def test_soft_learned_labels_move_and_are_saved_shown_and_evaluated(tmp_path, digits, experts):
    config = tiny_config(tmp_path, "distill.learn_labels=true", "distill.lr_labels=50", "distill.iterations=3")
    engine = Engine(config, dataset=digits, plugins=[SoftInit()])
    start = engine.make_distiller(experts).labels.detach().clone()
    distilled = engine.distill(experts)
    assert distilled.labels.shape == (20, 10) and distilled.labels.dtype == torch.float32
    assert not torch.equal(distilled.labels, start)  # learned
    loaded = DistilledSet.load(engine.folder.distilled)
    assert torch.equal(loaded.labels, distilled.labels) and loaded.soft_labels and loaded.ipc == 2
    checkpoint = Checkpoint.load(engine.folder.checkpoint)
    assert "labels" in checkpoint.momentum  # the labels' optimiser state is kept for a resume
    result = engine.evaluate(loaded)
    assert 0 <= result[engine.config.model.name].mean <= 1
    shown = subprocess.run([sys.executable, "-m", "astkit", "show", str(engine.folder.distilled), "--no-png"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "soft (20x10 logits)" in shown.stdout


def test_learned_labels_get_the_exact_meta_gradient(digits):
    """d(matching loss)/d(soft labels) against central finite differences, in float64, with and
    without segment recomputation."""
    torch.manual_seed(0)
    module = build_model("convnet", channels=1, num_classes=10, image_size=8, width=4).double()
    student = FlatModel(module)
    start = student.initial()
    target = start + 0.05 * torch.randn(start.shape, dtype=torch.float64)
    images = digits.train_images[:6].double()
    labels = torch.randn(6, 10, dtype=torch.float64)
    lr = torch.tensor(0.05, dtype=torch.float64)

    def loss(y, segment=0):
        theta = unroll(student, start.clone().requires_grad_(True), images, y, lr, 4, momentum=0.5,
                       segment=segment, loss_fn=lambda z, t: per_sample_loss(z, t, 2.0))[4]
        return (theta - target).pow(2).sum() / (start - target).pow(2).sum()

    y = labels.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(y), y)
    y2 = labels.clone().requires_grad_(True)
    (grad_segmented,) = torch.autograd.grad(loss(y2, segment=3), y2)
    torch.testing.assert_close(grad_segmented, grad, rtol=1e-9, atol=1e-12)
    eps = 1e-6
    for i, c in [(0, 0), (2, 5), (5, 9)]:
        plus, minus = labels.clone(), labels.clone()
        plus[i, c] += eps
        minus[i, c] -= eps
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        assert abs(fd.item() - grad[i, c].item()) <= 1e-6 * max(1.0, abs(fd.item())), (i, c)


def test_bad_labels_are_refused_in_one_line(tmp_path, digits, experts):
    class FloatOneD:
        astkit_plugin_name = "float-1d"

        @hookimpl
        def astkit_init_synthetic(self, dataset, ipc):
            n = ipc * dataset.num_classes
            return dataset.train_images[:n].clone(), torch.zeros(n)

    class WrongClasses:
        astkit_plugin_name = "wrong-classes"

        @hookimpl
        def astkit_init_synthetic(self, dataset, ipc):
            n = ipc * dataset.num_classes
            return dataset.train_images[:n].clone(), torch.zeros(n, dataset.num_classes + 1)

    for plugin, words in ((FloatOneD(), "hard labels must be integers"), (WrongClasses(), "expected (20, 10)")):
        engine = Engine(tiny_config(tmp_path / plugin.astkit_plugin_name), dataset=digits, plugins=[plugin])
        with pytest.raises(UserError, match="labels") as err:
            engine.distill(experts)
        assert words in str(err.value) and "\n" not in str(err.value)
        assert not engine.folder.distilled.exists()
    with pytest.raises(UserError, match="distill.learn_labels needs soft labels"):
        Engine(tiny_config(tmp_path / "hard", "distill.learn_labels=true"), dataset=digits).distill(experts)


# ------------------------------------------------------------------- draws
def test_the_default_draws_are_mtts_cycle_and_uniform_starts():
    pm = manager()
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    state, order, drawn, expected = {}, [], [], []
    for it in range(7):
        drawn.append(pm.hook.astkit_draw_expert(num_experts=3, iteration=it, generator=generator, state=state,
                                                config=RunConfig()))
        drawn.append(pm.hook.astkit_draw_start_epoch(expert_index=drawn[-1], max_start_epoch=5, num_epochs=8,
                                                     iteration=it, generator=generator, state=state,
                                                     config=RunConfig()))
        # MTT's distill.py: a shuffled list of experts, popped; refilled when empty; then randint
        if not order:
            order = torch.randperm(3, generator=reference).tolist()
        expected.append(order.pop(0))
        expected.append(int(torch.randint(0, 5, (1,), generator=reference)))
    assert drawn == expected
    assert sorted(drawn[0:6:2]) == [0, 1, 2]  # every expert once per cycle


def test_draw_plugins_choose_expert_and_start_and_bad_answers_are_refused(tmp_path, digits, experts):
    class Fixed:
        astkit_plugin_name = "fixed"

        def __init__(self, expert, start):
            self.expert, self.start = expert, start

        @hookimpl
        def astkit_draw_expert(self):
            return self.expert

        @hookimpl
        def astkit_draw_start_epoch(self, expert_index, num_epochs):
            assert num_epochs == 4
            return self.start

    engine = Engine(tiny_config(tmp_path / "ok"), dataset=digits, plugins=[Fixed(1, 2)])
    engine.distill(experts)
    assert {(m.expert, m.start_epoch) for m in engine.history} == {(1, 2)}
    for expert, start, words in ((2, 0, "astkit_draw_expert returned 2"), (0, 3, "astkit_draw_start_epoch returned 3")):
        engine = Engine(tiny_config(tmp_path / f"bad{expert}{start}"), dataset=digits, plugins=[Fixed(expert, start)])
        with pytest.raises(UserError, match=words) as err:
            engine.distill(experts)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- distance
def test_the_default_distance_is_mtts_and_a_plugin_masks_by_parameter_name(tmp_path, digits, experts):
    pm = manager()
    student, start, target = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    layout = FlatModel(torch.nn.Linear(1, 2)).layout  # weight (2), bias... any layout: the default ignores it
    got = pm.hook.astkit_matching_distance(student=student, start=start, target=target, layout=layout,
                                           point=MatchPoint(1, 1), start_epoch=0, expert_index=0, iteration=0,
                                           state={}, config=RunConfig())
    assert got.item() == pytest.approx((0 + 1 + 4) / 3)

    seen = []

    class ClassifierOnly:
        astkit_plugin_name = "classifier-only"

        @hookimpl
        def astkit_matching_distance(self, student, start, target, layout, point, start_epoch, expert_index):
            seen.append((start_epoch, expert_index, point))
            s, a, t = layout.split(student), layout.split(start), layout.split(target)
            names = [n for n in layout.names if n.startswith("classifier")]
            num = sum((s[n] - t[n]).pow(2).sum() for n in names)
            return num / sum((a[n] - t[n]).pow(2).sum() for n in names)

    engine = Engine(tiny_config(tmp_path), dataset=digits, plugins=[ClassifierOnly()])
    engine.distill(experts)
    assert [(s, e) for s, e, _ in seen] == [(m.start_epoch, m.expert) for m in engine.history]
    # the loss is the classifier's alone: recompute iteration 0's start distance by hand
    module = experts[0].build_model(0)
    assert any(n.startswith("classifier") for n, _ in module.named_parameters())
    assert all(m.loss > 0 and m.terms == [m.loss] for m in engine.history)


# ------------------------------------------------ set updates, output, state
class Ema:
    """A plugin keeping an EMA of the images and a JSON counter in the plugin state."""

    astkit_plugin_name = "ema"
    decay = 0.5

    @hookimpl
    def astkit_init_state(self, images, state):
        state["ema"] = {"shadow": images.clone(), "updates": 0, "log": []}

    @hookimpl
    def astkit_update_synthetic(self, images, iteration, state):
        mine = state["ema"]
        mine["shadow"].mul_(self.decay).add_(images, alpha=1 - self.decay)
        mine["updates"] += 1
        mine["log"].append(iteration)

    @hookimpl
    def astkit_synthetic_output(self, labels, state):
        return state["ema"]["shadow"], labels


def test_the_synthetic_output_is_saved_and_the_checkpoint_keeps_the_optimised_set(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "distill.checkpoint_every=0"), dataset=digits, plugins=[Ema()])
    first = engine.make_distiller(experts)
    expected = first.images.detach().clone()
    for _ in range(3):
        first.step()
        expected = 0.5 * expected + 0.5 * first.images.detach()
    distilled = first.distilled({})
    torch.testing.assert_close(distilled.images, expected, rtol=0, atol=0)
    assert first.state["ema"]["updates"] == 3 and first.state["ema"]["log"] == [0, 1, 2]
    ckpt = first.checkpoint({})
    assert torch.equal(ckpt.images, first.images.detach())  # the optimised images, not the EMA


def test_plugin_state_resumes_bit_for_bit(tmp_path, digits, experts):
    full = Engine(tiny_config(tmp_path / "full", "distill.iterations=5"), dataset=digits, plugins=[Ema()])
    uninterrupted = full.distill(experts)
    engine = Engine(tiny_config(tmp_path / "cut", "distill.iterations=2"), dataset=digits, plugins=[Ema()])
    engine.distill(experts)
    saved = Checkpoint.load(engine.folder.checkpoint)
    assert saved.plugin_state["ema"]["updates"] == 2 and saved.plugin_state["ema"]["log"] == [0, 1]
    resumed = Engine(tiny_config(tmp_path / "cut", "distill.iterations=5"), dataset=digits, plugins=[Ema()])
    result = resumed.distill(experts, resume=True)
    assert torch.equal(result.images, uninterrupted.images)  # the EMA, continued from the checkpoint
    assert [m.to_json() | {"seconds": 0} for m in resumed.history] == \
        [m.to_json() | {"seconds": 0} for m in full.history]


def test_a_failed_iteration_leaves_plugin_state_as_it_was(tmp_path, digits, experts):
    class Boom:
        astkit_plugin_name = "boom"

        @hookimpl
        def astkit_matching_schedule(self, iteration, syn_steps, expert_epochs):
            if iteration == 1:
                raise KeyboardInterrupt
            return [MatchPoint(syn_steps, expert_epochs)]

    engine = Engine(tiny_config(tmp_path), dataset=digits, plugins=[Boom()])
    distiller = engine.make_distiller(experts)
    distiller.step()
    before = json.dumps(distiller.state)
    with pytest.raises(KeyboardInterrupt):
        distiller.step()  # the expert cycle was advanced by the draw, then undone
    assert json.dumps(distiller.state) == before


def test_plugin_state_packs_tensors_and_json_and_refuses_other_objects():
    tensors = {}
    state = {"a": {"t": torch.arange(3), "n": [1, 2.5, "x", None, {"u": torch.ones(2)}]}}
    packed = pack_state(state, tensors)
    json.dumps(packed)
    back = unpack_state(packed, tensors)
    assert torch.equal(back["a"]["t"], torch.arange(3)) and back["a"]["n"][:4] == [1, 2.5, "x", None]
    assert torch.equal(back["a"]["n"][4]["u"], torch.ones(2))
    with pytest.raises(UserError, match="plugin state holds a set"):
        pack_state({"a": {1, 2}}, {})


def test_an_update_above_max_loss_to_update_is_skipped(tmp_path, digits, experts):
    engine = Engine(tiny_config(tmp_path, "distill.max_loss_to_update=1e-9"), dataset=digits, plugins=[Ema()])
    distiller = engine.make_distiller(experts)
    before = distiller.images.detach().clone()
    metrics = distiller.step()
    assert metrics.skipped and not metrics.rolled_back
    assert torch.equal(distiller.images.detach(), before) and distiller.state["ema"]["updates"] == 0


# ------------------------------------------------------------------ events
def test_iteration_start_and_distill_end_events(tmp_path, digits, experts):
    events = []

    class Recorder:
        astkit_plugin_name = "recorder"

        @hookimpl
        def astkit_on_iteration_start(self, iteration, images, labels, run, config):
            events.append(("start", iteration, tuple(images.shape), tuple(labels.shape)))

        @hookimpl
        def astkit_on_iteration_end(self, metrics):
            events.append(("end", metrics.iteration))

        @hookimpl
        def astkit_on_distill_end(self, distilled, run):
            events.append(("done", distilled.iteration, run.folder.distilled.is_file()))

    engine = Engine(tiny_config(tmp_path), dataset=digits, plugins=[Recorder()])
    engine.distill(experts)
    shape, n = (20, 1, 8, 8), (20,)
    assert events == [("start", 0, shape, n), ("end", 0), ("start", 1, shape, n), ("end", 1),
                      ("start", 2, shape, n), ("end", 2), ("done", 3, True)]
    pm = manager(Recorder())
    events.clear()
    pm.hook.astkit_on_iteration_start(iteration=7, images=torch.zeros(shape), labels=torch.zeros(n),
                                      run=engine.run_context, config=engine.config)
    pm.hook.astkit_on_distill_end(distilled=DistilledSet.load(engine.folder.distilled), run=engine.run_context,
                                  config=engine.config)
    assert events == [("start", 7, shape, n), ("done", 3, True)]


# -------------------------------------------------------------- expert step
def test_the_expert_step_gets_a_closure_over_the_whole_expert_loss(tmp_path, digits):
    steps = []

    class Twice:
        """Evaluates the loss twice per step (as a sharpness-aware step does), steps on the second."""

        astkit_plugin_name = "twice"

        @hookimpl
        def astkit_expert_step(self, model, closure, optimizer, epoch):
            first = closure()
            optimizer.zero_grad(set_to_none=True)
            second = closure()
            torch.testing.assert_close(first, second)  # same batch, same weights
            second.backward()
            optimizer.step()
            steps.append(epoch)
            return second.detach()

    plain = Engine(tiny_config(tmp_path / "a", "experts.num_experts=1"), dataset=digits).train_experts()
    twice = Engine(tiny_config(tmp_path / "b", "experts.num_experts=1"), dataset=digits,
                   plugins=[Twice()]).train_experts()
    assert torch.equal(plain[0].snapshots, twice[0].snapshots)  # the same SGD, through the hook
    assert len(steps) == 4 * -(-len(digits.train_labels) // 128)

    pm = manager()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    expected = [p.detach() - 0.1 * g for p, g in zip(model.parameters(), torch.autograd.grad(
        F.cross_entropy(model(x), y), list(model.parameters())))]
    pm.hook.astkit_expert_step(model=model, closure=lambda: F.cross_entropy(model(x), y), optimizer=optimizer,
                               epoch=0, num_epochs=1, config=RunConfig())
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_init_state_and_update_and_output_hooks_through_the_manager():
    pm = manager(Ema())
    state, images, labels = {}, torch.ones(2, 1, 2, 2), torch.tensor([0, 1])
    pm.hook.astkit_init_state(images=images, labels=labels, lr=0.01, state=state, config=RunConfig())
    pm.hook.astkit_update_synthetic(images=3 * images, labels=labels, lr=0.01, iteration=0, state=state,
                                    config=RunConfig())
    out, _ = pm.hook.astkit_synthetic_output(images=images, labels=labels, lr=0.01, state=state, config=RunConfig())
    torch.testing.assert_close(out, 2 * images)  # 0.5 * 1 + 0.5 * 3
    plain = manager()
    out, kept = plain.hook.astkit_synthetic_output(images=images, labels=labels, lr=0.01, state={},
                                                   config=RunConfig())
    assert out is images and kept is labels


def test_check_config_refuses_before_any_work(tmp_path, digits):
    class Picky:
        astkit_plugin_name = "picky"

        @hookimpl
        def astkit_check_config(self, config):
            if config.distill.ipc > 1:
                raise UserError("picky: distill.ipc must be 1")

    pm = manager(Picky())
    with pytest.raises(UserError, match="picky"):
        pm.hook.astkit_check_config(config=RunConfig())
    config = tiny_config(tmp_path)
    with pytest.raises(UserError, match="picky: distill.ipc must be 1"):
        Engine(config, dataset=digits, plugins=[Picky()])
    assert not (tmp_path / "run").exists()
    Engine(tiny_config(tmp_path, "distill.ipc=1"), dataset=digits, plugins=[Picky()])  # accepted


def test_images_per_class_of_soft_labels_do_not_follow_their_argmax():
    """Learned soft labels may all point at one class; the set still holds its run's ipc per class."""
    labels = torch.zeros(6, 3)
    labels[:, 0] = 5.0  # every argmax is class 0
    images = torch.zeros(6, 1, 4, 4)
    assert DistilledSet(images, labels, 0.01, 0, {"config": {"distill": {"ipc": 2}}}).ipc == 2
    assert DistilledSet(images, labels, 0.01, 0, {}).ipc == 2  # 6 images / 3 classes
    assert DistilledSet(images[:5], labels[:5], 0.01, 0, {}).ipc == 2  # rounded up
    hard = torch.tensor([0, 0, 0, 1, 2, 2])
    assert DistilledSet(images, hard, 0.01, 0, {"config": {"distill": {"ipc": 2}}}).ipc == 3  # the largest class


def test_auto_recomputation_follows_the_memory_budget(tmp_path, digits, experts):
    """``recompute_segment = auto`` measures one student step's graph on the first iteration: the tiny
    protocol fits any sensible budget (the whole graph); a budget below one step recomputes every step."""
    roomy = Engine(tiny_config(tmp_path / "a"), dataset=digits).make_distiller(experts)
    roomy.step()
    assert roomy.segment == 0 and roomy.segment_probe["step_bytes"] > 0
    assert roomy.segment_probe["budget_bytes"] > 2**27  # an eighth of this machine's memory
    tight = Engine(tiny_config(tmp_path / "b", "distill.memory_budget_gib=1e-9"), dataset=digits).make_distiller(experts)
    tight.step()
    assert tight.segment == 1 and tight.segment_probe["budget_bytes"] == 1
    # the same meta-gradient either way (the probe draws nothing from the run's generator)
    torch.testing.assert_close(tight.images, roomy.images, rtol=1e-4, atol=1e-6)
