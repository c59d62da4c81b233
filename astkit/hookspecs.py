"""The hook contract between the astkit engine and its plugins.

Every extension point of astkit is one function below. A plugin is a module
(or object) with functions of the same names decorated with
``@astkit.hookimpl``; it may accept any subset of the arguments. ``None``
means "no answer" everywhere.

Two kinds of hooks:

* behaviour hooks (``astkit_check_config``, ``astkit_expert_loss``, ``astkit_expert_step``,
  ``astkit_init_synthetic``, ``astkit_student_loss``, ``astkit_draw_expert``,
  ``astkit_draw_start_epoch``, ``astkit_inner_loss_weight``,
  ``astkit_matching_schedule``, ``astkit_matching_distance``,
  ``astkit_perturb_expert``, ``astkit_init_state``, ``astkit_update_synthetic``,
  ``astkit_synthetic_output``) change the method. They are called only on the
  plugins enabled for a run. astkit's MTT baseline answers each of them from
  ``astkit._defaults`` as a ``trylast`` implementation, so an enabled plugin
  that answers replaces the baseline. For the first-result hooks, two enabled
  plugins that both answer are refused at start-up, naming both.
* registration and event hooks (``astkit_register_*``, ``astkit_plugin_options``
  and the ``astkit_on_*`` lifecycle events). Registration hooks are called on
  every installed plugin, so ``astkit models`` lists a plugin's models even
  when the plugin is not enabled; lifecycle events go to enabled plugins.

Under ``torchrun`` every rank loads the same plugins. Behaviour hooks of
distillation are called on every rank with the same arguments and must give
the same answer there (draw randomness only from the ``generator`` passed);
``astkit_init_synthetic``'s answer on rank 0 is the one used. Each event
hook's docstring says on which rank it fires.

Distillation's behaviour hooks receive ``state``: the run's plugin state, one
dict shared by the enabled plugins in which each keeps its entries under its
own name (``state.setdefault("my-plugin", {})``). Values are tensors or JSON
values (numbers, strings, lists, dicts of them); the whole dict is written into
every checkpoint and restored on resume, and an iteration cut short by Ctrl-C
or an error leaves it as it was, so a plugin's schedule (a window, an EMA)
continues exactly where it stopped.

Every lifecycle event carries the run's context, ``run`` (an
:class:`astkit.RunContext`): the run folder that names every file
(``run.folder``), the dataset's normalisation and class names and the enabled
plugins, so an event plugin needs no reference to the engine.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from astkit.config import RunConfig
    from astkit.data import Dataset
    from astkit.experts import ExpertBatch
    from astkit.functional import ParamLayout
    from astkit.matching import MatchPoint
    from astkit.results import DistilledSet, EvaluationResult, IterationMetrics
    from astkit.run_context import RunContext
    from astkit.trajectory import Trajectory

hookspec = pluggy.HookspecMarker("astkit")


# --------------------------------------------------------------------------
# Behaviour hooks
# --------------------------------------------------------------------------


@hookspec
def astkit_check_config(config: RunConfig) -> None:
    """Refuse a configuration the plugin cannot run, before any work.

    Called once when an engine is built (every command that runs stages),
    after presets and plugin options are resolved, before data is loaded or
    anything is trained or written.

    :param config: the run's configuration (``config.plugin(NAME)`` gives
        the plugin's options, with defaults filled in).

    Combination: every enabled plugin is called; a plugin raises
    :class:`astkit.UserError` with a one-line message for a bad value, and
    return values are ignored.
    """


@hookspec(firstresult=True)
def astkit_expert_loss(
    batch: ExpertBatch, epoch: int, num_epochs: int, config: RunConfig
) -> torch.Tensor | None:
    """The loss an expert minimises on one training batch (stage 1).

    Called for every batch of every expert epoch, each time the expert step
    (``astkit_expert_step``) evaluates the loss: once per batch for SGD, twice
    for a sharpness-aware step.

    :param batch: the batch: ``batch.model``, ``batch.images`` (augmented),
        ``batch.clean_images`` (before augmentation), ``batch.labels`` and
        ``batch.logits()`` (the model's output on ``images``, computed once
        and cached, so several plugins share one forward pass). To take a
        gradient with respect to the inputs, call
        ``batch.require_input_grad()`` *before* ``batch.logits()``. Random
        draws of a plugin (e.g. a subsample) come from ``batch.generator()``,
        seeded per batch: the same in every call of one step's closure.
    :param epoch: the current epoch, counted from 0.
    :param num_epochs: the number of epochs each expert trains.
    :param config: the run's configuration.
    :return: a scalar loss tensor to backpropagate, or ``None``.

    Combination: first result. The baseline returns plain cross-entropy.
    Plugins that *modify* the loss rather than replace it implement this hook
    as a wrapper (``@hookimpl(wrapper=True)``): code before ``yield`` runs
    before the loss is computed, ``yield`` gives the inner loss, and the
    wrapper returns the new one. Wrappers chain, so clipping and a gradient
    penalty can be two plugins.
    """


@hookspec(firstresult=True)
def astkit_expert_step(
    model: torch.nn.Module,
    closure: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    num_epochs: int,
    config: RunConfig,
) -> torch.Tensor | None:
    """One optimiser step of an expert on one batch (stage 1).

    Called for every batch of every expert epoch.

    :param model: the expert network, in training mode.
    :param closure: computes the batch's loss at the model's current
        parameters through ``astkit_expert_loss`` (every enabled loss plugin,
        a fresh forward pass per call) and returns it, not yet
        backpropagated. Call it as often as the step needs (a sharpness-aware
        step calls it at ``w`` and at ``w + e``).
    :param optimizer: the expert's optimiser (``experts.optimizer``, its lr
        and decay schedule); the step must end with ``optimizer.step()``.
    :param epoch: the current epoch, counted from 0.
    :param num_epochs: the number of epochs each expert trains.
    :param config: the run's configuration.
    :return: the loss to log for the batch (a scalar tensor), or ``None``.

    Combination: first result. The baseline zeroes the gradients, calls
    ``closure()``, backpropagates and steps: plain SGD (or Adam).
    """


@hookspec(firstresult=True)
def astkit_init_synthetic(
    dataset: Dataset,
    ipc: int,
    experts: list[Trajectory],
    generator: torch.Generator,
    config: RunConfig,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The synthetic images (and labels) distillation starts from.

    Called once, before the first distillation iteration (not on resume).

    :param dataset: the real dataset (normalised tensors in memory).
    :param ipc: images per class to return.
    :param experts: the expert trajectories of the run (e.g. to embed images
        with a trained expert, ``experts[0].build_model(snapshot=-1)``).
    :param generator: the run's seeded CPU random generator; use it for all
        randomness so runs are reproducible.
    :param config: the run's configuration.
    :return: ``(images, labels)``: float images shaped
        ``(ipc * num_classes, C, H, W)`` in the dataset's normalised space,
        ordered class by class, and their labels: hard, int64 class indices
        ``(N,)``, or soft, float logits ``(N, num_classes)`` (the target of
        image ``i`` is ``softmax(labels[i] / distill.label_temperature)``);
        or ``None``.

    Combination: first result. The baseline picks ``ipc`` random real
    images of each class, with hard labels.
    """


@hookspec(firstresult=True)
def astkit_student_loss(logits: torch.Tensor, labels: torch.Tensor, config: RunConfig) -> torch.Tensor | None:
    """The loss a network minimises on synthetic data, per sample.

    Called at every step of the unrolled student (stage 2) and for every
    batch when evaluation networks train on a distilled set (stage 3), so a
    set is evaluated with the loss it was distilled with.

    :param logits: the network's output, ``(B, num_classes)``.
    :param labels: the batch's labels: int64 ``(B,)`` or soft float logits
        ``(B, num_classes)``; learnable soft labels carry the graph to the
        meta-gradient, so do not detach them.
    :param config: the run's configuration (``distill.label_temperature``).
    :return: the per-sample losses ``(B,)``, differentiable; the engine
        takes their mean (under torchrun, each rank sums its rows and the
        ranks' sums are added). Or ``None``.

    Combination: first result. The baseline answers cross-entropy for hard
    labels and, for soft labels with temperature ``T``, the soft
    cross-entropy ``T^2 * sum_c -softmax(y/T)_c log softmax(z/T)_c`` (its
    gradient in the network equals that of the KL divergence).
    """


@hookspec(firstresult=True)
def astkit_draw_expert(
    num_experts: int, iteration: int, generator: torch.Generator, state: dict[str, Any], config: RunConfig
) -> int | None:
    """Which expert trajectory the student follows in one iteration.

    Called once per distillation iteration, first of its draws (on every
    rank, with the same arguments).

    :param num_experts: the number of expert trajectories.
    :param iteration: the distillation iteration, counted from 0.
    :param generator: the run's seeded CPU random generator (its state is
        saved in checkpoints).
    :param state: the run's plugin state (see the module docstring).
    :param config: the run's configuration.
    :return: an expert index in ``[0, num_experts)``, or ``None``.

    Combination: first result. The baseline is MTT's: the experts in a
    freshly shuffled order, one per iteration, reshuffled when all were
    used (the order is kept in ``state["astkit.defaults"]``).
    """


@hookspec(firstresult=True)
def astkit_draw_start_epoch(
    expert_index: int,
    max_start_epoch: int,
    num_epochs: int,
    iteration: int,
    generator: torch.Generator,
    state: dict[str, Any],
    config: RunConfig,
) -> int | None:
    """The expert epoch the student starts from in one iteration.

    Called once per distillation iteration, after ``astkit_draw_expert``
    (on every rank, with the same arguments).

    :param expert_index: the expert drawn for this iteration.
    :param max_start_epoch: ``distill.max_start_epoch``.
    :param num_epochs: the snapshots of the expert: epochs ``0..num_epochs``
        exist; a start ``s`` needs ``s + distill.expert_epochs <= num_epochs``.
    :param iteration: the distillation iteration, counted from 0.
    :param generator: the run's seeded CPU random generator.
    :param state: the run's plugin state.
    :param config: the run's configuration.
    :return: the start epoch ``s``, or ``None``.

    Combination: first result. The baseline draws ``s`` uniformly from
    ``[0, max_start_epoch)``.
    """


@hookspec(firstresult=True)
def astkit_inner_loss_weight(
    start_epoch: int, max_start_epoch: int, expert_index: int, iteration: int, config: RunConfig
) -> float | None:
    """The weight of the student's inner loss for one iteration.

    Called once per distillation iteration, after the start epoch is drawn;
    the weight multiplies the inner loss of every one of the ``syn_steps``
    student steps.

    :param start_epoch: the expert epoch the student starts from.
    :param max_start_epoch: ``distill.max_start_epoch``.
    :param expert_index: the expert drawn for this iteration.
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: a positive float, or ``None``.

    Combination: first result. The baseline answers ``1.0``.
    """


@hookspec(firstresult=True)
def astkit_matching_schedule(
    syn_steps: int, expert_epochs: int, start_epoch: int, expert_index: int, iteration: int, config: RunConfig
) -> list[MatchPoint] | None:
    """Where along the unrolled student the matching loss is taken.

    Called once per distillation iteration, after the start is drawn.

    :param syn_steps: the number N of student steps unrolled.
    :param expert_epochs: the number M of expert epochs the student covers.
    :param start_epoch: the expert epoch the student starts from.
    :param expert_index: the expert drawn for this iteration.
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: a list of :class:`astkit.MatchPoint` ``(student_step,
        expert_offset, weight)``: after student step ``student_step``
        (1..N) the student is compared with the expert snapshot
        ``start + expert_offset`` (1..M) by ``astkit_matching_distance``,
        and the terms are summed with their weights. Or ``None``.

    Combination: first result. The baseline answers
    ``[MatchPoint(N, M, 1.0)]``: MTT's single final term.
    """


@hookspec(firstresult=True)
def astkit_matching_distance(
    student: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    layout: ParamLayout,
    point: MatchPoint,
    start_epoch: int,
    expert_index: int,
    iteration: int,
    state: dict[str, Any],
    config: RunConfig,
) -> torch.Tensor | None:
    """The distance between the student and the expert at one matching point.

    Called once per matching point of every distillation iteration (on
    every rank, with the same arguments).

    :param student: the student's flat parameter vector after
        ``point.student_step`` steps (differentiable: the meta-gradient flows
        through it).
    :param start: the flat parameters the student started from (after any
        perturbation; constant).
    :param target: the expert's flat parameters at ``start_epoch +
        point.expert_offset`` (constant).
    :param layout: names and shapes of the parameters in flat order
        (``layout.split(v)`` gives ``{name: view}``; ``layout.names``,
        ``layout.numels``), to weight or mask parameters by name.
    :param point: the matching point (its weight is applied by the engine).
    :param start_epoch: the expert epoch the student started from.
    :param expert_index: the expert followed.
    :param iteration: the distillation iteration, counted from 0.
    :param state: the run's plugin state.
    :param config: the run's configuration.
    :return: a scalar tensor, differentiable through ``student``, or ``None``.

    Combination: first result. The baseline is MTT's normalised squared
    distance ``||student - target||^2 / ||start - target||^2``.
    """


@hookspec(firstresult=True)
def astkit_perturb_expert(
    params: dict[str, torch.Tensor],
    generator: torch.Generator,
    start_epoch: int,
    expert_index: int,
    iteration: int,
    config: RunConfig,
) -> dict[str, torch.Tensor] | None:
    """Perturb the expert parameters the student starts from.

    Called once per distillation iteration, on the start snapshot
    ``theta_t`` before the student is unrolled. The matching denominators use
    the perturbed start; the targets are not perturbed.

    :param params: the start parameters by name, with their shapes (views
        of a flat vector: do not modify them in place).
    :param generator: the run's seeded CPU random generator.
    :param start_epoch: the expert epoch of ``params``.
    :param expert_index: the expert drawn for this iteration.
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: new parameters with the same names and shapes, or ``None``.

    Combination: first result. The baseline returns ``params`` unchanged.
    """


@hookspec
def astkit_init_state(
    images: torch.Tensor, labels: torch.Tensor, lr: float, state: dict[str, Any], config: RunConfig
) -> None:
    """Distillation starts from scratch: set up the plugin's per-run state.

    Called once per fresh distillation, after the initial set is made
    (``astkit_init_synthetic``) and before the first iteration, on every rank
    with the same set; not on resume, where ``state`` is restored from the
    checkpoint instead. E.g. an EMA's shadow starts here as a copy of the
    initial images.

    :param images: the initial images (copy what you keep).
    :param labels: their labels, hard or soft.
    :param lr: the initial student lr (``distill.lr_teacher``).
    :param state: the run's plugin state, empty at this point; add your
        entries under your plugin's name.
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_update_synthetic(
    images: torch.Tensor, labels: torch.Tensor, lr: float, iteration: int, state: dict[str, Any], config: RunConfig
) -> None:
    """The synthetic set was updated by its optimisers.

    Called after every applied update of distillation (not after one that
    was rolled back), on every rank, with Ctrl-C held back, so an update and
    what plugins do here happen whole or not at all. Keep derived sets here,
    e.g. an exponential moving average of the images in ``state``.

    :param images: the images after the update (do not modify).
    :param labels: the labels after the update (hard or soft; do not modify).
    :param lr: the student lr after the update.
    :param iteration: the iteration just finished, counted from 0.
    :param state: the run's plugin state.
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec(firstresult=True)
def astkit_synthetic_output(
    images: torch.Tensor, labels: torch.Tensor, lr: float, state: dict[str, Any], config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The synthetic set that is saved and evaluated.

    Called whenever distillation writes ``distilled.safetensors`` or
    evaluates (``distill.eval_every``, the end, a divergence); the
    checkpoint always keeps the optimised set itself.

    :param images: the optimised images (do not modify).
    :param labels: their labels.
    :param lr: the learned student lr.
    :param state: the run's plugin state (e.g. an EMA kept by
        ``astkit_update_synthetic``).
    :param config: the run's configuration.
    :return: ``(images, labels)`` of the same shapes, or ``None``.

    Combination: first result. The baseline answers the optimised set.
    """


# --------------------------------------------------------------------------
# Registration hooks (called on every installed plugin)
# --------------------------------------------------------------------------


@hookspec
def astkit_plugin_options() -> dict[str, dict[str, Any]] | None:
    """Declare configuration keys and their defaults, namespaced by plugin.

    Called when a run's configuration is built and by ``astkit plugins``.

    :return: ``{namespace: {key: default}}``; users set the keys as
        ``--set namespace.key=value`` or in a ``[options.namespace]`` TOML
        table, and plugins read them with ``config.plugin(namespace)``.
        Values are converted to the type of the default.

    Combination: all answers are merged; a namespace declared twice is an
    error.
    """


@hookspec
def astkit_register_models(register: Callable[..., None]) -> None:
    """Register network architectures by name.

    Called when the model registry is built (each run, ``astkit models``).

    :param register: call ``register(name, factory)`` where
        ``factory(channels, num_classes, image_size, **options)`` returns an
        ``nn.Module`` whose ``forward`` gives logits and ``embed`` gives the
        features before the classifier.

    Combination: every plugin is called; a name registered twice is an error.
    """


@hookspec
def astkit_register_datasets(register: Callable[..., None]) -> None:
    """Register datasets by name.

    Called when the dataset registry is built (each run, ``astkit datasets``).

    :param register: call ``register(name, loader)`` where
        ``loader(root, download)`` returns an ``astkit.RawData``.

    Combination: every plugin is called; a name registered twice is an error.
    """


@hookspec
def astkit_register_presets(register: Callable[..., None]) -> None:
    """Register presets: names that stand for a list of plugins, with the
    config keys and plugin options they set.

    Called when plugin names given by the user are resolved, when a config
    is built from a selection (the command line's config, ``Engine(config)``)
    and by ``astkit plugins``, which lists each preset's plugins and values.

    :param register: call ``register(name, [plugin, ...], description,
        config={...}, options={...})``. ``config`` (optional) holds sections
        of config keys, ``{"experts": {"lr": 0.003}}``, or top-level keys;
        ``options`` (optional) one table per plugin namespace,
        ``{"balanced-inner-loss": {"base": 5}}``. The values sit between
        astkit's defaults and the user's: a key set in a config file, with
        ``--set`` or with ``RunConfig.set``/``RunConfig.load`` keeps the
        user's value; the run's ``config.toml`` records the result.

    Combination: every plugin is called; a preset name that is also a plugin
    name, or registered twice, is an error. Selecting two presets that set
    one key to different values, or a preset whose key is no config key and
    no declared plugin option, is an error naming the presets and the key.
    """


@hookspec
def astkit_register_commands(app: Any) -> None:
    """Add sub-commands to the ``astkit`` command line.

    Called once when the CLI starts.

    :param app: the ``typer.Typer`` application; add commands with
        ``@app.command()``.

    Combination: every plugin is called.
    """


# --------------------------------------------------------------------------
# Lifecycle events (called on enabled plugins; return values are ignored)
# --------------------------------------------------------------------------


@hookspec
def astkit_on_expert_trained(index: int, trajectory: Trajectory, run: RunContext, config: RunConfig) -> None:
    """An expert finished training and its trajectory file was written.

    Called once per expert, after its file is saved (under torchrun, on
    the rank that trained it).

    :param index: the expert's index.
    :param trajectory: its trajectory (snapshots, accuracies, Avg_Var).
    :param run: the run's context (:class:`astkit.RunContext`): its folder
        (``run.folder``, an :class:`astkit.RunFolder` naming every file), the
        dataset's normalisation and class names, the enabled plugins.
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_distill_start(
    images: torch.Tensor, labels: torch.Tensor, iteration: int, run: RunContext, config: RunConfig
) -> None:
    """Distillation is about to start its first iteration (or to continue).

    Called once per distillation, after the initial images are made by
    ``astkit_init_synthetic`` or restored from a checkpoint on resume, right
    before the first iteration runs (under torchrun, on rank 0).

    :param images: the synthetic images distillation starts from, in the
        dataset's normalised space, ``(N, C, H, W)`` (do not modify).
    :param labels: their labels: int64 ``(N,)`` or soft float logits
        ``(N, num_classes)``.
    :param iteration: the iteration distillation starts at: 0 on a fresh
        run, the checkpoint's iteration after a resume.
    :param run: the run's context (:class:`astkit.RunContext`): its folder
        (``run.folder``), the dataset's ``mean``, ``std`` and ``zca``
        tensors and ``class_names``, the enabled plugins.
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_iteration_start(
    iteration: int, images: torch.Tensor, labels: torch.Tensor, run: RunContext, config: RunConfig
) -> None:
    """A distillation iteration is about to draw its expert and start.

    Called before every distillation iteration (under torchrun, on rank 0).

    :param iteration: the iteration about to run, counted from 0.
    :param images: the synthetic images before it (do not modify).
    :param labels: their labels, hard or soft (do not modify).
    :param run: the run's context (:class:`astkit.RunContext`).
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_iteration_end(
    metrics: IterationMetrics, images: torch.Tensor, run: RunContext, config: RunConfig
) -> None:
    """A distillation iteration finished.

    Called after every distillation iteration (under torchrun, on rank 0),
    whether its update was applied, skipped (``metrics.skipped``: the loss
    was above ``distill.max_loss_to_update``) or rolled back
    (``metrics.rolled_back``: the images and lr are the last sane ones).

    :param metrics: the iteration's numbers (``iteration``, ``loss``,
        ``lr``, ``start_epoch``, ``inner_weight``, ``seconds``, ``skipped``,
        ``rolled_back``, ...).
    :param images: the synthetic images as they now are (do not modify).
    :param run: the run's context (:class:`astkit.RunContext`).
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_evaluation_done(
    result: EvaluationResult, iteration: int | None, run: RunContext, config: RunConfig
) -> None:
    """An evaluation of a distilled set finished.

    Called after the periodic evaluations (``distill.eval_every``) and the
    final one, once all architectures were trained and tested (under
    torchrun, on rank 0, with every rank's networks).

    :param result: accuracies per architecture (mean, std, every network).
    :param iteration: the distillation iteration evaluated, or ``None`` for
        the final evaluation.
    :param run: the run's context (:class:`astkit.RunContext`).
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_checkpoint_written(path: str, iteration: int, run: RunContext, config: RunConfig) -> None:
    """A checkpoint or distilled-set file was written (atomically).

    Called after every checkpoint (``distill.checkpoint_every``, Ctrl-C, the
    end of distillation) and after the distilled set is saved (under
    torchrun, on rank 0, the only one that writes them).

    :param path: the file written.
    :param iteration: the iteration it holds.
    :param run: the run's context (:class:`astkit.RunContext`).
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_distill_end(distilled: DistilledSet, run: RunContext, config: RunConfig) -> None:
    """Distillation finished its last iteration and saved the distilled set.

    Called once per distillation that completes (not when it is interrupted
    or diverges), after ``distilled.safetensors`` is written and before the
    final evaluation (under torchrun, on rank 0).

    :param distilled: the saved set (:class:`astkit.DistilledSet`: images,
        labels, learned lr, iteration); what ``astkit_synthetic_output``
        chose.
    :param run: the run's context (:class:`astkit.RunContext`).
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


#: Decorator for plugin functions that implement the hooks above.
hookimpl = pluggy.HookimplMarker("astkit")


def first_result_hooks(namespace: dict[str, Any]) -> tuple[str, ...]:
    """The hook specifications in ``namespace`` (a module's ``vars()``)
    declared ``@hookspec(firstresult=True)``, in definition order: the
    behaviour hooks, of which only one non-default plugin may answer each."""
    return tuple(
        name for name, fn in namespace.items()
        if name.startswith("astkit_") and (getattr(fn, "astkit_spec", None) or {}).get("firstresult")
    )


#: The behaviour hooks, read from the specs above (see :func:`first_result_hooks`).
FIRST_RESULT_HOOKS = first_result_hooks(globals())
