"""Stage 2: the distillation loop, its state, checkpoints and resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from astkit import store
from astkit.augment import DSA
from astkit.config import RunConfig
from astkit.errors import DivergenceError, FileFormatError, UserError
from astkit.functional import FlatModel
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
        self.images = images.detach().to(self.device).clone().requires_grad_(True)
        self.labels = labels.to(self.device)
        self.lr = torch.tensor(float(d.lr_teacher), device=self.device, requires_grad=True)
        self.lr_img = float(d.lr_img)
        self.opt_img = torch.optim.SGD([self.images], lr=self.lr_img, momentum=d.img_momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=d.lr_lr, momentum=d.lr_momentum)
        self.iteration = 0
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
        """One distillation iteration: unroll, match, update images and lr."""
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
        grad_norm = float(self.images.grad.norm()) if self.images.grad is not None else 0.0
        if d.clip_image_grad is not None and grad_norm > d.clip_image_grad:  # logged unclipped
            self.images.grad.mul_(d.clip_image_grad / grad_norm)
        failures_before = self.failures
        if self._finite(loss):
            before = (self.images.detach().clone(), self.lr.detach().clone())
            self.opt_img.step()
            if d.learn_lr:
                self.opt_lr.step()
            if not self._finite(loss):  # the update itself produced NaN/Inf or lr <= 0
                with torch.no_grad():
                    self.images.copy_(before[0])
                    self.lr.copy_(before[1])
                self._diverged(it, "the update")
            else:
                self.failures = 0
        else:
            self._diverged(it, "the matching loss")
        metrics = IterationMetrics(
            iteration=it,
            loss=loss.item(),
            lr=self.lr.item(),
            start_epoch=start_epoch,
            expert=expert_index,
            inner_weight=weight,
            terms=[t.item() for t in terms],
            seconds=time.perf_counter() - t0,
            grad_norm=grad_norm,
            rolled_back=self.failures > failures_before,
            lr_img=self.lr_img,
        )
        self.iteration += 1
        self.history.append(metrics)
        return metrics

    def _finite(self, loss: torch.Tensor) -> bool:
        grads = [g for g in (self.images.grad, self.lr.grad) if g is not None]
        return bool(
            torch.isfinite(loss)
            and all(torch.isfinite(g).all() for g in grads)
            and torch.isfinite(self.images).all()
            and torch.isfinite(self.lr)
            and self.lr.item() > 0
        )

    def _diverged(self, iteration: int, where: str) -> None:
        """Skip the update, lower the image lr; stop after too many in a row."""
        d = self.config.distill
        self.failures += 1
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        self.lr_img *= d.divergence_lr_factor
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
            for p in group["params"]:
                self.opt_img.state.pop(p, None)
        if self.failures >= d.max_divergences:
            raise DivergenceError(
                f"distillation diverged ({where}: NaN/Inf or lr <= 0) {self.failures} times in a row at "
                f"iteration {iteration}; the last good set is saved; lower distill.lr_img or distill.lr_lr"
            )

    # --------------------------------------------------------------- output
    def distilled(self, meta: dict[str, Any], zca: dict[str, torch.Tensor] | None = None) -> DistilledSet:
        return DistilledSet(
            self.images.detach().cpu().clone(), self.labels.cpu().clone(), self.lr.item(), self.iteration,
            meta, dict(zca or {})
        )

    def save_checkpoint(self, path: str | Path, meta: dict[str, Any]) -> Path:
        tensors = {
            "images": self.images.detach(),
            "labels": self.labels,
            "lr": self.lr.detach().reshape(1),
            "generator_state": self.generator.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }
        for name, opt, param in (("img", self.opt_img, self.images), ("lr", self.opt_lr, self.lr)):
            buf = opt.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{name}"] = buf.reshape(-1) if name == "lr" else buf
        state = {
            "iteration": self.iteration,
            "failures": self.failures,
            "lr_img": self.lr_img,
            "expert_order": self.expert_order,
            "history": [m.to_json() for m in self.history],
        }
        return store.save(path, "checkpoint", tensors, {**meta, "state": state})

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore images, lr, optimiser momenta, RNG and counters."""
        tensors, meta = store.load(path, "checkpoint")
        try:
            state = meta["state"]
            images, lr = tensors["images"], tensors["lr"][0]
            generator_state, rng_state = tensors["generator_state"], tensors["torch_rng_state"]
            lr_img = float(state["lr_img"])
        except (KeyError, IndexError) as exc:
            raise FileFormatError(f"{path}: checkpoint is missing {exc}; start without --resume") from None
        with torch.no_grad():
            self.images.copy_(images.to(self.device))
            self.lr.copy_(lr)
        self.generator.set_state(generator_state)
        torch.set_rng_state(rng_state)
        self.lr_img = lr_img
        for group in self.opt_img.param_groups:
            group["lr"] = self.lr_img
        for name, opt, param in (("img", self.opt_img, self.images), ("lr", self.opt_lr, self.lr)):
            key = f"momentum.{name}"
            if key in tensors:
                buf = tensors[key].to(self.device)
                opt.state[param]["momentum_buffer"] = buf.reshape(param.shape)
        self.iteration = int(state["iteration"])
        self.failures = int(state["failures"])
        self.expert_order = [int(i) for i in state["expert_order"]]
        self.history = [IterationMetrics(**m) for m in state["history"]]
        return meta

