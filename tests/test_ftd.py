"""FTD (plugin ``ftd``): the GSAM/SAM expert step against a transcription of
GSAM's ``step`` (FTD's buffer/gsam/gsam.py) and by hand, composed with
smooth-experts; the EMA of the images by hand, saved in the distilled file
while the checkpoint keeps the optimised images; a planned stop resumed bit
for bit; bad options refused in one line with nothing written; an
end-to-end run whose experts take GSAM steps; the ``ftd-reference`` preset."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astkit import DistilledSet, Engine, ExpertBatch, RunConfig, UserError, hookimpl
from astkit.checkpoint import Checkpoint
from astkit.plugins import PluginSet, declared_options
from astkit_plugins import smooth_experts

from conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def found() -> PluginSet:
    return PluginSet.discover()


def manager(found, *overrides: str, plugins=("ftd",)):
    """The plugin manager of ``plugins`` and a config with their options resolved."""
    config = RunConfig.load(overrides=list(overrides))
    config.resolve_options(declared_options(found.catalog()))
    return found.manager(found.resolve(list(plugins))), config


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------- the reference update
def gsam_reference(w, loss_of, rho, alpha, adaptive, lr, weight_decay=0.0):
    """FTD's GSAM.step (gsam.py: perturb_weights, gradient_decompose, unperturb)
    with an SGD base optimiser (no momentum on a first step), transcribed on
    plain tensors. ``loss_of(params)`` is the batch's loss at ``params``.
    Returns the loss at ``w`` and the new parameters."""
    perturb_eps = 1e-12

    def get_grad(params):
        params = [p.detach().clone().requires_grad_(True) for p in params]
        loss = loss_of(params)
        return loss.detach(), list(torch.autograd.grad(loss, params))

    loss_value, old_g = get_grad(w)
    # perturb_weights: grad_norm = ||(|p| if adaptive else 1) * p.grad|| over all parameters
    grad_norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * g).norm(p=2)
                                        for p, g in zip(w, old_g)]), p=2)
    scale = rho / (grad_norm + perturb_eps)
    e_w = []
    for p, g in zip(w, old_g):
        e = g * scale
        if adaptive:
            e = e * torch.pow(p, 2)
        e_w.append(e)
    _, new_g = get_grad([p + e for p, e in zip(w, e_w)])
    # gradient_decompose
    inner_prod = sum(torch.sum(a * b) for a, b in zip(old_g, new_g))
    new_grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in new_g]), p=2)
    old_grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in old_g]), p=2)
    cosine = inner_prod / (new_grad_norm * old_grad_norm + perturb_eps)
    direction = []
    for a, b in zip(old_g, new_g):
        vertical = a - cosine * old_grad_norm * b / (new_grad_norm + perturb_eps)
        direction.append(b - alpha * vertical)
    # unperturb, then the base optimiser's step
    return loss_value, [p - lr * (d + weight_decay * p) for p, d in zip(w, direction)]


def tiny_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def forward(params, x):
    """``tiny_model``'s forward pass on plain tensors."""
    h = torch.tanh(x.flatten(1) @ params[0].T + params[1])
    return h @ params[2].T + params[3]


X = torch.randn(8, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


@pytest.mark.parametrize("sharpness", ["gsam", "sam"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_the_step_equals_a_transcription_of_gsams_step(found, sharpness, adaptive):
    rho = 0.5 if adaptive else 0.05  # large enough that the perturbation changes the gradient visibly
    pm, config = manager(found, f"ftd.sharpness={sharpness}", f"ftd.rho={rho}", "ftd.alpha=0.4",
                         f"ftd.adaptive={str(adaptive).lower()}")
    model = tiny_model()
    w = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    calls = []

    def closure():
        calls.append([p.detach().clone() for p in model.parameters()])
        return F.cross_entropy(model(X), Y)

    loss = pm.hook.astkit_expert_step(model=model, closure=closure, optimizer=optimizer, epoch=0, num_epochs=1,
                                      config=config)
    alpha = 0.4 if sharpness == "gsam" else 0.0  # SAM is GSAM without the orthogonal part
    expected_loss, expected = gsam_reference(w, lambda p: F.cross_entropy(forward(p, X), Y), rho, alpha,
                                             adaptive, lr=0.1, weight_decay=0.05)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(calls[0], w))  # at w, then at w + e
    assert not any(torch.allclose(a, b) for a, b in zip(calls[1], w))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    # the optimiser keeps its own state: momentum continues from the direction (+ weight decay)
    assert all("momentum_buffer" in optimizer.state[p] for p in model.parameters())


def test_gsam_differs_from_sam_and_plain_sgd(found):
    results = {}
    for name, overrides in {"gsam": ["ftd.rho=0.5"], "sam": ["ftd.rho=0.5", "ftd.sharpness=sam"],
                            "none": ["ftd.sharpness=none"]}.items():
        pm, config = manager(found, *overrides)
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        pm.hook.astkit_expert_step(model=model, closure=lambda: F.cross_entropy(model(X), Y), optimizer=optimizer,
                                   epoch=0, num_epochs=1, config=config)
        results[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(X), Y).backward()
    optimizer.step()  # plain SGD on the same batch
    sgd = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(results["none"], sgd, rtol=0, atol=0)  # "none": the baseline steps
    assert not torch.allclose(results["gsam"], results["sam"]) and not torch.allclose(results["sam"], sgd)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_on_a_quadratic_by_hand(found, adaptive):
    """L(w) = sum(a w^2) / 2, so g = a w; rho 0.1, alpha 0.4, SGD lr 1."""
    pm, config = manager(found, "ftd.rho=0.1", "ftd.alpha=0.4", f"ftd.adaptive={str(adaptive).lower()}")
    w0, a = [1.0, -2.0], [1.0, 3.0]
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    coef = torch.tensor(a, dtype=torch.float64)
    optimizer = torch.optim.SGD([w], lr=1.0)
    model = nn.Module()
    model.w = w
    loss = pm.hook.astkit_expert_step(model=model, closure=lambda: 0.5 * (coef * w * w).sum(), optimizer=optimizer,
                                      epoch=0, num_epochs=1, config=config)
    g = [ai * wi for ai, wi in zip(a, w0)]                               # [1, -6]
    t = [abs(wi) if adaptive else 1.0 for wi in w0]
    norm = math.sqrt(sum((ti * gi) ** 2 for ti, gi in zip(t, g)))
    e = [0.1 * ti * ti * gi / (norm + 1e-12) for ti, gi in zip(t, g)]
    gp = [ai * (wi + ei) for ai, wi, ei in zip(a, w0, e)]
    ng, ngp = math.hypot(*g), math.hypot(*gp)
    cos = sum(x * y for x, y in zip(g, gp)) / (ng * ngp + 1e-12)
    perp = [gi - cos * ng * gpi / (ngp + 1e-12) for gi, gpi in zip(g, gp)]
    new = [wi - (gpi - 0.4 * pi) for wi, gpi, pi in zip(w0, gp, perp)]
    assert float(loss) == pytest.approx(0.5 * (1 * 1 + 3 * 4))
    assert w.detach().tolist() == pytest.approx(new, rel=1e-12)
    assert w.detach().tolist() != pytest.approx([wi - gi for wi, gi in zip(w0, g)], rel=1e-6)  # not plain SGD


def test_the_second_pass_leaves_batchnorm_statistics_as_after_the_first(found):
    pm, config = manager(found, "ftd.rho=0.5")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    plain = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain(X)  # one forward pass at w, in training mode
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pm.hook.astkit_expert_step(model=model, closure=lambda: F.cross_entropy(model(X), Y), optimizer=optimizer,
                               epoch=0, num_epochs=1, config=config)
    bn, expected = model[2], plain[2]
    assert torch.equal(bn.running_mean, expected.running_mean) and torch.equal(bn.running_var, expected.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_the_step_composes_with_smooth_experts(found):
    """Both gradients are of smooth-experts' loss (clipping and gradient penalty) through the closure."""
    pm, config = manager(found, "ftd.rho=0.5", plugins=("smooth-experts", "ftd"))
    model = tiny_model()
    w = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():  # as astkit/experts.py builds it: every enabled astkit_expert_loss plugin
        return pm.hook.astkit_expert_loss(batch=ExpertBatch(model, X, Y, X), epoch=1, num_epochs=4, config=config)

    def smooth_loss(params):  # smooth-experts' paper variant by hand: lambda_1 = 0.5 + 0.5/5, mu = 1, K = 1
        x = X.detach().clone().requires_grad_(True)
        logits = forward(params, x)
        (gx,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        penalty = ((gx.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
        return 0.6 * F.cross_entropy(logits, Y) + 1.0 * penalty

    assert smooth_experts.clip_weight(1, 5, 0.5) == 0.6
    loss = pm.hook.astkit_expert_step(model=model, closure=closure, optimizer=optimizer, epoch=1, num_epochs=4,
                                      config=config)
    expected_loss, expected = gsam_reference(w, smooth_loss, 0.5, 0.4, True, lr=0.1)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    assert float(loss) > 0.6 * float(F.cross_entropy(forward(w, X), Y)) + 1e-3  # the penalty is in it
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------- the EMA
def test_the_ema_hooks_through_the_manager(found):
    pm, config = manager(found)
    state, images, labels = {}, torch.ones(2, 1, 2, 2), torch.tensor([0, 1])
    pm.hook.astkit_init_state(images=images, labels=labels, lr=0.01, state=state, config=config)
    assert torch.equal(state["ftd"]["ema"], images) and state["ftd"]["ema"] is not images
    for it, value in enumerate((3.0, 5.0)):
        pm.hook.astkit_update_synthetic(images=value * images, labels=labels, lr=0.01, iteration=it, state=state,
                                        config=config)
    out, kept = pm.hook.astkit_synthetic_output(images=7 * images, labels=labels, lr=0.01, state=state, config=config)
    expected = 0.999 * (0.999 * 1 + 0.001 * 3) + 0.001 * 5
    torch.testing.assert_close(out, torch.full_like(images, expected))
    assert kept is labels
    off, config = manager(found, "ftd.ema_decay=0")
    state = {}
    off.hook.astkit_init_state(images=images, labels=labels, lr=0.01, state=state, config=config)
    off.hook.astkit_update_synthetic(images=3 * images, labels=labels, lr=0.01, iteration=0, state=state,
                                     config=config)
    assert state == {}
    out, kept = off.hook.astkit_synthetic_output(images=images, labels=labels, lr=0.01, state=state, config=config)
    assert out is images and kept is labels  # the baseline answers: the optimised set
    on, config = manager(found)
    with pytest.raises(UserError) as exc:  # resumed with the EMA on, from a run without it
        on.hook.astkit_synthetic_output(images=images, labels=labels, lr=0.01, state={}, config=config)
    assert "holds no EMA" in one_line(exc)


class CountLoss:
    """Counts the expert-loss evaluations (the closure's calls)."""

    astkit_plugin_name = "count-loss"

    def __init__(self):
        self.calls = 0
        self.seeds = []

    @hookimpl(wrapper=True)
    def astkit_expert_loss(self, batch):
        self.calls += 1
        self.seeds.append(batch.seed)
        return (yield)


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """End to end on digits with ``plugins=ftd`` (experts with GSAM); ema_decay 0.9 so it moves in 3 iterations."""
    counter = CountLoss()
    tmp = tmp_path_factory.mktemp("ftd")
    engine = Engine(tiny_config(tmp, "plugins=ftd", "ftd.ema_decay=0.9", "experts.num_experts=1"),
                    dataset=digits, plugins=[counter])
    return engine, engine.run(), counter


def test_an_end_to_end_run_trains_gsam_experts_and_saves_the_ema(run, digits, tmp_path):
    engine, result, counter = run
    assert sorted(engine.enabled) == ["count-loss", "ftd"]
    batches = 4 * -(-len(digits.train_labels) // 128)
    assert counter.calls == 2 * batches  # two loss evaluations per batch: at w and at w + e
    # both passes of a step see the same batch seed (a plugin's subsample is the same); batches differ
    assert counter.seeds[0::2] == counter.seeds[1::2] and len(set(counter.seeds)) == batches
    assert result.evaluation.to_json() and len(result.history) == 3
    plain = Engine(tiny_config(tmp_path / "plain", "experts.num_experts=1"), dataset=digits).train_experts()
    assert not torch.equal(plain[0].snapshots[1:], result.experts[0].snapshots[1:])  # not the baseline's SGD
    assert torch.equal(plain[0].snapshots[0], result.experts[0].snapshots[0])  # from the same initialisation
    # the distilled file holds the EMA, the checkpoint the optimised images (and the EMA in its plugin state)
    saved, ckpt = DistilledSet.load(engine.folder.distilled), Checkpoint.load(engine.folder.checkpoint)
    assert torch.equal(saved.images, ckpt.plugin_state["ftd"]["ema"])
    assert torch.equal(saved.images, result.distilled.images)
    assert not torch.equal(saved.images, ckpt.images)
    assert torch.equal(saved.labels, ckpt.labels)


def test_the_ema_after_k_updates_is_the_recursion_from_the_initial_images(run, digits, tmp_path):
    engine, result, _ = run
    engine = Engine(tiny_config(tmp_path, "plugins=ftd", "ftd.ema_decay=0.9", "distill.checkpoint_every=0"),
                    dataset=digits)
    distiller = engine.make_distiller(result.experts)
    expected = distiller.images.detach().clone()
    assert torch.equal(distiller.state["ftd"]["ema"], expected)  # starts as the initial images
    for _ in range(3):
        distiller.step()
        expected = 0.9 * expected + (1 - 0.9) * distiller.images.detach()
    assert torch.equal(distiller.state["ftd"]["ema"], expected)
    distilled = distiller.distilled({})
    assert torch.equal(distilled.images, expected) and not torch.equal(expected, distiller.images.detach())
    assert torch.equal(distiller.checkpoint({}).images, distiller.images.detach())


def test_a_planned_stop_resumes_the_ema_bit_for_bit(run, digits, tmp_path):
    _, result, _ = run
    options = ["plugins=ftd", "ftd.ema_decay=0.9"]
    full = Engine(tiny_config(tmp_path / "full", *options, "distill.iterations=5"), dataset=digits)
    whole = full.distill(result.experts)
    Engine(tiny_config(tmp_path / "cut", *options, "distill.iterations=2"), dataset=digits).distill(result.experts)
    resumed_engine = Engine(tiny_config(tmp_path / "cut", *options, "distill.iterations=5"), dataset=digits)
    resumed = resumed_engine.distill(result.experts, resume=True)
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.labels, whole.labels)
    a, b = DistilledSet.load(full.folder.distilled), DistilledSet.load(resumed_engine.folder.distilled)
    assert torch.equal(a.images, b.images) and a.lr == b.lr
    ca, cb = Checkpoint.load(full.folder.checkpoint), Checkpoint.load(resumed_engine.folder.checkpoint)
    assert torch.equal(ca.plugin_state["ftd"]["ema"], cb.plugin_state["ftd"]["ema"])
    assert torch.equal(ca.images, cb.images)
    # the EMA never feeds back: without it the same run saves the optimised images
    off = Engine(tiny_config(tmp_path / "off", "plugins=ftd", "ftd.ema_decay=0", "distill.iterations=5"),
                 dataset=digits)
    raw = off.distill(result.experts)
    assert torch.equal(raw.images, ca.images) and "ftd" not in Checkpoint.load(off.folder.checkpoint).plugin_state


# ----------------------------------------------------------- bad options
BAD = [
    ("ftd.sharpness=foo", "ftd.sharpness must be 'gsam', 'sam' or 'none', got 'foo'"),
    ("ftd.rho=-0.1", "ftd.rho must be >= 0"),
    ("ftd.ema_decay=1", "ftd.ema_decay must be in [0, 1)"),
    ("ftd.ema_decay=-0.5", "ftd.ema_decay must be in [0, 1)"),
    ("ftd.alpha=-1", "ftd.alpha must be >= 0"),
]


@pytest.mark.parametrize("option, words", BAD)
def test_bad_options_are_refused_in_one_line_before_anything_is_written(tmp_path, digits, option, words):
    with pytest.raises(UserError) as exc:
        Engine(tiny_config(tmp_path, "plugins=ftd", option), dataset=digits)
    assert words in one_line(exc)
    assert not (tmp_path / "run").exists()


def test_a_bad_option_on_the_command_line_is_one_error_line_and_writes_nothing(tmp_path):
    sets = [x for item in [*TINY, "ftd.sharpness=foo"] for x in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "astkit", "run", "-p", "ftd", "--out", str(tmp_path / "out"),
                             *sets], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ftd.sharpness must be" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- preset
def test_the_preset_sets_ftds_buffer_script_and_defaults(found):
    preset = found.presets()["ftd-reference"]
    assert preset.plugins == ["ftd"]
    assert preset.settings() == {
        "experts.optimizer": "sgd", "experts.lr": 0.01, "experts.momentum": 0.0, "experts.weight_decay": 0.0,
        "experts.lr_decay": 1.0, "ftd.sharpness": "gsam", "ftd.rho": 0.01, "ftd.alpha": 0.4, "ftd.adaptive": True,
        "ftd.ema_decay": 0.999,
    }
    for key in ("distill.syn_steps", "distill.expert_epochs", "distill.max_start_epoch", "distill.batch_syn",
                "distill.lr_img", "distill.lr_lr", "distill.lr_teacher", "ftd.alpha", "ftd.ema_decay", "Table 7"):
        assert key in preset.description
    engine = Engine(RunConfig.load(overrides=["plugins=ftd-reference", "experts.momentum=0.5", "ftd.alpha=0.3"]),
                    plugin_set=found)
    assert engine.enabled == ["ftd"]
    e, options = engine.config.experts, engine.config.options["ftd"]
    assert (e.lr, e.momentum, e.weight_decay, e.lr_decay) == (0.01, 0.5, 0.0, 1.0)  # the user's value wins
    assert options == {"sharpness": "gsam", "rho": 0.01, "alpha": 0.3, "adaptive": True, "ema_decay": 0.999}


def test_a_subsampled_penalty_draws_from_the_batch_generator(found):
    """smooth-experts' penalty on a subsample: the same batch seed gives the same loss (both passes of a
    sharpness-aware step), another seed another subsample."""
    pm, config = manager(found, "smooth-experts.penalty_fraction=0.5", plugins=("smooth-experts",))
    model = tiny_model()

    def loss(seed):
        return pm.hook.astkit_expert_loss(batch=ExpertBatch(model, X, Y, X, seed), epoch=1, num_epochs=4,
                                          config=config)

    assert torch.equal(loss(3), loss(3))
    assert not torch.equal(loss(3), loss(4))
