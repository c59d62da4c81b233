"""The hook contract between the astkit engine and its plugins.

Every extension point of astkit is one function below. A plugin is a module
(or object) with functions of the same names decorated with
``@astkit.hookimpl``; it may accept any subset of the arguments. ``None``
means "no answer" everywhere.

Two kinds of hooks:

* behaviour hooks (``astkit_expert_loss``, ``astkit_init_synthetic``,
  ``astkit_inner_loss_weight``, ``astkit_matching_schedule``,
  ``astkit_perturb_expert``) change the method. They are called only on the
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
    from astkit.matching import MatchPoint
    from astkit.results import EvaluationResult, IterationMetrics
    from astkit.run_context import RunContext
    from astkit.trajectory import Trajectory

hookspec = pluggy.HookspecMarker("astkit")


# --------------------------------------------------------------------------
# Behaviour hooks
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def astkit_expert_loss(
    batch: ExpertBatch, epoch: int, num_epochs: int, config: RunConfig
) -> torch.Tensor | None:
    """The loss an expert minimises on one training batch (stage 1).

    Called for every batch of every expert epoch.

    :param batch: the batch: ``batch.model``, ``batch.images`` (augmented),
        ``batch.clean_images`` (before augmentation), ``batch.labels`` and
        ``batch.logits()`` (the model's output on ``images``, computed once
        and cached, so several plugins share one forward pass). To take a
        gradient with respect to the inputs, call
        ``batch.require_input_grad()`` *before* ``batch.logits()``.
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
def astkit_init_synthetic(
    dataset: Dataset,
    ipc: int,
    experts: list[Trajectory],
    generator: torch.Generator,
    config: RunConfig,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The synthetic images distillation starts from.

    Called once, before the first distillation iteration (not on resume).

    :param dataset: the real dataset (normalised tensors in memory).
    :param ipc: images per class to return.
    :param experts: the expert trajectories of the run (e.g. to embed images
        with a trained expert, ``experts[0].build_model(snapshot=-1)``).
    :param generator: the run's seeded CPU random generator; use it for all
        randomness so runs are reproducible.
    :param config: the run's configuration.
    :return: ``(images, labels)``: float images shaped
        ``(ipc * num_classes, C, H, W)`` in the dataset's normalised space and
        int64 labels, ordered class by class; or ``None``.

    Combination: first result. The baseline picks ``ipc`` random real
    images of each class.
    """


@hookspec(firstresult=True)
def astkit_inner_loss_weight(
    start_epoch: int, max_start_epoch: int, iteration: int, config: RunConfig
) -> float | None:
    """The weight of the student's inner cross-entropy for one iteration.

    Called once per distillation iteration, after the start epoch is drawn;
    the weight multiplies the inner loss of every one of the ``syn_steps``
    student steps.

    :param start_epoch: the expert epoch the student starts from.
    :param max_start_epoch: start epochs are drawn from ``[0, max_start_epoch)``.
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: a positive float, or ``None``.

    Combination: first result. The baseline answers ``1.0``.
    """


@hookspec(firstresult=True)
def astkit_matching_schedule(
    syn_steps: int, expert_epochs: int, iteration: int, config: RunConfig
) -> list[MatchPoint] | None:
    """Where along the unrolled student the matching loss is taken.

    Called once per distillation iteration.

    :param syn_steps: the number N of student steps unrolled.
    :param expert_epochs: the number M of expert epochs the student covers.
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: a list of :class:`astkit.MatchPoint` ``(student_step,
        expert_offset, weight)``: after student step ``student_step``
        (1..N) the student is compared with the expert snapshot
        ``start + expert_offset`` (1..M) by the normalised distance
        ``||student - target||^2 / ||start - target||^2``, and the terms are
        summed with their weights. Or ``None``.

    Combination: first result. The baseline answers
    ``[MatchPoint(N, M, 1.0)]``: MTT's single final term.
    """


@hookspec(firstresult=True)
def astkit_perturb_expert(
    params: dict[str, torch.Tensor],
    generator: torch.Generator,
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
    :param iteration: the distillation iteration, counted from 0.
    :param config: the run's configuration.
    :return: new parameters with the same names and shapes, or ``None``.

    Combination: first result. The baseline returns ``params`` unchanged.
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
    :param labels: their int64 labels, ``(N,)``.
    :param iteration: the iteration distillation starts at: 0 on a fresh
        run, the checkpoint's iteration after a resume.
    :param run: the run's context (:class:`astkit.RunContext`): its folder
        (``run.folder``), the dataset's ``mean``, ``std`` and ``zca``
        tensors and ``class_names``, the enabled plugins.
    :param config: the run's configuration.

    Combination: every enabled plugin is called; return values are ignored.
    """


@hookspec
def astkit_on_iteration_end(
    metrics: IterationMetrics, images: torch.Tensor, run: RunContext, config: RunConfig
) -> None:
    """A distillation iteration finished (the images and lr were updated).

    Called after every distillation iteration (under torchrun, on rank 0).

    :param metrics: the iteration's numbers (``iteration``, ``loss``,
        ``lr``, ``start_epoch``, ``inner_weight``, ``seconds``, ...).
    :param images: the synthetic images after the update (do not modify).
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
