"""Stage 2: the distillation loop, its state, checkpoints and resume."""

from __future__ import annotations

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
from astkit.interrupts import deferred_interrupt
from astkit.matching import matching_loss, unroll, validate_schedule
from astkit.results import DistilledSet, IterationMetrics
from astkit.trajectory import Trajectory


class Distiller:
    """Synthetic images and student lr, updated one iteration at a time.

    All randomness (expert order, start epochs, perturbation, augmentation,
    mini-batches) comes from one seeded CPU generator whose state is saved in
    checkpoints, so a resumed run continues exactly where it stopped.
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
        self.labels = labels.to(self.device)
        self.lr = torch.tensor(float(d.lr_teacher), device=self.device, requires_grad=True)
        self.lr_img = float(d.lr_img)
        self.opt_img = torch.optim.SGD([self.images], lr=self.lr_img, momentum=d.img_momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=d.lr_lr, momentum=d.lr_momentum)
        #: the largest absolute pixel of the initial images (at least 1), the
        #: reference of ``distill.max_image_growth``
        self.image_scale = self.scale_of_images()
        self.iteration = 0
        #: the iteration whose periodic evaluation was last made (-1: none)
        self.evaluated = -1
        self.failures = 0
        self.history: list[IterationMetrics] = []
        self.expert_order: list[int] = []

    # ------------------------------------------------------------ iteration
    def next_expert(self) -> int:
        """Cycle through the experts in a freshly shuffled order (as MTT)."""
        if not self.expert_order:
            self.expert_order = torch.randperm(len(self.experts), generator=self.generator).tolist()
        return self.expert_order.pop(0)

    def step(self) -> IterationMetrics:
        """One distillation iteration: unroll, match, update images and lr.

        An exception (Ctrl-C included) before the update leaves the distiller
        as it was before the iteration, random draws undone; the update itself
        runs with Ctrl-C held back, so it is applied whole or not at all. A
        checkpoint written after either resumes the uninterrupted run bit for bit.
        """
        boundary, updating = self._random_state(), False
        try:
            loss, terms, drawn = self._meta_gradient()
            with deferred_interrupt():
                updating = True  # from here Ctrl-C waits for the iteration to be whole
                grad_norm = self._clip_image_grad()
                problem = self._update(loss)
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
                    **drawn,
                )
                self.history.append(metrics)
                self.iteration += 1
        except BaseException:
            if not updating:
                self._restore_random_state(boundary)
                self.opt_img.zero_grad(set_to_none=True)
                self.opt_lr.zero_grad(set_to_none=True)
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

    def _meta_gradient(self) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
        """Draw expert and start, unroll the student, backpropagate the matching
        loss into ``images.grad`` and ``lr.grad``; nothing else changes."""
        d, config, hook = self.config.distill, self.config, self.hooks
        t0 = time.perf_counter()
        it = self.iteration
        expert_index = self.next_expert()
        trajectory = self.experts[expert_index]
        start_epoch = int(torch.randint(0, d.max_start_epoch, (1,), generator=self.generator))
        schedule = validate_schedule(
            hook.astkit_matching_schedule(
                syn_steps=d.syn_steps, expert_epochs=d.expert_epochs, iteration=it, config=config
            ),
            d.syn_steps,
            d.expert_epochs,
        )
        weight = hook.astkit_inner_loss_weight(
            start_epoch=start_epoch, max_start_epoch=d.max_start_epoch, iteration=it, config=config
        )
        if not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            raise UserError(f"astkit_inner_loss_weight returned {weight!r}; it must be a positive finite number")
        weight = float(weight)
        layout = self.student.layout
        start = trajectory.snapshots[start_epoch].to(self.device)
        params = layout.split(start)
        perturbed = hook.astkit_perturb_expert(params=params, generator=self.generator, iteration=it, config=config)
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
            segment=d.recompute_segment,
            shard=self.shard,
        )
        loss, terms = matching_loss(student, start, targets, schedule)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        if self.shard is not None and self.images.grad is not None:
            self.shard.sum_(self.images.grad)  # each rank holds its rows' part
        drawn = {"t0": t0, "start_epoch": start_epoch, "expert": expert_index, "inner_weight": weight}
        return loss, terms, drawn

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
        """Step both optimisers if the result is sane; otherwise keep the last
        sane state, lower the image lr and return what was wrong."""
        problem = self._gradient_problem(loss)
        if problem is None:
            saved = self._update_state()
            self.opt_img.step()
            if self.config.distill.learn_lr:
                self.opt_lr.step()
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
        if self.images.grad is not None and not torch.isfinite(self.images.grad).all():
            return "the image gradient holds NaN/Inf"
        if self.lr.grad is not None and not torch.isfinite(self.lr.grad).all():
            return "the lr gradient is NaN/Inf"
        return None

    def scale_of_images(self) -> float:
        """The largest absolute pixel of the current images, at least 1."""
        return max(float(self.images.detach().abs().max()), 1.0)

    def state_problem(self) -> str | None:
        """Why the current images and lr are not a sane state, or None.

        Sane: finite; the learned lr in (0, max_lr_growth x lr_teacher]; the
        largest absolute pixel within max_image_growth x that of the initial
        images (``image_scale``, at least 1).
        """
        d = self.config.distill
        if not torch.isfinite(self.images).all():
            return "the images hold NaN/Inf"
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
        """Copies of what a rolled-back update must give back: images, lr and the
        lr's momentum (the image momentum is dropped on rollback anyway)."""
        saved = {"images": self.images.detach().clone(), "lr": self.lr.detach().clone()}
        buf = self.opt_lr.state.get(self.lr, {}).get("momentum_buffer")
        if buf is not None:
            saved["momentum.lr"] = buf.clone()
        return saved

    def _restore_update_state(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(saved["images"])
            self.lr.copy_(saved["lr"])
        if "momentum.lr" in saved:
            self.opt_lr.state[self.lr]["momentum_buffer"] = saved["momentum.lr"]
        else:
            self.opt_lr.state.pop(self.lr, None)

    def _diverged(self) -> None:
        """Count a failure, lower the image lr and forget the image momentum."""
        self.failures += 1
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        self.lr_img *= self.config.distill.divergence_lr_factor
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
            for p in group["params"]:
                self.opt_img.state.pop(p, None)

    def _random_state(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        return self.generator.get_state(), torch.get_rng_state(), list(self.expert_order)

    def _restore_random_state(self, state: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
        generator_state, rng_state, order = state
        self.generator.set_state(generator_state)
        torch.set_rng_state(rng_state)
        self.expert_order = order

    # --------------------------------------------------------------- output
    def distilled(self, meta: dict[str, Any], zca: dict[str, torch.Tensor] | None = None) -> DistilledSet:
        return DistilledSet(
            self.images.detach().cpu().clone(), self.labels.cpu().clone(), self.lr.item(), self.iteration,
            meta, dict(zca or {})
        )

    def checkpoint(self, meta: dict[str, Any]) -> Checkpoint:
        """The state to continue from, as a :class:`~astkit.checkpoint.Checkpoint`."""
        momentum = {}
        for name, opt, param in (("img", self.opt_img, self.images), ("lr", self.opt_lr, self.lr)):
            buf = opt.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                momentum[name] = buf
        state = {
            "iteration": self.iteration,
            "failures": self.failures,
            "lr_img": self.lr_img,
            "image_scale": self.image_scale,
            "evaluated": self.evaluated,
            "expert_order": list(self.expert_order),
            "history": [m.to_json() for m in self.history],
        }
        return Checkpoint(self.images.detach(), self.labels, self.lr.detach(), self.generator.get_state(),
                          torch.get_rng_state(), state, momentum, meta)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: images, lr, optimiser momenta, random states, counters."""
        state = checkpoint.state
        with torch.no_grad():
            self.images.copy_(checkpoint.images.to(self.device))
            self.lr.copy_(checkpoint.lr)
        self.generator.set_state(checkpoint.generator_state)
        torch.set_rng_state(checkpoint.torch_rng_state)
        self.lr_img = float(state["lr_img"])
        self.image_scale = float(state.get("image_scale", self.image_scale))
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
        for name, opt, param in (("img", self.opt_img, self.images), ("lr", self.opt_lr, self.lr)):
            if name in checkpoint.momentum:
                buf = checkpoint.momentum[name].to(self.device, copy=True)
                opt.state[param]["momentum_buffer"] = buf.reshape(param.shape)
        self.iteration = checkpoint.iteration
        self.failures = int(state["failures"])
        self.evaluated = int(state.get("evaluated", self.iteration))  # older checkpoints: treat as made
        self.expert_order = [int(i) for i in state["expert_order"]]
        self.history = [IterationMetrics(**m) for m in state["history"]]

    def save_checkpoint(self, path: str | Path, meta: dict[str, Any]) -> Path:
        return self.checkpoint(meta).save(path)
