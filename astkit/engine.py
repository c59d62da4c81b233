"""The public entry point: ``Engine(config).run()`` or the stages one by one.

>>> engine = Engine(RunConfig.load(overrides=["distill.ipc=10"]))
>>> experts = engine.train_experts()
>>> distilled = engine.distill(experts)
>>> result = engine.evaluate(distilled)
"""

from __future__ import annotations

import copy
import time

from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch

from astkit import baselines, distributed, process, store
from astkit import labels as label_rules
from astkit.augment import DSA, build_augmentation
from astkit.checkpoint import Checkpoint
from astkit.collectives import BatchShard
from astkit.config import RunConfig
from astkit.data import BUILTIN_DATASETS, Dataset, load_dataset
from astkit.distill import Distiller, checked_student_loss
from astkit.errors import DivergenceError, UserError
from astkit.evaluate import train_on_synthetic
from astkit.experts import expert_seed, train_expert
from astkit.functional import FlatModel
from astkit.metrics_log import MetricsLog
from astkit.models import BUILTIN_MODELS
from astkit.plugins import GuardedHooks, PluginSet, apply_presets, collect_registrations, declared_options
from astkit.progress import Progress
from astkit.results import ArchitectureResult, DistilledSet, EvaluationResult, RunResult
from astkit.run_context import RunContext
from astkit.run_folder import RunFolder
from astkit.trajectory import ModelSpec, Trajectory


class Engine:
    """Runs AST/MTT's three stages with the plugins a config selects.

    :param config: the run's configuration (default: MTT on digits).
    :param plugins: extra plugin objects or modules to enable for this
        engine, in addition to ``config.plugins`` (which name installed
        entry-point plugins and presets).
    :param dataset: an already loaded :class:`astkit.data.Dataset` to use
        instead of ``config.data``.
    :param progress: receives progress of the long loops (default: silent).
    :param plugin_set: the installed plugins, already discovered (the CLI
        passes its own, so a command discovers them once); default: discover
        them now.
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        plugins: Iterable[Any] = (),
        dataset: Dataset | None = None,
        progress: Progress | None = None,
        plugin_set: PluginSet | None = None,
    ):
        #: the run's configuration: a copy of the caller's, with plugin options resolved
        self.config = copy.deepcopy(config) if config is not None else RunConfig()
        self.config.validate()
        self.progress = progress or Progress()
        self.plugin_set = plugin_set.copy() if plugin_set is not None else PluginSet.discover()
        extra = [self.plugin_set.add(p) for p in plugins]
        self.enabled = self.plugin_set.resolve([*self.config.plugins, *extra], self.config.disable)
        if apply_presets(self.config, self.plugin_set, over_defaults_only=True):
            self.config.validate()
        self.pm = self.plugin_set.manager(self.enabled)
        #: ``pm.hook`` with plugin failures reported by plugin name.
        self.hooks = GuardedHooks(self.pm, self.plugin_set)
        catalog = self.plugin_set.catalog()
        self.models = collect_registrations(catalog, "model", BUILTIN_MODELS)
        self.datasets = collect_registrations(catalog, "dataset", BUILTIN_DATASETS)
        self.config.resolve_options(declared_options(catalog))
        self.hooks.astkit_check_config(config=self.config)
        if self.config.model.name not in self.models:
            raise UserError(f"unknown model {self.config.model.name!r}; known models: {', '.join(sorted(self.models))}")
        self.check_evaluation_models()
        if dataset is None and self.config.data.dataset not in self.datasets:
            raise UserError(
                f"unknown dataset {self.config.data.dataset!r}; known datasets: {', '.join(sorted(self.datasets))}"
            )
        self._dataset = dataset
        self.device = process.setup(self.config)
        if distributed.rank() != 0:  # only rank 0 shows progress
            self.progress = Progress()
        a = self.config.augment
        self.augment: DSA = build_augmentation(a.strategy, a.mode)

    # ------------------------------------------------------------- basics
    @property
    def folder(self) -> RunFolder:
        """Every path of the run (``out``, ``experts.dir``)."""
        return RunFolder.of(self.config)

    @property
    def out(self) -> Path:
        return self.folder.root

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0 under torchrun: the one that writes run files."""
        return distributed.rank() == 0

    @property
    def dataset(self) -> Dataset:
        """The real dataset, loaded once on first use."""
        if self._dataset is None:
            d = self.config.data
            self._dataset = load_dataset(
                d.dataset, d.root, download=d.download, zca=d.zca, zca_eps=d.zca_eps, registry=self.datasets
            )
        return self._dataset

    @cached_property
    def model_spec(self) -> ModelSpec:
        """The run's network: the config's model on this dataset's shapes."""
        ds = self.dataset
        spec = ModelSpec(self.config.model.name, ds.channels, ds.num_classes, tuple(ds.image_size),
                         self.config.model.options())
        spec.build(self.models)  # fail early on bad options
        return spec

    def metadata(self) -> dict[str, Any]:
        """What every file of this run records about it."""
        return {
            "config": self.config.to_dict(),
            "dataset": self.dataset.metadata(),
            "model": self.model_spec.to_json(),
            "plugins": self.plugin_set.versions(self.enabled),
        }

    @cached_property
    def run_context(self) -> RunContext:
        """What the event hooks are told about the run (``run=``): its folder, the
        dataset's normalisation and class names, the enabled plugins."""
        return RunContext.of(self.config, self.dataset, self.plugin_set.versions(self.enabled))

    # ----------------------------------------------------------- stage 1
    def train_experts(self, indices: Iterable[int] | None = None, *, resume: bool = False) -> list[Trajectory]:
        """Train experts (all, or those in ``indices``) and write one file each.

        ``resume=True`` trains only those whose file is missing (an expert cut
        short by Ctrl-C is trained again from its own seed) and returns only
        those. Under ``torchrun`` each rank trains its share (``i % world_size
        == rank``) and, once all ranks are done, every rank returns all of them.
        """
        e = self.config.experts
        indices = list(range(e.num_experts)) if indices is None else list(indices)
        if resume:
            missing = self.folder.missing_experts(indices)
            distributed.barrier()  # every rank has looked before any rank writes
            if len(missing) < len(indices):
                self.progress.log(f"resuming: {len(indices) - len(missing)} of {len(indices)} experts already in "
                                  f"{self.folder.experts}")
            indices = missing
        self.check_kept_experts(indices)  # before any training: the folder must not mix two models
        if distributed.world_size() > 1:
            self._train_experts(distributed.my_share(indices))
            distributed.barrier()
            trajectories = [Trajectory.load(self.folder.expert(i)) for i in indices]
            for trajectory in trajectories:
                trajectory.registry = self.models
            return trajectories
        return self._train_experts(indices)

    def _train_experts(self, indices: list[int]) -> list[Trajectory]:
        e = self.config.experts
        trajectories = []
        for index in indices:
            task = f"expert {index + 1}/{e.num_experts}"
            self.progress.start("expert", task, e.epochs)
            trajectory = train_expert(
                index, self.dataset, self.model_spec, self.config, self.hooks, self.augment,
                registry=self.models, device=self.device,
                on_epoch=lambda ep, loss, acc: self.progress.advance("expert", loss=loss, test_acc=acc),
            )
            self.progress.stop("expert")
            trajectory.registry = self.models
            trajectory.meta.update(plugins=self.plugin_set.versions(self.enabled), config=self.config.to_dict())
            trajectory.save(self.folder.expert(index))
            self.hooks.astkit_on_expert_trained(index=index, trajectory=trajectory, run=self.run_context,
                                                config=self.config)
            self.progress.log(
                f"expert {index}: test acc {trajectory.test_accuracy[-1]:.4f}, Avg_Var {trajectory.avg_var:.4g}"
            )
            trajectories.append(trajectory)
        return trajectories

    def load_experts(self, directory: str | Path | None = None) -> list[Trajectory]:
        """Read every ``*.safetensors`` trajectory of a folder and check it fits."""
        directory = Path(directory) if directory is not None else self.folder.experts
        if directory.exists() and not directory.is_dir():
            raise UserError(f"the experts folder {directory} is a file; point experts.dir (--experts) at a folder of expert files")
        files = RunFolder(self.out, directory).expert_files()
        if not files:
            raise UserError(f"no expert trajectories in {directory}; run `astkit experts` first or set experts.dir")
        return [self._load_expert(f) for f in files]

    def _load_expert(self, path: Path) -> Trajectory:
        trajectory = Trajectory.load(path)
        self.check_expert(trajectory, path)
        trajectory.registry = self.models
        return trajectory

    def check_expert(self, trajectory: Trajectory, path: Path | str = "expert") -> None:
        """Raise if a trajectory was made for another model, data or is too short."""
        d = self.config.distill
        trajectory.check_fits(self.model_spec, self.dataset, d.max_start_epoch, d.expert_epochs, path)

    # ------------------------------------------------------- early checks
    def check_evaluation_models(self, names: Iterable[str] | None = None, key: str = "evaluate.models") -> None:
        """Every evaluation architecture (``names``, default ``evaluate.models``) is a known model."""
        names = list(self.config.evaluate.models if names is None else names)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise UserError(f"unknown model {unknown[0]!r} in {key}; known models: {', '.join(sorted(self.models))}")

    def check_ipc(self) -> None:
        """``distill.ipc`` fits the smallest class of the data (the data is loaded if not yet)."""
        ipc, ds = self.config.distill.ipc, self.dataset
        smallest = min(len(i) for i in ds.class_indices())
        if ipc > smallest:
            raise UserError(f"distill.ipc = {ipc} exceeds the smallest class of {ds.name} ({smallest} images); lower distill.ipc")

    def check_inputs(self) -> None:
        """Every check that needs the data but no training; the stages call it first.

        The output and experts folders must not be files. Loads the data (a
        dataset with fewer than 2 classes, an empty class or an unreadable
        image fails here), builds the run's network and each
        evaluation network on its shapes (bad model options fail here) and
        checks ``distill.ipc`` against the smallest class.
        """
        self.folder.check_folders()
        self.check_ipc()
        spec, ds = self.model_spec, self.dataset
        for name in self.config.evaluate.models:
            if name != spec.name:
                ModelSpec(name, ds.channels, ds.num_classes, tuple(ds.image_size)).build(self.models)

    def check_kept_experts(self, training: Iterable[int]) -> None:
        """Before training experts ``training`` into the experts folder: every other
        expert file there (kept by --resume or --only) fits this run, so the folder
        never mixes two models; from the files' metadata alone."""
        directory = self.folder.experts
        if directory.exists() and not directory.is_dir():
            raise UserError(f"the experts folder {directory} is a file; remove it or set experts.dir to a folder")
        if not directory.is_dir():
            return
        written = {self.folder.expert(i) for i in training}
        for path in self.folder.expert_files():
            if path not in written:
                Trajectory.check_file(path, self.model_spec, self.dataset, self.config.experts.epochs)

    def check_checkpoint(self, path: Path | str) -> None:
        """Before resuming from ``path``: a checkpoint of this run's model, data and ipc."""
        Checkpoint.check_file(path, self.model_spec, self.dataset, self.config.distill.ipc)

    # ----------------------------------------------------------- stage 2
    def init_synthetic(self, experts: list[Trajectory], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting images, from the ``astkit_init_synthetic`` hook."""
        ipc, ds = self.config.distill.ipc, self.dataset
        self.check_ipc()
        answer = self.hooks.astkit_init_synthetic(
            dataset=ds, ipc=ipc, experts=experts, generator=generator, config=self.config
        )
        try:
            images, labels = answer
        except (TypeError, ValueError):
            raise UserError(f"astkit_init_synthetic returned {type(answer).__name__}; it must be (images, labels)") from None
        expected = (ipc * ds.num_classes, ds.channels, *ds.image_size)
        if not torch.is_tensor(images) or tuple(images.shape) != expected:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise UserError(
                f"astkit_init_synthetic returned images {shape}, expected {expected}; fix or disable the init plugin"
            )
        labels = label_rules.checked(labels, expected[0], ds.num_classes, "astkit_init_synthetic returned labels that "
                                     "do not fit (fix or disable the init plugin)")
        return images.float(), labels

    def make_distiller(self, experts: list[Trajectory], checkpoint: Path | None = None) -> Distiller:
        """A distiller at iteration 0 (images from the init hook), or restored
        from the ``checkpoint`` file (the init hook is then not called)."""
        for trajectory in experts:
            self.check_expert(trajectory)
            if trajectory.registry is None:
                trajectory.registry = self.models
        generator = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        saved = None
        if checkpoint is None:
            images, labels = self.init_synthetic(experts, generator)
        else:
            saved = Checkpoint.load(checkpoint)
            saved.check_images(self.dataset, self.config.distill.ipc, checkpoint)
            images, labels = saved.images, saved.labels
        module = self.model_spec.build(self.models).to(self.device)
        shard = self._batch_shard(module)
        distiller = Distiller(self.config, self.hooks, experts, FlatModel(module), self.augment, images, labels,
                              generator=generator, device=self.device, shard=shard)
        if shard is not None:  # every rank starts from rank 0's set, whatever the init hook did
            with torch.no_grad():
                shard.broadcast_(distiller.images.data)
                shard.broadcast_(distiller.labels.data)
            distiller.image_scale = distiller.scale_of_images()
        if saved is not None:
            distiller.restore(saved)
        else:
            self.hooks.astkit_init_state(images=distiller.images.detach(), labels=distiller.labels.detach(),
                                         lr=distiller.lr.item(), state=distiller.state, config=self.config)
        return distiller

    def _batch_shard(self, module: torch.nn.Module) -> BatchShard | None:
        """Under torchrun: this rank's share of every synthetic mini-batch."""
        d = self.config.distill
        return BatchShard.plan(module, d.ipc * self.dataset.num_classes, d.batch_syn)

    def distill(self, experts: list[Trajectory] | None = None, *, resume: bool | str | Path = False) -> DistilledSet:
        """Run ``distill.iterations`` iterations; return the distilled set.

        Writes ``checkpoint.safetensors`` every ``checkpoint_every``
        iterations and on Ctrl-C, ``distilled.safetensors`` at the end, and
        ``metrics.jsonl``. ``resume=True`` continues from the run's
        checkpoint (or from the given checkpoint path).

        Under ``torchrun`` every rank unrolls the student on its share of each
        synthetic mini-batch (the meta-gradient is the single-process one);
        images and lr stay identical on every rank; rank 0 alone writes files
        and fires the event hooks.
        """
        experts = experts if experts is not None else self.load_experts()
        d = self.config.distill
        path = None
        if resume:
            path = self.folder.checkpoint if resume is True else Path(resume)
            self.check_checkpoint(path)
        distiller = self.make_distiller(experts, path)
        if path is not None:
            self.progress.log(f"resumed from {path} at iteration {distiller.iteration}")
        main = self.is_main
        if main:
            self.folder.create()
            store.atomic_write_text(self.folder.config, self.config.to_toml())
            log = MetricsLog(self.folder.metrics, [m.to_json() for m in distiller.history],
                             keep_evaluations_upto=distiller.evaluated if path is not None else None)
        else:
            log = MetricsLog(None)
        meta = self.metadata()
        if main:
            self.hooks.astkit_on_distill_start(images=distiller.images.detach(), labels=distiller.labels.detach(),
                                               iteration=distiller.iteration, run=self.run_context, config=self.config)
        self.progress.start("distill", "distilling", d.iterations)
        self.progress.advance("distill", distiller.iteration)
        try:
            if path is not None:  # the evaluation Ctrl-C cut short, if the checkpoint was written before it
                self._evaluate_if_due(distiller, log, meta)
            while distiller.iteration < d.iterations:
                distiller.raise_if_diverged()  # a resume of a run that had reached the limit
                if main:
                    self.hooks.astkit_on_iteration_start(iteration=distiller.iteration, images=distiller.images.detach(),
                                                         labels=distiller.labels.detach(), run=self.run_context,
                                                         config=self.config)
                metrics = distiller.step()
                if metrics.rolled_back:
                    self.progress.log(
                        f"iteration {metrics.iteration}: {metrics.rollback_reason}; rolled back to the last sane "
                        f"state, image lr lowered to {metrics.lr_img:g}"
                    )
                log.write({"event": "iteration", **metrics.to_json()})
                distiller.raise_if_diverged()
                if main:
                    self.hooks.astkit_on_iteration_end(
                        metrics=metrics, images=distiller.images.detach(), run=self.run_context, config=self.config
                    )
                self.progress.advance(
                    "distill", loss=metrics.loss, lr=metrics.lr, start=metrics.start_epoch
                )
                it = distiller.iteration
                if d.checkpoint_every and it % d.checkpoint_every == 0 and it < d.iterations:
                    self._checkpoint(distiller, meta)
                self._evaluate_if_due(distiller, log, meta)
        except KeyboardInterrupt:
            self._checkpoint(distiller, meta)
            self.progress.log(f"interrupted: checkpoint written at iteration {distiller.iteration}; use --resume")
            raise
        except DivergenceError:
            if main:
                distiller.distilled(meta, self._zca()).save(self.folder.distilled)
            self._checkpoint(distiller, meta)
            raise
        finally:
            self.progress.stop("distill")
        distilled = distiller.distilled(meta, self._zca())
        saved = distilled.save(self.folder.distilled) if main else None
        self._checkpoint(distiller, meta)
        if main:
            self.hooks.astkit_on_checkpoint_written(path=str(saved), iteration=distilled.iteration, run=self.run_context,
                                                    config=self.config)
            self.hooks.astkit_on_distill_end(distilled=distilled, run=self.run_context, config=self.config)
        distributed.barrier()  # the files exist before any rank goes on
        self.history = distiller.history
        return distilled

    def _evaluate_if_due(self, distiller: Distiller, log: MetricsLog, meta: dict[str, Any]) -> None:
        """The evaluation every ``distill.eval_every`` iterations, unless the
        distiller records it as made (after a resume)."""
        d, it = self.config.distill, distiller.iteration
        if not (d.eval_every and 0 < it < d.iterations and it % d.eval_every == 0) or distiller.evaluated == it:
            return
        result = self.evaluate(distiller.distilled(meta, self._zca()), iteration=it)
        log.write({"event": "evaluation", "iteration": it, **result.to_json()})
        distiller.evaluated = it

    def _checkpoint(self, distiller: Distiller, meta: dict[str, Any]) -> None:
        if not self.is_main:
            return
        path = distiller.save_checkpoint(self.folder.checkpoint, meta)
        self.hooks.astkit_on_checkpoint_written(path=str(path), iteration=distiller.iteration, run=self.run_context,
                                                config=self.config)

    def _zca(self) -> dict[str, torch.Tensor]:
        zca = self.dataset.zca
        return zca.tensors() if zca is not None else {}

    def real_subset(self, ipc: int, kind: str = "random", *, lr: float | None = None,
                    seed: int | None = None) -> DistilledSet:
        """``ipc`` real images per class as a baseline set (:mod:`astkit.baselines`):
        ``kind`` ``"random"`` (distinct images drawn at random) or ``"kmeans"`` (the
        image nearest each K-Means centroid of its class), hard labels.

        Evaluated with :meth:`evaluate` it gives the "random real" row of the
        paper's tables; ``lr`` defaults to ``evaluate.lr`` if set, else
        ``distill.lr_teacher``; ``seed`` to the config's.
        """
        seed = self.config.seed if seed is None else seed
        images, labels = baselines.real_subset(self.dataset, ipc, kind, seed)
        lr = baselines.protocol_lr(self.config) if lr is None else lr
        return DistilledSet(images, labels, lr, 0, {**self.metadata(), "origin": f"{kind} real subset"}, self._zca())

    # ----------------------------------------------------------- stage 3
    def evaluate(
        self, distilled: DistilledSet, models: list[str] | None = None, *, iteration: int | None = None
    ) -> EvaluationResult:
        """Train ``evaluate.num_nets`` fresh networks per architecture; test each.

        Seeded per network; the caller's random state is left as it was.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._evaluate(distilled, models, iteration)

    def _evaluate(self, distilled: DistilledSet, models: list[str] | None, iteration: int | None) -> EvaluationResult:
        v, ds = self.config.evaluate, self.dataset
        started = time.perf_counter()
        names = models or v.models or [self.config.model.name]
        distilled.check_fits(self.dataset)
        lr = v.lr if v.lr is not None else distilled.lr
        results = {}
        for name in names:
            options = self.config.model.options() if name == self.config.model.name else {}
            spec = ModelSpec(name, ds.channels, ds.num_classes, tuple(ds.image_size), options)
            finals, maxima = [float("nan")] * v.num_nets, [float("nan")] * v.num_nets
            mine = distributed.my_share(list(range(v.num_nets)))
            self.progress.start("evaluate", f"evaluating {name}", len(mine))
            for net in mine:
                seed = expert_seed(self.config.seed + 7_777_777, net)
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                model = spec.build(self.models).to(self.device)
                final, best = train_on_synthetic(
                    model, distilled.images, distilled.labels, lr, v, self.augment,
                    ds.test_images, ds.test_labels, generator=generator, loss_fn=self.student_loss,
                )
                finals[net] = final
                if best is not None:
                    maxima[net] = best
                self.progress.advance("evaluate", acc=final)
            self.progress.stop("evaluate")
            maxima = distributed.gather_floats(maxima, mine) if v.report_max else []
            results[name] = ArchitectureResult(name, distributed.gather_floats(finals, mine), maxima)
        result = EvaluationResult(results, lr, v.epochs, time.perf_counter() - started)
        if self.is_main:
            self.hooks.astkit_on_evaluation_done(result=result, iteration=iteration, run=self.run_context,
                                                 config=self.config)
        return result

    def student_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample losses on synthetic data (``astkit_student_loss``): the
        loss the student is unrolled with, and the one evaluation trains with."""
        return checked_student_loss(self.hooks, logits, labels, self.config)

    # ---------------------------------------------------------------- all
    def run(self, *, resume: bool = False) -> RunResult:
        """Experts (trained, or loaded from ``experts.dir``), distillation, evaluation.

        ``resume=True`` keeps the expert files already written (training only
        the missing ones) and continues distillation from the checkpoint if
        there is one. The final evaluation is recorded in ``metrics.jsonl``.
        """
        self.config.check_expert_length()
        self.check_inputs()  # data, ipc, models: refused before any expert is trained
        self._batch_shard(self.model_spec.build(self.models))  # refuse a bad torchrun setup before training
        checkpoint = self.folder.checkpoint
        if resume and checkpoint.exists():
            self.check_checkpoint(checkpoint)
        if self.config.experts.dir:
            experts = self.load_experts()
        else:  # exactly this run's experts, not other files of the folder
            self.train_experts(resume=resume)
            experts = [self._load_expert(self.folder.expert(i)) for i in range(self.config.experts.num_experts)]
        if resume and not checkpoint.is_file():
            self.progress.log(f"no checkpoint in {self.out}; distilling from the start")
        distilled = self.distill(experts, resume=resume and checkpoint.is_file())
        evaluation = self.evaluate(distilled)
        if self.is_main:
            MetricsLog(self.folder.metrics).write({"event": "final_evaluation", **evaluation.to_json()})
        return RunResult(experts, distilled, evaluation, list(self.history), self.out)
