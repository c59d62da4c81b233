"""Stage 2: the distillation loop, its state, checkpoints and resume."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch

from astkit.augment import DSA
from astkit.config import RunConfig
from astkit.checkpoint import Checkpoint
from astkit.errors import DivergenceError, UserError
from astkit.functional import FlatModel
from astkit import labels as label_rules
from astkit.interrupts import deferred_interrupt
from astkit.matching import (MatchPoint, choose_segment, graph_bytes, matching_loss, plan_steps, student_step,
                             unroll, validate_schedule)
from astkit.process import device_memory_bytes
from astkit.results import DistilledSet, IterationMetrics
from astkit.trajectory import Trajectory


class Distiller:
    """Synthetic images, their labels and the student lr, updated one iteration at a time.

    All randomness (expert order, start epochs, perturbation, augmentation,
    mini-batches) comes from one seeded CPU generator whose state is saved in
    checkpoints, with the plugins' ``state``, so a resumed run continues
    exactly where it stopped. Soft labels are learned with their own
    optimiser when ``distill.learn_labels`` is set.
    """

    def __init__(
        self,
        config: RunConfig,
        hooks,
        experts: list[Trajectory],
        student: FlatModel,
        augment: DSA,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        shard: Any = None,
    ):
        d = config.distill
        self.config, self.hooks, self.experts, self.student = config, hooks, experts, student
        self.augment, self.generator, self.device = augment, generator, torch.device(device)
        #: a :class:`~astkit.collectives.BatchShard` under torchrun: each
        #: rank unrolls on its rows of every mini-batch (see ``unroll``).
        self.shard = shard
        # Standard strides whatever the init gave (a 1-channel image may carry channels-last strides, which
        # select other convolution kernels and round differently from the images a checkpoint restores).
        self.images = images.detach().to(self.device).clone(memory_format=torch.contiguous_format).requires_grad_(True)
        self.labels = labels.detach().to(self.device).clone()
        self.learn_labels = bool(d.learn_labels)
        if self.learn_labels and not label_rules.is_soft(self.labels):
            raise UserError("distill.learn_labels needs soft labels (N x C logits); enable an init plugin that "
                            "makes them (e.g. datm) or set distill.learn_labels=false")
        if self.learn_labels:
            self.labels.requires_grad_(True)
        self.lr = torch.tensor(float(d.lr_teacher), device=self.device, requires_grad=True)
        self.lr_img = float(d.lr_img)
        self.opt_img = torch.optim.SGD([self.images], lr=self.lr_img, momentum=d.img_momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=d.lr_lr, momentum=d.lr_momentum)
        self.opt_labels = (torch.optim.SGD([self.labels], lr=d.lr_labels, momentum=d.labels_momentum)
                           if self.learn_labels else None)
        #: the enabled plugins' per-run state (see astkit.hookspecs), saved in checkpoints
        self.state: dict[str, Any] = {}
        #: the largest absolute pixel of the initial images (at least 1), the
        #: reference of ``distill.max_image_growth``
        self.image_scale = self.scale_of_images()
        self.iteration = 0
        #: the iteration whose periodic evaluation was last made (-1: none)
        self.evaluated = -1
        self.failures = 0
        self.history: list[IterationMetrics] = []
        #: ``distill.recompute_segment = "auto"`` resolved on the first iteration (see :meth:`recompute_segment`)
        self.segment: int | None = None
        #: what that choice was made from: the graph bytes of one student step and the budget
        self.segment_probe: dict[str, int] = {}

    @property
    def optimisers(self) -> dict[str, tuple[torch.optim.Optimizer, torch.Tensor]]:
        """``{name: (optimiser, its tensor)}`` of what distillation learns."""
        out = {"img": (self.opt_img, self.images), "lr": (self.opt_lr, self.lr)}
        if self.opt_labels is not None:
            out["labels"] = (self.opt_labels, self.labels)
        return out

    # ------------------------------------------------------------ iteration
    def draw(self) -> tuple[int, int]:
        """The iteration's expert and start epoch, from the draw hooks (checked)."""
        d, it, hook = self.config.distill, self.iteration, self.hooks
        expert = hook.astkit_draw_expert(num_experts=len(self.experts), iteration=it, generator=self.generator,
                                         state=self.state, config=self.config)
        if not isinstance(expert, int) or not 0 <= expert < len(self.experts):
            raise UserError(f"astkit_draw_expert returned {expert!r}; it must be an expert index in "
                            f"0..{len(self.experts) - 1}")
        epochs = self.experts[expert].num_epochs
        start = hook.astkit_draw_start_epoch(expert_index=expert, max_start_epoch=d.max_start_epoch,
                                             num_epochs=epochs, iteration=it, generator=self.generator,
                                             state=self.state, config=self.config)
        if not isinstance(start, int) or not 0 <= start <= epochs - d.expert_epochs:
            raise UserError(f"astkit_draw_start_epoch returned {start!r}; it must be an epoch in "
                            f"0..{epochs - d.expert_epochs} (the expert has {epochs} epochs, the student covers "
                            f"distill.expert_epochs = {d.expert_epochs})")
        return expert, start

    def step(self) -> IterationMetrics:
        """One distillation iteration: unroll, match, update images and lr.

        An exception (Ctrl-C included) before the update leaves the distiller
        as it was before the iteration, random draws undone; the update itself
        runs with Ctrl-C held back, so it is applied whole or not at all. A
        checkpoint written after either resumes the uninterrupted run bit for bit.
        """
        d = self.config.distill
        boundary, updating = self._random_state(), False
        try:
            loss, terms, drawn = self._meta_gradient()
            with deferred_interrupt():
                updating = True  # from here Ctrl-C waits for the iteration to be whole
                grad_norm = self._clip_image_grad()
                skipped = d.max_loss_to_update is not None and loss.item() > d.max_loss_to_update
                problem = None if skipped else self._update(loss)
                metrics = IterationMetrics(
                    iteration=self.iteration,
                    loss=loss.item(),
                    lr=self.lr.item(),
                    terms=[t.item() for t in terms],
                    seconds=time.perf_counter() - drawn.pop("t0"),
                    grad_norm=grad_norm,
                    rolled_back=problem is not None,
                    rollback_reason=problem,
                    lr_img=self.lr_img,
                    skipped=skipped,
                    **drawn,
                )
                if not skipped and problem is None:
                    self.hooks.astkit_update_synthetic(
                        images=self.images.detach(), labels=self.labels.detach(), lr=self.lr.item(),
                        iteration=self.iteration, state=self.state, config=self.config)
                self.history.append(metrics)
                self.iteration += 1
        except BaseException:
            if not updating:
                self._restore_random_state(boundary)
                self._zero_grad()
            raise
        return metrics

    def raise_if_diverged(self) -> None:
        """Stop the run once ``distill.max_divergences`` iterations in a row were rolled back."""
        if self.failures >= self.config.distill.max_divergences:
            last = self.history[-1]
            raise DivergenceError(
                f"distillation diverged ({last.rollback_reason}) {self.failures} times in a row, last at iteration "
                f"{last.iteration}; the last sane set is saved; lower distill.lr_img or distill.lr_lr"
            )

    def recompute_segment(self, start: torch.Tensor, weight: float, use_aug: bool) -> int:
        """``distill.recompute_segment``; ``auto`` is chosen once, from the graph one student step builds
        (measured on a probe step with its own random draws) and ``distill.memory_budget_gib`` (default: an
        eighth of the device's memory). Under torchrun every rank takes rank 0's choice."""
        d = self.config.distill
        if d.recompute_segment != "auto":
            return int(d.recompute_segment)
        if self.segment is None:
            augment = self.augment if use_aug else None
            plan = plan_steps(self.images, 1, d.batch_syn, augment, torch.Generator().manual_seed(0))

            def probe():
                student_step(self.student, start.detach().clone().requires_grad_(True), None, self.images.detach(),
                             self.labels.detach(), self.lr.detach(), plan[0], augment, weight, d.student_momentum,
                             create_graph=True, shard=self.shard,
                             loss_fn=lambda z, t: label_rules.per_sample_loss(z, t, d.label_temperature))

            step_bytes = graph_bytes(probe)
            budget = (int(d.memory_budget_gib * 2**30) if d.memory_budget_gib is not None
                      else device_memory_bytes(self.device) // 8)
            segment = choose_segment("auto", d.syn_steps, step_bytes, budget)
            if self.shard is not None:
                segment = int(self.shard.broadcast_(torch.tensor([segment], device=self.device))[0])
            self.segment, self.segment_probe = segment, {"step_bytes": step_bytes, "budget_bytes": budget}
        return self.segment

    def _meta_gradient(self) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
        """Draw expert and start, unroll the student, backpropagate the matching
        loss into the gradients of images, lr (and learned labels); nothing else changes."""
        d, config, hook = self.config.distill, self.config, self.hooks
        t0 = time.perf_counter()
        it = self.iteration
        expert_index, start_epoch = self.draw()
        trajectory = self.experts[expert_index]
        context = {"start_epoch": start_epoch, "expert_index": expert_index, "iteration": it}
        schedule = validate_schedule(
            hook.astkit_matching_schedule(syn_steps=d.syn_steps, expert_epochs=d.expert_epochs, config=config,
                                          **context),
            d.syn_steps,
            d.expert_epochs,
        )
        weight = hook.astkit_inner_loss_weight(max_start_epoch=d.max_start_epoch, config=config, **context)
        if not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            raise UserError(f"astkit_inner_loss_weight returned {weight!r}; it must be a positive finite number")
        weight = float(weight)
        layout = self.student.layout
        start = trajectory.snapshots[start_epoch].to(self.device)
        params = layout.split(start)
        perturbed = hook.astkit_perturb_expert(params=params, generator=self.generator, config=config, **context)
        if perturbed is not params:
            start = layout.flatten(perturbed).detach()
        targets = {
            p.expert_offset: trajectory.snapshots[start_epoch + p.expert_offset].to(self.device) for p in schedule
        }
        use_aug = d.augment and self.augment.enabled
        student = unroll(
            self.student,
            start.clone().requires_grad_(True),
            self.images,
            self.labels,
            self.lr,
            d.syn_steps,
            inner_weight=weight,
            augment=self.augment if use_aug else None,
            batch_syn=d.batch_syn,
            generator=self.generator,
            momentum=d.student_momentum,
            keep={p.student_step for p in schedule},
            segment=self.recompute_segment(start, weight, use_aug),
            shard=self.shard,
            loss_fn=self.student_loss,
        )

        def distance(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, point: MatchPoint):
            term = hook.astkit_matching_distance(student=student, start=start, target=target, layout=layout,
                                                 point=point, state=self.state, config=config, **context)
            if not torch.is_tensor(term) or term.ndim != 0:
                raise UserError(f"astkit_matching_distance returned {term!r}; it must be a scalar tensor")
            return term

        loss, terms = matching_loss(student, start, targets, schedule, distance)
        self._zero_grad()
        loss.backward()
        if self.shard is not None:  # each rank holds its rows' part
            for tensor in (self.images, self.labels):
                if tensor.grad is not None:
                    self.shard.sum_(tensor.grad)
        drawn = {"t0": t0, "start_epoch": start_epoch, "expert": expert_index, "inner_weight": weight}
        return loss, terms, drawn

    def student_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The per-sample inner loss, from ``astkit_student_loss`` (checked)."""
        return checked_student_loss(self.hooks, logits, labels, self.config)

    def _zero_grad(self) -> None:
        for opt, _ in self.optimisers.values():
            opt.zero_grad(set_to_none=True)

    def _clip_image_grad(self) -> float:
        """The image gradient's norm (logged unclipped); scale it down to
        ``distill.clip_image_grad`` when that is set and exceeded."""
        if self.images.grad is None:
            return 0.0
        norm = float(self.images.grad.norm())
        bound = self.config.distill.clip_image_grad
        if bound is not None and norm > bound:
            self.images.grad.mul_(bound / norm)
        return norm

    def _update(self, loss: torch.Tensor) -> str | None:
        """Step the optimisers if the result is sane; otherwise keep the last
        sane state, lower the image lr and return what was wrong."""
        problem = self._gradient_problem(loss)
        if problem is None:
            saved = self._update_state()
            self.opt_img.step()
            if self.config.distill.learn_lr:
                self.opt_lr.step()
            if self.opt_labels is not None:
                self.opt_labels.step()
            problem = self.state_problem()
            if problem is not None:
                self._restore_update_state(saved)
        if problem is None:
            self.failures = 0
        else:
            self._diverged()
        return problem

    def _gradient_problem(self, loss: torch.Tensor) -> str | None:
        if not torch.isfinite(loss):
            return "the matching loss is NaN/Inf"
        for name, (_, tensor) in self.optimisers.items():
            if tensor.grad is not None and not torch.isfinite(tensor.grad).all():
                return f"the {_NAMES[name]} gradient holds NaN/Inf"
        return None

    def scale_of_images(self) -> float:
        """The largest absolute pixel of the current images, at least 1."""
        return max(float(self.images.detach().abs().max()), 1.0)

    def state_problem(self) -> str | None:
        """Why the current images, labels and lr are not a sane state, or None.

        Sane: finite; the learned lr in (0, max_lr_growth x lr_teacher]; the
        largest absolute pixel within max_image_growth x that of the initial
        images (``image_scale``, at least 1).
        """
        d = self.config.distill
        if not torch.isfinite(self.images).all():
            return "the images hold NaN/Inf"
        if self.learn_labels and not torch.isfinite(self.labels).all():
            return "the labels hold NaN/Inf"
        lr = self.lr.item()
        if not math.isfinite(lr) or lr <= 0:
            return f"the learned lr is {lr:g}"
        if lr > d.max_lr_growth * d.lr_teacher:
            return f"the learned lr grew to {lr / d.lr_teacher:.3g} x distill.lr_teacher (max_lr_growth {d.max_lr_growth:g})"
        growth = float(self.images.detach().abs().max()) / self.image_scale
        if growth > d.max_image_growth:
            return f"the images grew to {growth:.3g} x their initial scale (max_image_growth {d.max_image_growth:g})"
        return None

    def _update_state(self) -> dict[str, torch.Tensor]:
        """Copies of what a rolled-back update must give back: images, lr, learned
        labels and the momenta of lr and labels (the image momentum is dropped on rollback anyway)."""
        saved = {name: tensor.detach().clone() for name, (_, tensor) in self.optimisers.items()}
        for name in ("lr", "labels"):
            if name in self.optimisers:
                opt, tensor = self.optimisers[name]
                buf = opt.state.get(tensor, {}).get("momentum_buffer")
                if buf is not None:
                    saved[f"momentum.{name}"] = buf.clone()
        return saved

    def _restore_update_state(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, (_, tensor) in self.optimisers.items():
                tensor.copy_(saved[name])
        for name in ("lr", "labels"):
            if name in self.optimisers:
                opt, tensor = self.optimisers[name]
                if f"momentum.{name}" in saved:
                    opt.state[tensor]["momentum_buffer"] = saved[f"momentum.{name}"]
                else:
                    opt.state.pop(tensor, None)

    def _diverged(self) -> None:
        """Count a failure, lower the image lr and forget the image momentum."""
        self.failures += 1
        self._zero_grad()
        self.lr_img *= self.config.distill.divergence_lr_factor
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
            for p in group["params"]:
                self.opt_img.state.pop(p, None)

    def _random_state(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return self.generator.get_state(), torch.get_rng_state(), copy.deepcopy(self.state)

    def _restore_random_state(self, state: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> None:
        generator_state, rng_state, plugin_state = state
        self.generator.set_state(generator_state)
        torch.set_rng_state(rng_state)
        self.state = plugin_state

    # --------------------------------------------------------------- output
    def output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The set to save and evaluate, from ``astkit_synthetic_output`` (checked)."""
        answer = self.hooks.astkit_synthetic_output(images=self.images.detach(), labels=self.labels.detach(),
                                                   lr=self.lr.item(), state=self.state, config=self.config)
        try:
            images, labels = answer
        except (TypeError, ValueError):
            raise UserError(f"astkit_synthetic_output returned {type(answer).__name__}; it must be (images, labels)") from None
        if tuple(images.shape) != tuple(self.images.shape) or tuple(labels.shape) != tuple(self.labels.shape):
            raise UserError(f"astkit_synthetic_output returned images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)}; expected {tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        return images, labels

    def distilled(self, meta: dict[str, Any], zca: dict[str, torch.Tensor] | None = None) -> DistilledSet:
        images, labels = self.output()
        return DistilledSet(
            images.detach().cpu().clone(), labels.detach().cpu().clone(), self.lr.item(), self.iteration,
            meta, dict(zca or {})
        )

    def checkpoint(self, meta: dict[str, Any]) -> Checkpoint:
        """The state to continue from, as a :class:`~astkit.checkpoint.Checkpoint`."""
        momentum = {}
        for name, (opt, param) in self.optimisers.items():
            buf = opt.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                momentum[name] = buf
        state = {
            "iteration": self.iteration,
            "failures": self.failures,
            "lr_img": self.lr_img,
            "image_scale": self.image_scale,
            "evaluated": self.evaluated,
            "history": [m.to_json() for m in self.history],
        }
        return Checkpoint(self.images.detach(), self.labels.detach(), self.lr.detach(), self.generator.get_state(),
                          torch.get_rng_state(), state, momentum, meta, copy.deepcopy(self.state))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: images, labels, lr, optimiser momenta,
        random states, plugin state, counters."""
        state = checkpoint.state
        if tuple(checkpoint.labels.shape) != tuple(self.labels.shape):
            raise UserError(f"the checkpoint holds labels {tuple(checkpoint.labels.shape)}, this run's are "
                            f"{tuple(self.labels.shape)}; resume with the plugins the checkpoint was made with")
        with torch.no_grad():
            self.images.copy_(checkpoint.images.to(self.device))
            self.labels.copy_(checkpoint.labels.to(self.device))
            self.lr.copy_(checkpoint.lr)
        self.generator.set_state(checkpoint.generator_state)
        torch.set_rng_state(checkpoint.torch_rng_state)
        self.lr_img = float(state["lr_img"])
        self.image_scale = float(state.get("image_scale", self.image_scale))
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
        for name, (opt, param) in self.optimisers.items():
            if name in checkpoint.momentum:
                buf = checkpoint.momentum[name].to(self.device, copy=True)
                opt.state[param]["momentum_buffer"] = buf.reshape(param.shape)
        self.iteration = checkpoint.iteration
        self.failures = int(state["failures"])
        self.evaluated = int(state.get("evaluated", self.iteration))  # older checkpoints: treat as made
        self.state = copy.deepcopy(checkpoint.plugin_state)
        self.history = [IterationMetrics(**m) for m in state["history"]]

    def save_checkpoint(self, path: str | Path, meta: dict[str, Any]) -> Path:
        return self.checkpoint(meta).save(path)


_NAMES = {"img": "image", "lr": "lr", "labels": "label"}


def checked_student_loss(hooks, logits: torch.Tensor, labels: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """``astkit_student_loss``'s per-sample losses, checked to be ``(B,)``."""
    losses = hooks.astkit_student_loss(logits=logits, labels=labels, config=config)
    if not torch.is_tensor(losses) or tuple(losses.shape) != (logits.shape[0],):
        shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
        raise UserError(f"astkit_student_loss returned {shape}; it must be per-sample losses ({logits.shape[0]},)")
    return losses
