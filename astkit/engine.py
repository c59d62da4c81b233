"""The public entry point: ``Engine(config).run()`` or the stages one by one.

>>> engine = Engine(RunConfig.load(overrides=["distill.ipc=10"]))
>>> experts = engine.train_experts()
>>> distilled = engine.distill(experts)
>>> result = engine.evaluate(distilled)
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch

from astkit import _defaults, allocator, distributed, store
from astkit.augment import DSA, build_augmentation
from astkit.collectives import BatchShard
from astkit.config import RunConfig
from astkit.data import BUILTIN_DATASETS, Dataset, load_dataset
from astkit.distill import Distiller
from astkit.errors import DivergenceError, FileFormatError, UserError
from astkit.evaluate import train_on_synthetic
from astkit.experts import expert_seed, train_expert
from astkit.functional import FlatModel
from astkit.models import BUILTIN_MODELS
from astkit.plugins import GuardedHooks, PluginSet, collect_registrations, declared_options
from astkit.progress import Progress
from astkit.results import ArchitectureResult, DistilledSet, EvaluationResult, RunResult
from astkit.run_context import RunContext
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
        self.config = config if config is not None else RunConfig()
        self.config.validate()
        self.progress = progress or Progress()
        self.plugin_set = plugin_set.copy() if plugin_set is not None else PluginSet.discover()
        extra = [self.plugin_set.add(p) for p in plugins]
        self.enabled = self.plugin_set.resolve([*self.config.plugins, *extra], self.config.disable)
        self.pm = self.plugin_set.manager(self.enabled)
        #: ``pm.hook`` with plugin failures reported by plugin name.
        self.hooks = GuardedHooks(self.pm, self.plugin_set)
        catalog = self.plugin_set.catalog()
        self.models = collect_registrations(catalog, "model", BUILTIN_MODELS)
        self.datasets = collect_registrations(catalog, "dataset", BUILTIN_DATASETS)
        self.config.resolve_options(declared_options(catalog))
        if self.config.model.name not in self.models:
            raise UserError(f"unknown model {self.config.model.name!r}; known models: {', '.join(sorted(self.models))}")
        self.check_evaluation_models()
        if dataset is None and self.config.data.dataset not in self.datasets:
            raise UserError(
                f"unknown dataset {self.config.data.dataset!r}; known datasets: {', '.join(sorted(self.datasets))}"
            )
        self._dataset = dataset
        self.device = distributed.local_device(resolve_device(self.config.device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL uses the current device
        allocator.configure(self.config.allocator)
        distributed.init(self.device)
        if distributed.rank() != 0:  # only rank 0 shows progress
            self.progress = Progress()
        a = self.config.augment
        self.augment: DSA = build_augmentation(a.strategy, a.mode)

    # ------------------------------------------------------------- basics
    @property
    def out(self) -> Path:
        return Path(self.config.out)

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
    def experts_dir(self) -> Path:
        return Path(self.config.experts.dir) if self.config.experts.dir else self.out / "experts"

    def train_experts(self, indices: Iterable[int] | None = None) -> list[Trajectory]:
        """Train experts (all, or those in ``indices``) and write one file each.

        Under ``torchrun`` each rank trains its share (``i % world_size ==
        rank``) and, once all ranks are done, every rank returns all of them.
        """
        e = self.config.experts
        indices = list(range(e.num_experts)) if indices is None else list(indices)
        self.check_kept_experts(indices)  # before any training: the folder must not mix two models
        if distributed.world_size() > 1:
            self._train_experts(distributed.my_share(indices))
            distributed.barrier()
            trajectories = [Trajectory.load(self.experts_dir() / f"expert_{i:03d}.safetensors") for i in indices]
            for trajectory in trajectories:
                trajectory.registry = self.models
            return trajectories
        return self._train_experts(indices)

    def _train_experts(self, indices: list[int]) -> list[Trajectory]:
        e = self.config.experts
        directory = self.experts_dir()
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
            trajectory.save(directory / f"expert_{index:03d}.safetensors")
            self.hooks.astkit_on_expert_trained(index=index, trajectory=trajectory, run=self.run_context,
                                                config=self.config)
            self.progress.log(
                f"expert {index}: test acc {trajectory.test_accuracy[-1]:.4f}, Avg_Var {trajectory.avg_var:.4g}"
            )
            trajectories.append(trajectory)
        return trajectories

    def load_experts(self, directory: str | Path | None = None) -> list[Trajectory]:
        """Read every ``*.safetensors`` trajectory of a folder and check it fits."""
        directory = Path(directory) if directory is not None else self.experts_dir()
        if directory.exists() and not directory.is_dir():
            raise UserError(f"the experts folder {directory} is a file; point experts.dir (--experts) at a folder of expert files")
        files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
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
        self.check_recorded({**trajectory.meta, "model": trajectory.model.to_json()}, path)
        d = self.config.distill
        if trajectory.num_epochs < d.max_start_epoch - 1 + d.expert_epochs:
            raise UserError(
                f"{path}: has {trajectory.num_epochs} epochs, but the last start epoch "
                f"({d.max_start_epoch - 1}) + expert_epochs ({d.expert_epochs}) goes beyond; "
                "lower distill.max_start_epoch"
            )

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
        for key, folder in (("out", self.out), ("experts.dir", self.experts_dir())):
            blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise UserError(f"{key} {folder}: {blocker} is a file, not a folder; remove it or choose another folder")
        self.check_ipc()
        spec, ds = self.model_spec, self.dataset
        for name in self.config.evaluate.models:
            if name != spec.name:
                ModelSpec(name, ds.channels, ds.num_classes, tuple(ds.image_size)).build(self.models)

    def check_recorded(self, meta: dict[str, Any], path: Path | str, *, kind: str = "expert") -> None:
        """A file's recorded model (name, options, channels, image size, classes) and
        data are this run's; from its metadata alone (nothing is trained or loaded)."""
        try:
            recorded = ModelSpec.from_json(meta["model"])
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}: the {kind} file records no model; the file is damaged or from another tool") from None
        spec = self.model_spec
        if recorded != spec:
            fix = ("point experts.dir at matching experts or retrain them" if kind == "expert"
                   else "resume with the config the checkpoint was made with, or start without --resume")
            raise FileFormatError(f"{path}: made for {_describe(recorded)}, this run uses {_describe(spec)}; {fix}")
        made_on = meta.get("dataset") or {}
        if not isinstance(made_on, dict):
            raise FileFormatError(f"{path}: the {kind} file's dataset record is damaged; use an intact copy")
        if made_on.get("name") and made_on["name"] != self.dataset.name:
            raise FileFormatError(f"{path}: made from {made_on['name']}, this run uses {self.dataset.name}; use a {kind} of this dataset")
        if "zca" in made_on and bool(made_on["zca"]) != (self.dataset.zca is not None):
            raise FileFormatError(
                f"{path}: made {'with' if made_on['zca'] else 'without'} ZCA whitening; set data.zca to match"
            )

    def check_kept_experts(self, training: Iterable[int]) -> None:
        """Before training experts ``training`` into the experts folder: every other
        expert file there (kept by --resume or --only) fits this run, so the folder
        never mixes two models; from the files' metadata alone."""
        directory = self.experts_dir()
        if directory.exists() and not directory.is_dir():
            raise UserError(f"the experts folder {directory} is a file; remove it or set experts.dir to a folder")
        if not directory.is_dir():
            return
        written = {f"expert_{i:03d}.safetensors" for i in training}
        for path in sorted(directory.glob("*.safetensors")):
            if path.name in written:
                continue
            meta = store.read_metadata(path)
            if meta.get("kind") != "trajectory":
                raise FileFormatError(
                    f"{path}: an astkit {meta.get('kind')} file in the experts folder; move it out (the folder holds expert trajectories only)"
                )
            self.check_recorded(meta, path)
            epochs = meta.get("num_epochs")
            if isinstance(epochs, int) and epochs != self.config.experts.epochs:
                raise FileFormatError(
                    f"{path}: an expert of {epochs} epochs, this run trains {self.config.experts.epochs}; "
                    f"set experts.epochs={epochs} or use another experts folder"
                )

    def check_checkpoint(self, path: Path | str) -> None:
        """Before resuming from ``path``: it is a checkpoint of this run's model,
        data and ``distill.ipc``; from its metadata alone."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"the checkpoint {path} is a folder; remove it or start without --resume")
        if not path.is_file():
            raise UserError(f"nothing to resume: no {path}; run without --resume")
        meta = store.read_metadata(path)
        if meta.get("kind") != "checkpoint":
            raise FileFormatError(f"{path}: expected an astkit checkpoint, this one holds a {meta.get('kind')}; start without --resume")
        self.check_recorded(meta, path, kind="checkpoint")
        recorded = ((meta.get("config") or {}).get("distill") or {}).get("ipc")
        if isinstance(recorded, int) and recorded != self.config.distill.ipc:
            ds = self.dataset
            shape = (ds.channels, *ds.image_size)
            found, expected = (recorded * ds.num_classes, *shape), (self.config.distill.ipc * ds.num_classes, *shape)
            raise FileFormatError(
                f"{path}: holds images {found}, this run makes {expected} (distill.ipc {recorded}, not "
                f"{self.config.distill.ipc}); "
                f"set distill.ipc={recorded} to resume, or start without --resume"
            )

    # ----------------------------------------------------------- stage 2
    def init_synthetic(self, experts: list[Trajectory], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting images, from the ``astkit_init_synthetic`` hook."""
        ipc, ds = self.config.distill.ipc, self.dataset
        self.check_ipc()
        answer = self.hooks.astkit_init_synthetic(
            dataset=ds, ipc=ipc, experts=experts, generator=generator, config=self.config
        )
        images, labels = answer
        expected = (ipc * ds.num_classes, ds.channels, *ds.image_size)
        if tuple(images.shape) != expected or labels.shape != (expected[0],):
            raise UserError(
                f"astkit_init_synthetic returned images {tuple(images.shape)}, expected {expected} with labels; fix or disable the init plugin"
            )
        return images.float(), labels.long()

    def make_distiller(self, experts: list[Trajectory], checkpoint: Path | None = None) -> Distiller:
        """A distiller at iteration 0 (images from the init hook), or restored
        from ``checkpoint`` (the init hook is then not called)."""
        for trajectory in experts:
            self.check_expert(trajectory)
            if trajectory.registry is None:
                trajectory.registry = self.models
        generator = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        if checkpoint is None:
            images, labels = self.init_synthetic(experts, generator)
        else:
            tensors, _ = store.load(checkpoint, "checkpoint")
            images, labels = tensors.get("images"), tensors.get("labels")
            ds, ipc = self.dataset, self.config.distill.ipc
            expected = (ipc * ds.num_classes, ds.channels, *ds.image_size)
            if images is None or labels is None or tuple(images.shape) != expected:
                found = "no images" if images is None else f"images {tuple(images.shape)}"
                raise UserError(
                    f"{checkpoint}: holds {found}, this run makes {expected}; "
                    "resume with the config the checkpoint was made with"
                )
        module = self.model_spec.build(self.models).to(self.device)
        shard = self._batch_shard(module)
        distiller = Distiller(self.config, self.hooks, experts, FlatModel(module), self.augment, images, labels,
                              generator=generator, device=self.device, shard=shard)
        if shard is not None:  # every rank starts from rank 0's images, whatever the init hook did
            with torch.no_grad():
                shard.broadcast_(distiller.images.data)
            distiller.image_scale = max(float(distiller.images.detach().abs().max()), 1.0)
        return distiller

    def _batch_shard(self, module: torch.nn.Module) -> BatchShard | None:
        """Under torchrun: this rank's share of every synthetic mini-batch."""
        world = distributed.world_size()
        if world == 1:
            return None
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise UserError(
                "distillation across processes needs a model without batch norm (its statistics couple the "
                "ranks' rows); set model.norm=instancenorm or run distill in one process"
            )
        d, n = self.config.distill, self.config.distill.ipc * self.dataset.num_classes
        size = min(d.batch_syn or n, n)
        batch = min(size, n % size or size)  # MTT's chunks: the last one may be smaller
        if batch < world:
            raise UserError(
                f"distillation across {world} processes needs a synthetic mini-batch of at least {world} "
                f"images, this run has {batch}; raise distill.batch_syn or use fewer processes"
            )
        return BatchShard(distributed.rank(), world)

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
            path = self.out / "checkpoint.safetensors" if resume is True else Path(resume)
            self.check_checkpoint(path)
        distiller = self.make_distiller(experts, path)
        if path is not None:
            distiller.load_checkpoint(path)
            self.progress.log(f"resumed from {path} at iteration {distiller.iteration}")
        main = self.is_main
        if main:
            store.make_dir(self.out)
            store.atomic_write_text(self.out / "config.toml", self.config.to_toml())
            log = MetricsLog(self.out / "metrics.jsonl", [m.to_json() for m in distiller.history],
                             keep_evaluations=path is not None)
        else:
            log = MetricsLog(None)
        meta = self.metadata()
        if main:
            self.hooks.astkit_on_distill_start(images=distiller.images.detach(), labels=distiller.labels,
                                               iteration=distiller.iteration, run=self.run_context, config=self.config)
        self.progress.start("distill", "distilling", d.iterations)
        self.progress.advance("distill", distiller.iteration)
        try:
            if path is not None:  # the evaluation Ctrl-C cut short, if the checkpoint was written before it
                self._evaluate_if_due(distiller, log, meta)
            while distiller.iteration < d.iterations:
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
                distiller.distilled(meta, self._zca()).save(self.out / "distilled.safetensors")
            self._checkpoint(distiller, meta)
            raise
        finally:
            self.progress.stop("distill")
        distilled = distiller.distilled(meta, self._zca())
        saved = distilled.save(self.out / "distilled.safetensors") if main else None
        self._checkpoint(distiller, meta)
        if main:
            self.hooks.astkit_on_checkpoint_written(path=str(saved), iteration=distilled.iteration, run=self.run_context,
                                                    config=self.config)
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
        path = distiller.save_checkpoint(self.out / "checkpoint.safetensors", meta)
        self.hooks.astkit_on_checkpoint_written(path=str(path), iteration=distiller.iteration, run=self.run_context,
                                                config=self.config)

    def _zca(self) -> dict[str, torch.Tensor]:
        zca = self.dataset.zca
        return zca.tensors() if zca is not None else {}

    def real_subset(self, ipc: int, *, lr: float | None = None, seed: int | None = None) -> DistilledSet:
        """A random subset of ``ipc`` real images per class, as a baseline set.

        Evaluated with :meth:`evaluate` it gives the "random real" row of the
        paper's tables; ``lr`` defaults to ``distill.lr_teacher``.
        """
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        images, labels = _defaults.astkit_init_synthetic(dataset=self.dataset, ipc=ipc, generator=generator)
        lr = self.config.distill.lr_teacher if lr is None else lr
        return DistilledSet(images, labels, lr, 0, {**self.metadata(), "origin": "random real subset"}, self._zca())

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
        names = models or v.models or [self.config.model.name]
        self._check_distilled(distilled)
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
                    ds.test_images, ds.test_labels, generator=generator,
                )
                finals[net] = final
                if best is not None:
                    maxima[net] = best
                self.progress.advance("evaluate", acc=final)
            self.progress.stop("evaluate")
            maxima = distributed.gather_floats(maxima, mine) if v.report_max else []
            results[name] = ArchitectureResult(name, distributed.gather_floats(finals, mine), maxima)
        result = EvaluationResult(results, lr, v.epochs)
        if self.is_main:
            self.hooks.astkit_on_evaluation_done(result=result, iteration=iteration, run=self.run_context,
                                                 config=self.config)
        return result

    def _check_distilled(self, distilled: DistilledSet) -> None:
        ds = self.dataset
        made_on = distilled.meta.get("dataset", {}).get("name")
        if made_on and made_on != ds.name:
            raise FileFormatError(f"the distilled set was made from {made_on}, this run tests on {ds.name}; pass --dataset {made_on}")
        if tuple(distilled.images.shape[1:]) != (ds.channels, *ds.image_size):
            raise FileFormatError(
                f"distilled images are {tuple(distilled.images.shape[1:])}, {ds.name} has "
                f"{(ds.channels, *ds.image_size)}; evaluate on the dataset it was distilled from"
            )
        if int(distilled.labels.max()) >= ds.num_classes:
            raise FileFormatError(f"distilled labels exceed the {ds.num_classes} classes of {ds.name}; evaluate on the dataset it was distilled from")
        if bool(distilled.zca) != (ds.zca is not None):
            raise FileFormatError("the distilled set and this run disagree on ZCA whitening; set data.zca to match")

    # ---------------------------------------------------------------- all
    def run(self, *, resume: bool = False) -> RunResult:
        """Experts (trained, or loaded from ``experts.dir``), distillation, evaluation.

        ``resume=True`` keeps the expert files already written (training only
        the missing ones) and continues distillation from the checkpoint if
        there is one.
        """
        self.config.check_expert_length()
        self.check_inputs()  # data, ipc, models: refused before any expert is trained
        self._batch_shard(self.model_spec.build(self.models))  # refuse a bad torchrun setup before training
        if resume and (self.out / "checkpoint.safetensors").exists():
            self.check_checkpoint(self.out / "checkpoint.safetensors")
        if self.config.experts.dir:
            experts = self.load_experts()
        elif resume:
            missing = [i for i in range(self.config.experts.num_experts)
                       if not (self.experts_dir() / f"expert_{i:03d}.safetensors").is_file()]
            self.train_experts(missing)
            experts = self.load_experts()
        else:
            experts = self.train_experts()
        checkpoint = self.out / "checkpoint.safetensors"
        distilled = self.distill(experts, resume=resume and checkpoint.is_file())
        evaluation = self.evaluate(distilled)
        if self.is_main:
            MetricsLog(self.out / "metrics.jsonl").write({"event": "final_evaluation", **evaluation.to_json()})
        return RunResult(experts, distilled, evaluation, list(self.history), self.out)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as a run goes
    (``path=None``: a log that writes nothing, for ranks other than 0).

    ``restart_from`` (the distiller's iteration history) rewrites the file
    with those iterations, dropping records of iterations a resumed run
    will redo; ``keep_evaluations`` keeps the file's evaluation records up
    to the last of those iterations.
    """

    def __init__(self, path: Path | None, restart_from: list[dict] | None = None, *,
                 keep_evaluations: bool = False):
        self.path = path
        if path is not None and restart_from is not None:
            done = len(restart_from)
            evaluations = [r for r in self._records() if r.get("event") == "evaluation"
                           and isinstance(r.get("iteration"), int) and r["iteration"] <= done] if keep_evaluations else []
            records = [{"event": "iteration", **m} for m in restart_from] + evaluations
            records.sort(key=lambda r: (r["iteration"] + (-0.5 if r["event"] == "evaluation" else 0)))
            store.atomic_write_text(path, "".join(store.json_line(r) + "\n" for r in records))

    def _records(self) -> list[dict]:
        """The file's records that parse (a line cut by a kill is skipped;
        non-finite numbers are ``null``)."""
        if self.path is None or not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one whole line of strict JSON (NaN/Infinity as
        ``null``); a full disk leaves the file as it was (a one-line error)."""
        if self.path is None:
            return
        store.append_line(self.path, store.json_line(record))


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (the best available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


def _describe(spec: ModelSpec) -> str:
    options = ",".join(f"{k}={v}" for k, v in sorted(spec.options.items()))
    size = "x".join(str(s) for s in spec.image_size)
    return f"{spec.name}({options}) on {spec.channels}x{size} images, {spec.num_classes} classes"
