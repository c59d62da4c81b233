"""astkit's distillation iteration against MTT's formulation, on equal work, in one run.

The baseline is MTT's distillation step (Cazenavette et al. 2022, distill.py)
written here in plain PyTorch: the ConvNet run on ONE flat parameter vector
(``F.conv2d``/``F.group_norm``/``F.relu``/``F.avg_pool2d``/``F.linear`` on
views of it, instance norm as ``GroupNorm(C, C)``), one
``torch.autograd.grad(..., create_graph=True)`` per student step, the
normalised matching loss ``||theta_N - theta*_{t+M}||^2 / ||theta*_t -
theta*_{t+M}||^2``, DSA on every step, then the image and lr optimiser steps
(SGD, momentum 0.5). astkit's side is ``Distiller.step`` as ``astkit distill``
runs it (plugins' hooks, draws, checks, optimiser steps), with astkit's
defaults. Both use the same network (astkit's ConvNet equals MTT's: same
parameters in the same order), the same images, start and target, the same
DSA parameters and the same thread count.

Each side of each configuration runs in its own fresh process (peak memory is
that process's VmHWM), alternating baseline and astkit for ``--rounds``
rounds; every ratio pairs one baseline run with the astkit run that follows
it. ``--quick`` runs a tiny problem and first checks, in one process, that both
sides compute the same loss and the same image and lr gradients (so the
comparison is of equal work).

    python benchmarks/equal_work.py --json benchmarks/results/equal_work.json
    python benchmarks/equal_work.py --configs 28g:10x20 --rounds 3
    python benchmarks/equal_work.py --quick

A configuration is ``SHAPE:IPCxSTEPS`` with SHAPE ``28g`` (1x28x28, the
first convolution padded by 3 as MTT's) or ``32c`` (3x32x32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
SHAPES = {"28g": (1, 28), "32c": (3, 32)}
DEFAULT_CONFIGS = ["28g:10x20", "28g:1x50", "28g:10x80", "32c:10x20", "32c:1x50", "32c:10x80"]
QUICK_CONFIGS = ["28g:2x4", "32c:1x3"]
NUM_CLASSES, DEPTH, EXPERT_EPOCHS, LR_TEACHER, LR_IMG, LR_LR = 10, 3, 2, 0.01, 1000.0, 1e-5


def parse_config(text: str) -> dict:
    """``"28g:10x20"`` -> ``{shape, ipc, syn_steps}``."""
    shape, _, body = text.strip().partition(":")
    ipc, x, steps = body.lower().partition("x")
    try:
        if shape not in SHAPES or not x:
            raise ValueError
        config = {"shape": shape, "ipc": int(ipc), "syn_steps": int(steps)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}; write SHAPE:IPCxSTEPS with SHAPE "
                                         f"{' or '.join(SHAPES)}, e.g. 28g:10x20") from None
    if config["ipc"] < 1 or config["syn_steps"] < 1:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}: ipc and steps must be >= 1")
    return config


def config_name(c: dict) -> str:
    return f"{c['shape']}:{c['ipc']}x{c['syn_steps']}"


# ------------------------------------------------------------- the problem
def problem(spec: dict):
    """Network, flat start and target, images, labels and the DSA of one configuration (seeded)."""
    import torch

    from astkit.augment import DSA
    from astkit.models import build_model

    channels, size = SHAPES[spec["shape"]]
    torch.manual_seed(spec["seed"])
    module = build_model("convnet", channels=channels, num_classes=NUM_CLASSES, image_size=size,
                         width=spec["width"], depth=DEPTH, norm="instancenorm")
    start = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    n = spec["ipc"] * NUM_CLASSES
    images = torch.randn(n, channels, size, size, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(spec["ipc"])
    return module, start, target, images, labels, DSA()


class MTTStep:
    """MTT's distillation step in plain PyTorch (the baseline)."""

    def __init__(self, module, start, target, images, labels, augment, syn_steps: int, seed: int):
        import torch

        self.shapes = [tuple(p.shape) for p in module.parameters()]
        self.first_padding = module.features[0].padding[0] if hasattr(module, "features") else 1
        self.start, self.target, self.labels, self.augment = start, target, labels, augment
        self.syn_steps = syn_steps
        self.images = images.clone().requires_grad_(True)
        self.lr = torch.tensor(LR_TEACHER, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=LR_IMG, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.lr], lr=LR_LR, momentum=0.5)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, flat, x):
        """The ConvNet (conv 3x3 -> instance norm -> relu -> avgpool 2, x depth; linear) on views of ``flat``."""
        import torch
        import torch.nn.functional as F

        pieces = torch.split(flat, [int(torch.Size(s).numel()) for s in self.shapes])
        params = [p.view(s) for p, s in zip(pieces, self.shapes)]
        for d in range(DEPTH):
            w, b, gamma, beta = params[4 * d: 4 * d + 4]
            x = F.conv2d(x, w, b, padding=self.first_padding if d == 0 else 1)
            x = F.group_norm(x, w.shape[0], gamma, beta, eps=1e-5)
            x = F.avg_pool2d(F.relu(x), 2, 2)
        return F.linear(x.flatten(1), params[-2], params[-1])

    def gradients(self):
        """The draws astkit makes (expert, start epoch, DSA per step), the unroll, the loss and its backward."""
        import torch
        import torch.nn.functional as F

        torch.randperm(1, generator=self.generator)  # astkit draws the expert order and the start epoch first
        torch.randint(0, 1, (1,), generator=self.generator)
        plans = [self.augment.sample(tuple(self.images.shape), generator=self.generator, dtype=self.images.dtype)
                 for _ in range(self.syn_steps)]
        theta = self.start.clone().requires_grad_(True)
        for params in plans:
            x = self.augment.apply(self.images, params)
            ce = F.cross_entropy(self.forward(theta, x), self.labels)
            (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
            theta = theta - self.lr * grad
        num = (theta - self.target).pow(2).sum()
        den = (self.start - self.target).pow(2).sum()
        loss = num / den
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step(self) -> float:
        loss = self.gradients()
        self.opt_img.step()
        self.opt_lr.step()
        return loss.item()


def astkit_distiller(module, start, target, images, labels, augment, syn_steps: int, seed: int, width: int):
    """``Distiller`` with astkit's defaults on a fake expert whose snapshots are start, midpoint, target."""
    import torch

    from astkit import RunConfig
    from astkit.distill import Distiller
    from astkit.functional import FlatModel
    from astkit.plugins import GuardedHooks, PluginSet
    from astkit.trajectory import ModelSpec, Trajectory

    config = RunConfig.load(overrides=[
        f"distill.ipc={images.shape[0] // NUM_CLASSES}", f"distill.syn_steps={syn_steps}",
        f"distill.expert_epochs={EXPERT_EPOCHS}", "distill.max_start_epoch=1", f"distill.lr_teacher={LR_TEACHER}",
        f"distill.lr_img={LR_IMG}", f"distill.lr_lr={LR_LR}", f"model.width={width}",
    ])
    plugins = PluginSet.discover()
    hooks = GuardedHooks(plugins.manager([]), plugins)
    flat = FlatModel(module)
    snapshots = torch.stack([start, (start + target) / 2, target])
    spec = ModelSpec("convnet", images.shape[1], NUM_CLASSES, tuple(images.shape[2:]), {"width": width})
    expert = Trajectory(snapshots, flat.layout, spec, [0.0, 0.0], [0.0, 0.0], {})
    return Distiller(config, hooks, [expert], flat, augment, images, labels,
                     generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ children
def worker(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    module, start, target, images, labels, augment = problem(spec)
    if spec["side"] == "mtt":
        runner = MTTStep(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"])
        step = runner.step
    else:
        distiller = astkit_distiller(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"],
                                     spec["width"])
        step = lambda: distiller.step().loss  # noqa: E731
    baseline = common.peak_memory()["rss_bytes"]
    times = []
    for i in range(spec["warmup"] + spec["iterations"]):
        t0 = time.perf_counter()
        loss = step()
        elapsed = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(elapsed)
        print(f"  {config_name(spec)} {spec['side']}: iteration {i + 1} {elapsed:.2f} s, loss {loss:.4g}",
              file=sys.stderr)
    return {"side": spec["side"], "name": config_name(spec), "seconds_per_iteration": common.median(times),
            "seconds_all": times, "threads": threads, "torch": torch.__version__, "num_params": int(start.numel()),
            "baseline_rss_bytes": baseline, **common.peak_memory()}


def same_work_check(spec: dict) -> dict:
    """Both sides' first iteration in one process: loss, image gradient and lr gradient."""
    import torch

    module, start, target, images, labels, augment = problem(spec)
    mtt = MTTStep(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"])
    loss = mtt.gradients()
    distiller = astkit_distiller(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"],
                                 spec["width"])
    theirs, _, _ = distiller._meta_gradient()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return {"name": config_name(spec), "loss_mtt": loss.item(), "loss_astkit": theirs.item(),
            "loss_rel_diff": abs(loss.item() - theirs.item()) / abs(loss.item()),
            "image_grad_rel_diff": rel(distiller.images.grad, mtt.images.grad),
            "lr_grad_rel_diff": rel(distiller.lr.grad, mtt.lr.grad),
            "image_grad_norm": float(mtt.images.grad.norm())}


# -------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None,
                        help=f"SHAPE:IPCxSTEPS (default: {' '.join(DEFAULT_CONFIGS)}; --quick: {' '.join(QUICK_CONFIGS)})")
    parser.add_argument("--rounds", type=int, default=None, help="baseline/astkit pairs per configuration (default 2)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--width", type=int, default=None, help="ConvNet width (default 128; --quick: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is abandoned")
    parser.add_argument("--quick", action="store_true", help="tiny problem, same-work check first (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        common.emit(same_work_check(spec) if spec.get("check") else worker(spec))
        return 0

    width = args.width or (8 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)
    iterations = args.iterations or (1 if args.quick else 2)
    if args.quick and args.threads is None:
        args.threads = 1
    configs = args.configs or [parse_config(c) for c in (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)]
    command = common.command_line()
    print(f"$ {command}", file=sys.stderr)
    base = {"width": width, "threads": args.threads, "seed": args.seed, "warmup": args.warmup,
            "iterations": iterations}

    checks = []
    if args.quick:
        for c in configs:
            checks.append(common.run_child(SCRIPT, {**base, **c, "check": True}, args.timeout))
    results = []
    for c in configs:
        for r in range(rounds):
            for side in ("mtt", "astkit"):
                print(f"{config_name(c)} round {r + 1}: {side} ...", file=sys.stderr)
                results.append({**common.run_child(SCRIPT, {**base, **c, "side": side}, args.timeout),
                                "round": r + 1, **c})

    rows, summary = [], []
    for c in configs:
        pairs = []
        for r in range(1, rounds + 1):
            mtt, ours = ([x for x in results if x["round"] == r and x["side"] == s and x["shape"] == c["shape"]
                          and x["ipc"] == c["ipc"] and x["syn_steps"] == c["syn_steps"]][0] for s in ("mtt", "astkit"))
            if not (mtt.get("ok") and ours.get("ok")):
                rows.append([config_name(c), str(r), "failed", mtt.get("error", "") or ours.get("error", ""), "", "", "", ""])
                continue
            speed = mtt["seconds_per_iteration"] / ours["seconds_per_iteration"]
            memory = ours["peak_rss_bytes"] / mtt["peak_rss_bytes"]
            pairs.append({"round": r, "speedup": speed, "memory_ratio": memory})
            rows.append([config_name(c), str(r), common.fmt(mtt["seconds_per_iteration"], ".3f"),
                         common.fmt(ours["seconds_per_iteration"], ".3f"), common.fmt(speed, ".2f"),
                         common.gib(mtt["peak_rss_bytes"]), common.gib(ours["peak_rss_bytes"]), common.fmt(memory, ".2f")])
        summary.append({**c, "name": config_name(c), "pairs": pairs,
                        "speedup_median": common.median([p["speedup"] for p in pairs]),
                        "memory_ratio_median": common.median([p["memory_ratio"] for p in pairs])})
    print()
    print(f"Distillation iteration, MTT's formulation (plain PyTorch) vs astkit's Distiller.step at its defaults; "
          f"ConvNet width {width} depth {DEPTH} instance norm, DSA, all images per step; {iterations} timed "
          f"iteration(s) after {args.warmup} warm-up per run; threads {args.threads or 'torch default'}")
    print(common.table(["config", "round", "MTT s/it", "astkit s/it", "speed-up", "MTT GiB", "astkit GiB", "memory"],
                       rows))
    for check in checks:
        if check.get("ok"):
            print(f"same work ({check['name']}): loss {check['loss_mtt']:.6g} vs {check['loss_astkit']:.6g}, "
                  f"image gradient max rel diff {check['image_grad_rel_diff']:.2e}, "
                  f"lr gradient rel diff {check['lr_grad_rel_diff']:.2e}")
        else:
            print(f"same work check failed: {check.get('error')}")
    print("speed-up: MTT s/it / astkit s/it of one pair (run one after the other); memory: astkit peak / MTT peak "
          "(each process's VmHWM)")
    print(f"command: {command}")
    common.write_json(args.json, {
        "benchmark": "equal_work", "command": command, "quick": args.quick,
        "settings": {"width": width, "depth": DEPTH, "rounds": rounds, "iterations": iterations,
                     "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
                     "baseline": "MTT distill.py's step in plain PyTorch (flat vector, autograd.grad per step, "
                                 "normalised matching loss, DSA, SGD momentum 0.5 on images and lr)"},
        "environment": common.environment(args.threads), "checks": checks, "results": results, "summary": summary,
    })
    ok = all(r.get("ok") for r in results) and all(c.get("ok") for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
