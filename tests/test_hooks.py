"""The hook contract: every spec documented, every hook called through pluggy."""

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astkit import ExpertBatch, MatchPoint, hookimpl, hookspecs
from astkit.config import RunConfig
from astkit.plugins import PluginSet, collect_registrations, declared_options

from conftest import tiny_config

SPECS = sorted(n for n in dir(hookspecs) if n.startswith("astkit_") and callable(getattr(hookspecs, n)))
TESTS = Path(__file__).parent


def test_there_are_hooks_for_every_extension_point():
    for name in ("astkit_expert_loss", "astkit_init_synthetic", "astkit_inner_loss_weight",
                 "astkit_matching_schedule", "astkit_perturb_expert", "astkit_on_distill_start",
                 "astkit_on_iteration_end", "astkit_on_evaluation_done", "astkit_on_checkpoint_written"):
        assert name in SPECS


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_is_documented(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert doc, f"{name} has no docstring"
    assert "Called" in doc, f"{name}: say when it is called"
    assert "Combination:" in doc, f"{name}: say how answers combine"
    for param in inspect.signature(spec).parameters:
        assert f":param {param}:" in doc, f"{name}: document parameter {param}"
    returns = inspect.signature(spec).return_annotation
    if returns not in ("None", None):
        assert ":return:" in doc, f"{name}: document the return value"


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_is_called_through_the_plugin_manager_in_a_test(name):
    pattern = re.compile(rf"\.hook\.{name}\(")
    sources = [p.read_text() for p in TESTS.glob("test_*.py")]
    assert any(pattern.search(s) for s in sources), f"no test calls pm.hook.{name}(...)"


# ---------------------------------------------------------------- behaviour
def manager(*plugins):
    found = PluginSet.discover()
    names = [found.add(p) for p in plugins]
    return found.manager(names), found


def batch_of(digits, n=16):
    torch.manual_seed(0)
    from astkit.models import build_model

    model = build_model("convnet", channels=1, num_classes=10, image_size=8, width=4)
    x = digits.train_images[:n]
    return ExpertBatch(model, x.clone(), digits.train_labels[:n], x)


def test_expert_loss_default_is_cross_entropy_and_wrappers_chain(digits):
    class Double:
        astkit_plugin_name = "double"

        @hookimpl(wrapper=True)
        def astkit_expert_loss(self, batch):
            batch.require_input_grad()
            loss = yield
            return loss * 2

    config = RunConfig()
    pm, _ = manager()
    batch = batch_of(digits)
    loss = pm.hook.astkit_expert_loss(batch=batch, epoch=0, num_epochs=1, config=config)
    torch.testing.assert_close(loss, F.cross_entropy(batch.model(batch.images), batch.labels))
    pm, _ = manager(Double())
    batch = batch_of(digits)
    doubled = pm.hook.astkit_expert_loss(batch=batch, epoch=0, num_epochs=1, config=config)
    torch.testing.assert_close(doubled, 2 * loss)
    assert batch.images.requires_grad


def test_init_synthetic_default_picks_distinct_real_images_per_class(digits):
    pm, _ = manager()
    g = torch.Generator().manual_seed(0)
    images, labels = pm.hook.astkit_init_synthetic(dataset=digits, ipc=3, experts=[], generator=g,
                                                  config=RunConfig())
    assert images.shape == (30, 1, 8, 8) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    for image, label in zip(images, labels):
        matches = (digits.train_images == image).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1 and int(digits.train_labels[matches[0]]) == int(label)


def test_inner_loss_weight_default_and_override():
    class Half:
        @hookimpl
        def astkit_inner_loss_weight(self, start_epoch):
            return 0.5 if start_epoch < 3 else None

    pm, _ = manager()
    kwargs = dict(start_epoch=1, max_start_epoch=10, expert_index=0, iteration=0, config=RunConfig())
    assert pm.hook.astkit_inner_loss_weight(**kwargs) == 1.0
    pm, _ = manager(Half())
    assert pm.hook.astkit_inner_loss_weight(**kwargs) == 0.5
    assert pm.hook.astkit_inner_loss_weight(**{**kwargs, "start_epoch": 5}) == 1.0  # None falls through


def test_matching_schedule_default_is_mtt_final_term():
    pm, _ = manager()
    points = pm.hook.astkit_matching_schedule(syn_steps=20, expert_epochs=2, start_epoch=0, expert_index=0, iteration=0, config=RunConfig())
    assert points == [MatchPoint(20, 2, 1.0)]


def test_perturb_expert_default_is_identity():
    pm, _ = manager()
    params = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    out = pm.hook.astkit_perturb_expert(params=params, generator=torch.Generator(), start_epoch=0, expert_index=0, iteration=0,
                                        config=RunConfig())
    assert out is params


def test_plugin_options_are_namespaced_and_merged():
    pm = PluginSet.discover().catalog()
    answers = pm.hook.astkit_plugin_options()
    merged = declared_options(pm)
    assert len(merged) == sum(len(a) for a in answers if a)
    assert merged["weight-perturbation"] == {"variant": "paper", "rho": None}


def test_register_models_datasets_presets_and_commands():
    calls = []

    class Registrar:
        astkit_plugin_name = "registrar"

        @hookimpl
        def astkit_register_models(self, register):
            register("tiny-mlp", lambda channels, num_classes, image_size: torch.nn.Linear(1, 1))

        @hookimpl
        def astkit_register_datasets(self, register):
            register("my-data", lambda root, download: None)

        @hookimpl
        def astkit_register_presets(self, register):
            register("my-preset", ["registrar"], "just me")

        @hookimpl
        def astkit_register_commands(self, app):
            calls.append(app)

    found = PluginSet.discover()
    found.add(Registrar())
    catalog = found.catalog()
    models = collect_registrations(catalog, "model", {"convnet": None})
    assert set(models) == {"convnet", "tiny-mlp"}
    assert "my-data" in collect_registrations(catalog, "dataset", {})
    assert found.presets()["my-preset"].plugins == ["registrar"]
    presets = []
    catalog.hook.astkit_register_presets(register=lambda *a, **config_and_options: presets.append(a))
    assert ("my-preset", ["registrar"], "just me") in presets
    catalog.hook.astkit_register_commands(app="the-app")
    assert calls == ["the-app"]
    seen = []
    catalog.hook.astkit_register_models(register=lambda name, factory: seen.append(name))
    catalog.hook.astkit_register_datasets(register=lambda name, loader: seen.append(name))
    assert {"tiny-mlp", "my-data"} <= set(seen)


class Recorder:
    """A plugin recording every lifecycle event of a run."""

    astkit_plugin_name = "recorder"

    def __init__(self):
        self.events = []

    @hookimpl
    def astkit_on_expert_trained(self, index, trajectory):
        self.events.append(("expert", index, trajectory.num_epochs))

    @hookimpl
    def astkit_on_iteration_end(self, metrics, images):
        self.events.append(("iteration", metrics.iteration, tuple(images.shape)))

    @hookimpl
    def astkit_on_evaluation_done(self, result, iteration):
        self.events.append(("evaluation", iteration, sorted(result.architectures)))

    @hookimpl
    def astkit_on_checkpoint_written(self, path, iteration):
        self.events.append(("checkpoint", Path(path).name, iteration))


def test_lifecycle_events_reach_enabled_plugins(tmp_path, digits):
    from astkit import Engine

    recorder = Recorder()
    engine = Engine(tiny_config(tmp_path, "distill.eval_every=2", "evaluate.epochs=2"), plugins=[recorder],
                    dataset=digits)
    result = engine.run()
    kinds = [e[0] for e in recorder.events]
    assert kinds.count("expert") == 2 and kinds.count("iteration") == 3
    assert ("evaluation", 2, ["convnet"]) in recorder.events and ("evaluation", None, ["convnet"]) in recorder.events
    assert ("checkpoint", "checkpoint.safetensors", 2) in recorder.events
    assert ("checkpoint", "distilled.safetensors", 3) in recorder.events
    # events are also callable directly through the manager
    run = engine.run_context
    engine.pm.hook.astkit_on_checkpoint_written(path="x.safetensors", iteration=9, run=run, config=engine.config)
    assert recorder.events[-1] == ("checkpoint", "x.safetensors", 9)
    engine.pm.hook.astkit_on_expert_trained(index=5, trajectory=engine.load_experts()[0], run=run,
                                            config=engine.config)
    assert recorder.events[-1] == ("expert", 5, 4)
    engine.pm.hook.astkit_on_iteration_end(metrics=result.history[-1], images=result.distilled.images, run=run,
                                           config=engine.config)
    assert recorder.events[-1] == ("iteration", 2, (20, 1, 8, 8))
    engine.pm.hook.astkit_on_evaluation_done(result=result.evaluation, iteration=7, run=run, config=engine.config)
    assert recorder.events[-1] == ("evaluation", 7, ["convnet"])


class StartWatcher:
    """Records what the init hook answered and what ``astkit_on_distill_start`` received;
    ``stop_after`` raises Ctrl-C once that many iterations are done."""

    astkit_plugin_name = "start-watcher"

    def __init__(self, stop_after=None):
        self.stop_after = stop_after
        self.init = None
        self.starts = []
        self.runs = []

    @hookimpl(wrapper=True)
    def astkit_init_synthetic(self):
        images, labels = answer = yield
        self.init = (images.clone(), labels.clone())
        return answer

    @hookimpl
    def astkit_on_distill_start(self, images, labels, iteration, run):
        self.starts.append((images.clone(), labels.clone(), iteration, run))

    @hookimpl
    def astkit_on_iteration_end(self, metrics, run):
        self.runs.append(run)
        if self.stop_after is not None and metrics.iteration + 1 == self.stop_after:
            raise KeyboardInterrupt


def test_distill_start_gives_the_initial_set_and_the_run_context_fresh_and_after_a_resume(tmp_path, digits):
    from astkit import Engine, RunFolder, store
    from astkit.report import Reporter
    from astkit.run_context import RunContext

    config = tiny_config(tmp_path, "distill.iterations=4")
    watcher = StartWatcher(stop_after=2)
    engine = Engine(config, plugins=[watcher], dataset=digits)
    experts = engine.train_experts()
    with pytest.raises(KeyboardInterrupt):
        engine.distill(experts)
    (images, labels, iteration, run), = watcher.starts  # once, before the first iteration
    assert iteration == 0
    assert torch.equal(images, watcher.init[0]) and torch.equal(labels, watcher.init[1])
    assert isinstance(run, RunContext) and run.folder == RunFolder.of(config)
    assert run.folder.root == tmp_path / "run" and run.folder.checkpoint.is_file()
    assert run.mean == tuple(digits.mean) and run.std == tuple(digits.std) and run.zca is None
    assert run.class_names == tuple(digits.class_names)
    assert all(r is run for r in watcher.runs)  # every event carries the same context

    # resume in a new engine: the init hook is not called, the checkpoint's images start at its iteration
    checkpoint, _ = store.load(run.folder.checkpoint, "checkpoint")
    resumed, reporter = StartWatcher(), Reporter(grid_every=1, quiet=True)
    engine = Engine(tiny_config(tmp_path, "distill.iterations=4"), plugins=[resumed, reporter], dataset=digits)
    engine.distill(experts, resume=True)
    (images, labels, iteration, run), = resumed.starts
    assert resumed.init is None and iteration == 2
    assert torch.equal(images, checkpoint["images"]) and torch.equal(labels, watcher.init[1])
    assert not torch.equal(images, watcher.init[0])  # two iterations changed them
    assert run.folder == RunFolder.of(engine.config)
    # the reporter, a plain event plugin, draws the starting set and every later iteration in the run folder
    assert [p.name for p in reporter.grids] == ["iter_000002.png", "iter_000003.png", "iter_000004.png"]
    assert all(p.parent == run.folder.grids and p.read_bytes()[:4] == b"\x89PNG" for p in reporter.grids)
    # the event is also callable directly through the manager
    engine.pm.hook.astkit_on_distill_start(images=images, labels=labels, iteration=7, run=run, config=engine.config)
    assert resumed.starts[-1][2] == 7 and reporter.grids[-1].name == "iter_000007.png"


def test_the_summary_of_imported_experts_without_test_accuracy_says_so():
    """An imported buffer records no test accuracy (NaN): the summary and report.md show no NaN."""
    import io

    from rich.console import Console

    from astkit.report import Reporter

    out = io.StringIO()
    reporter = Reporter(quiet=True, console=Console(file=out, width=200))
    nan = float("nan")
    experts = [{"index": 0, "epochs": 2, "test_accuracy": [nan, nan], "avg_var": 1.5}]
    reporter.print_summary(experts, None, [], None, {})
    assert "test acc not recorded" in out.getvalue() and "nan" not in out.getvalue()
    from astkit.report import _fmt

    assert _fmt(nan) == _fmt(None) == "-" and _fmt(0.5) == "0.5000"  # report.md's expert table
