"""astkit's distillation iteration against MTT's formulation, on equal work, in one run.

The baseline is MTT's distillation step (Cazenavette et al. 2022, distill.py)
written here in plain PyTorch: the ConvNet run on ONE flat parameter vector
(``F.conv2d``/``F.group_norm``/``F.relu``/``F.avg_pool2d``/``F.linear`` on
views of it, instance norm as ``GroupNorm(C, C)``), one
``torch.autograd.grad(..., create_graph=True)`` per student step on a
mini-batch of ``batch_syn`` synthetic images (all of them by default; MTT's
shuffled chunks otherwise), the normalised matching loss ``||theta_N -
theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``, DSA on every step, then
the image and lr optimiser steps (SGD, momentum 0.5). astkit's side is
``Distiller.step`` as ``astkit distill`` runs it (plugins' hooks, draws,
checks, optimiser steps), with astkit's defaults. Both use the same network
(astkit's ConvNet equals MTT's: same parameters in the same order), the same
images, start and target, the same mini-batches and DSA parameters, the same
device and the same thread count.

Each side of each configuration runs in its own fresh process (peak memory is
that process's VmHWM and, on CUDA, ``torch.cuda.max_memory_allocated``),
alternating baseline and astkit for ``--rounds`` rounds (round 1 of every
configuration, then round 2, ...); every ratio pairs one baseline run with the
astkit run that follows it. A run that fails (out of memory, a timeout, the
``--budget`` spent) is reported as failed with its reason and the others still
run. ``--quick`` runs a tiny problem and first checks, in one process, that
both sides compute the same loss and the same image and lr gradients (so the
comparison is of equal work).

    python benchmarks/equal_work.py --json benchmarks/results/equal_work.json
    python benchmarks/equal_work.py --configs 28g:10x20 --rounds 3
    python benchmarks/equal_work.py --device cuda --configs 32c:10x30 32c100:10x20 32c100:50x80b125
    python benchmarks/equal_work.py --quick

A configuration is ``SHAPE[CLASSES]:IPCxSTEPS[bBATCH]``: SHAPE ``28g``
(1x28x28, the first convolution padded by 3 as MTT's) or ``32c`` (3x32x32),
CLASSES the number of classes (default 10: ``32c100`` is CIFAR-100's shape),
IPC images per class, STEPS student steps, BATCH the images per student step
(MTT's ``batch_syn``; default all).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
SHAPES = {"28g": (1, 28), "32c": (3, 32)}
DEFAULT_CONFIGS = ["28g:10x20", "28g:1x50", "28g:10x80", "32c:10x20", "32c:1x50", "32c:10x80"]
QUICK_CONFIGS = ["28g:2x4", "32c:1x3"]
NUM_CLASSES, DEPTH, EXPERT_EPOCHS, LR_TEACHER, LR_IMG, LR_LR = 10, 3, 2, 0.01, 1000.0, 1e-5
CONFIG_SYNTAX = "SHAPE[CLASSES]:IPCxSTEPS[bBATCH]"
_CONFIG = re.compile(r"(?P<shape>[0-9]+[a-z])(?P<classes>[0-9]*):(?P<ipc>[0-9]+)x(?P<steps>[0-9]+)(?:b(?P<batch>[0-9]+))?")

#: Published figures to print beside CIFAR-100's (``32c100``) on CUDA: NCFM (CVPR 2025), Table 3, one A100 80 GB.
ANCHORS = {
    10: [("MTT", 1.92, 61.6, None), ("TESLA", 5.71, 10.3, None)],
    50: [("MTT", None, None, "out of memory"), ("TESLA", 28.2, 44.2, None)],
}
ANCHOR_SOURCE = "NCFM (CVPR 2025) Table 3, one A100 80 GB, CIFAR-100"


def parse_config(text: str) -> dict:
    """``"32c100:50x80b125"`` -> ``{shape, classes, ipc, syn_steps, batch_syn}`` (classes 10, batch_syn None by default)."""
    match = _CONFIG.fullmatch(text.strip().lower())
    if match is None or match["shape"] not in SHAPES:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}; write {CONFIG_SYNTAX} with SHAPE "
                                         f"{' or '.join(SHAPES)}, e.g. 28g:10x20 or 32c100:50x80b125")
    config = {"shape": match["shape"], "classes": int(match["classes"] or NUM_CLASSES), "ipc": int(match["ipc"]),
              "syn_steps": int(match["steps"]), "batch_syn": int(match["batch"]) if match["batch"] else None}
    if config["ipc"] < 1 or config["syn_steps"] < 1:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}: ipc and steps must be >= 1")
    if config["classes"] < 2:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}: the number of classes must be >= 2")
    if config["batch_syn"] is not None and config["batch_syn"] < 1:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}: the batch (bBATCH) must be >= 1")
    return config


def config_name(c: dict) -> str:
    """The canonical name: ``28g:10x20``, ``32c100:50x80b125``."""
    classes = c.get("classes", NUM_CLASSES)
    name = f"{c['shape']}{'' if classes == NUM_CLASSES else classes}:{c['ipc']}x{c['syn_steps']}"
    return name if c.get("batch_syn") is None else f"{name}b{c['batch_syn']}"


# ------------------------------------------------------------- the problem
def problem(spec: dict):
    """Network, flat start and target, images, labels and the DSA of one configuration (seeded), on its device.

    Everything is drawn on the CPU and then moved, so every device gets the same problem.
    """
    import torch

    from astkit.augment import DSA
    from astkit.models import build_model

    device = torch.device(spec.get("device", "cpu"))
    channels, size = SHAPES[spec["shape"]]
    classes = spec.get("classes", NUM_CLASSES)
    torch.manual_seed(spec["seed"])
    module = build_model("convnet", channels=channels, num_classes=classes, image_size=size,
                         width=spec["width"], depth=DEPTH, norm="instancenorm")
    start = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    n = spec["ipc"] * classes
    images = torch.randn(n, channels, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(spec["ipc"])
    return (module.to(device), start.to(device), target.to(device), images.to(device), labels.to(device), DSA())


class MTTStep:
    """MTT's distillation step in plain PyTorch (the baseline)."""

    def __init__(self, module, start, target, images, labels, augment, syn_steps: int, seed: int,
                 batch_syn: int | None = None):
        import torch

        self.shapes = [tuple(p.shape) for p in module.parameters()]
        self.first_padding = module.features[0].padding[0] if hasattr(module, "features") else 1
        self.start, self.target, self.labels, self.augment = start, target, labels, augment
        self.syn_steps, self.batch_syn = syn_steps, batch_syn
        self.images = images.clone().requires_grad_(True)
        self.lr = torch.tensor(LR_TEACHER, device=images.device, requires_grad=True)
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

    def plans(self) -> list:
        """Every step's mini-batch indices (None: all images) and DSA parameters, drawn as astkit draws them.

        MTT shuffles the images and takes ``batch_syn``-sized chunks until they
        run out, then shuffles again; the chunks are taken first to last here
        (MTT's code pops the last first), so both sides see the same mini-batches.
        """
        import torch

        n, plans, chunks = self.images.shape[0], [], []
        for _ in range(self.syn_steps):
            idx, size = None, n
            if self.batch_syn is not None and self.batch_syn < n:
                if not chunks:
                    chunks = list(torch.randperm(n, generator=self.generator).to(self.images.device).split(self.batch_syn))
                idx = chunks.pop(0)
                size = idx.numel()
            params = self.augment.sample((size, *self.images.shape[1:]), generator=self.generator,
                                         device=self.images.device, dtype=self.images.dtype)
            plans.append((idx, params))
        return plans

    def gradients(self):
        """The draws astkit makes (expert, start epoch, batches and DSA per step), the unroll, the loss and its backward."""
        import torch
        import torch.nn.functional as F

        torch.randperm(1, generator=self.generator)  # astkit draws the expert order and the start epoch first
        torch.randint(0, 1, (1,), generator=self.generator)
        theta = self.start.clone().requires_grad_(True)
        for idx, params in self.plans():
            x, y = (self.images, self.labels) if idx is None else (self.images[idx], self.labels[idx])
            ce = F.cross_entropy(self.forward(theta, self.augment.apply(x, params)), y)
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


def astkit_distiller(module, start, target, images, labels, augment, syn_steps: int, seed: int, width: int,
                     classes: int = NUM_CLASSES, batch_syn: int | None = None):
    """``Distiller`` with astkit's defaults on a fake expert whose snapshots are start, midpoint, target.

    Everything lives on the images' device, as ``astkit distill --device`` puts it.
    """
    import torch

    from astkit import RunConfig
    from astkit.distill import Distiller
    from astkit.functional import FlatModel
    from astkit.plugins import GuardedHooks, PluginSet
    from astkit.trajectory import ModelSpec, Trajectory

    overrides = [
        f"distill.ipc={images.shape[0] // classes}", f"distill.syn_steps={syn_steps}",
        f"distill.expert_epochs={EXPERT_EPOCHS}", "distill.max_start_epoch=1", f"distill.lr_teacher={LR_TEACHER}",
        f"distill.lr_img={LR_IMG}", f"distill.lr_lr={LR_LR}", f"model.width={width}",
    ]
    if batch_syn is not None:
        overrides.append(f"distill.batch_syn={batch_syn}")
    config = RunConfig.load(overrides=overrides)
    plugins = PluginSet.discover()
    hooks = GuardedHooks(plugins.manager([]), plugins)
    flat = FlatModel(module)
    snapshots = torch.stack([start, (start + target) / 2, target])
    spec = ModelSpec("convnet", images.shape[1], classes, tuple(images.shape[2:]), {"width": width})
    expert = Trajectory(snapshots, flat.layout, spec, [0.0, 0.0], [0.0, 0.0], {})
    return Distiller(config, hooks, [expert], flat, augment, images, labels,
                     generator=torch.Generator().manual_seed(seed), device=images.device)


# ------------------------------------------------------------------ children
def _synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory(device) -> dict:
    """Peak and current CUDA memory of this process since the last reset (empty on the CPU)."""
    import torch

    if device.type != "cuda":
        return {}
    return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "gpu_allocated_bytes": torch.cuda.memory_allocated(device)}


def worker(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    if spec["side"] == "mtt" and spec.get("baseline_allocator", "system") != "system":
        from astkit import allocator  # the baseline tuned alike: the same malloc settings as astkit's

        allocator.configure(spec["baseline_allocator"])
    elif spec["side"] == "astkit":
        from astkit import RunConfig
        from astkit.process import setup

        setup(RunConfig.load(overrides=[f"device={spec.get('device', 'cpu')}"]))  # as `astkit distill` starts
    module, start, target, images, labels, augment = problem(spec)
    device = images.device
    classes, batch_syn = spec.get("classes", NUM_CLASSES), spec.get("batch_syn")
    if spec["side"] == "mtt":
        runner = MTTStep(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"], batch_syn)
        step = runner.step
    else:
        distiller = astkit_distiller(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"],
                                     spec["width"], classes, batch_syn)
        step = lambda: distiller.step().loss  # noqa: E731
    baseline = common.peak_memory()["rss_bytes"]
    resident = 0
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    times = []
    for i in range(spec["warmup"] + spec["iterations"]):
        _synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        _synchronize(device)
        elapsed = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(elapsed)
        print(f"  {config_name(spec)} {spec['side']}: iteration {i + 1} {elapsed:.2f} s, loss {loss:.4g}",
              file=sys.stderr)
    peaks = {**gpu_memory(device), **common.peak_memory()}  # before profiling, which adds its own records
    return {"side": spec["side"], "name": config_name(spec), "seconds_per_iteration": common.median(times),
            "seconds_all": times, "threads": threads, "torch": torch.__version__, "num_params": int(start.numel()),
            "device": str(device), "baseline_rss_bytes": baseline, "gpu_resident_bytes_before": resident,
            **peaks, **({"profile": profile_iteration(step)} if spec.get("profile") else {})}


#: Where an operator's time is booked in a profile (first match of a name fragment; the rest is "other").
PROFILE_CATEGORIES = [
    ("convolution", ("convolution", "conv2d", "mkldnn")),
    ("instance norm", ("group_norm", "instancenorm", "var_mean", "vecdot")),
    ("relu", ("threshold", "clamp_min", "relu")),
    ("pooling", ("pool",)),
    ("augmentation (DSA)", ("grid_sampler", "affine_grid", "flip", "roll", "bernoulli", "rand")),
    ("zero fills and copies", ("fill_", "zero_", "copy_", "clone", "contiguous", "cat", "stack")),
    ("element-wise arithmetic and reductions", ("mul", "add", "sub", "div", "neg", "sum", "mean", "pow", "exp",
                                                "log", "sqrt", "rsqrt", "where", "max", "min", "softmax", "nll",
                                                "linear", "mm", "addmm")),
]


def print_profiles(results: list[dict]) -> None:
    """Each configuration's first profiled pair: share of self time per category, baseline beside astkit."""
    seen = set()
    for r in results:
        if not r.get("ok") or "profile" not in r or r["config"] in seen:
            continue
        pair = {x["side"]: x["profile"] for x in results
                if x.get("ok") and "profile" in x and x["config"] == r["config"] and x["round"] == r["round"]}
        if len(pair) < 2:
            continue
        seen.add(r["config"])
        rows = []
        for name in pair["mtt"]["categories"]:
            cells = [name]
            for side in ("mtt", "astkit"):
                prof = pair[side]
                seconds = prof["categories"][name]
                cells.append(f"{seconds:.2f} s ({100 * seconds / max(prof['self_seconds'], 1e-12):.0f}%)")
            rows.append(cells)
        rows.append(["total self time", *(f"{pair[s]['self_seconds']:.2f} s" for s in ("mtt", "astkit"))])
        print()
        print(f"Profile of one iteration, {r['config']} (self CPU time per operator category):")
        print(common.table(["category", "MTT", "astkit"], rows))


def profile_iteration(step) -> dict:
    """One more iteration under torch.profiler: seconds of self time per category and the top operators."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    categories = {name: 0.0 for name, _ in PROFILE_CATEGORIES} | {"other": 0.0}
    for key, seconds, _ in ops:
        lowered = key.lower()
        name = next((n for n, fragments in PROFILE_CATEGORIES if any(f in lowered for f in fragments)), "other")
        categories[name] += seconds
    top = sorted(ops, key=lambda op: -op[1])[:15]
    return {"self_seconds": sum(s for _, s, _ in ops), "categories": categories,
            "top_ops": [{"name": k, "self_seconds": s, "calls": c} for k, s, c in top]}


def same_work_check(spec: dict) -> dict:
    """Both sides' first iteration in one process: loss, image gradient and lr gradient."""
    module, start, target, images, labels, augment = problem(spec)
    classes, batch_syn = spec.get("classes", NUM_CLASSES), spec.get("batch_syn")
    mtt = MTTStep(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"], batch_syn)
    loss = mtt.gradients()
    distiller = astkit_distiller(module, start, target, images, labels, augment, spec["syn_steps"], spec["seed"],
                                 spec["width"], classes, batch_syn)
    theirs, _, _ = distiller._meta_gradient()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return {"name": config_name(spec), "device": str(images.device), "loss_mtt": loss.item(),
            "loss_astkit": theirs.item(), "loss_rel_diff": abs(loss.item() - theirs.item()) / abs(loss.item()),
            "image_grad_rel_diff": rel(distiller.images.grad, mtt.images.grad),
            "lr_grad_rel_diff": rel(distiller.lr.grad, mtt.lr.grad),
            "image_grad_norm": float(mtt.images.grad.norm())}


def device_probe(spec: dict) -> dict:
    """What the device is (asked of a child: the parent never imports torch); ``cuda: False`` when none is visible."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cuda_version": torch.version.cuda}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_total_memory_bytes=props.total_memory,
                    gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    return info


def failure_reason(exc: BaseException) -> str:
    """One line saying why a run failed (CUDA out of memory named as such)."""
    import torch

    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > 240:
        first = first[:237] + "..."
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return f"out of memory: {first}"
    return f"{type(exc).__name__}: {first}"


def child(spec: dict) -> dict:
    """Run the job ``spec`` names; an exception becomes ``{"failed": reason}`` (the parent reports it, the rest go on)."""
    import torch

    try:
        if spec.get("probe"):
            return device_probe(spec)
        return same_work_check(spec) if spec.get("check") else worker(spec)
    except Exception as exc:  # noqa: BLE001 - reported as this run's failure, in one line
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            traceback.print_exc()
        return {"failed": failure_reason(exc), **_memory_at_failure(spec), **common.peak_memory()}


def _memory_at_failure(spec: dict) -> dict:
    """The CUDA peaks when a run failed (what an out-of-memory run reached); empty when there are none to read."""
    import torch

    try:
        return gpu_memory(torch.device(spec.get("device", "cpu")))
    except (RuntimeError, AssertionError):  # an unknown device, or CUDA that never started
        return {}


# -------------------------------------------------------------------- parent
class Runner:
    """Starts the children under a per-run ``timeout`` and a ``budget`` for all of them (seconds, None: no limit)."""

    def __init__(self, timeout: float | None, budget: float | None):
        self.timeout, self.budget, self.t0 = timeout, budget, time.monotonic()

    def run(self, spec: dict) -> dict:
        timeout = self.timeout
        if self.budget is not None:
            left = self.budget - (time.monotonic() - self.t0)
            if left < 1:
                return {**spec, "ok": False, "error": f"not run: the --budget of {self.budget:g} s was spent"}
            timeout = left if timeout is None else min(timeout, left)
        result = common.run_child(SCRIPT, spec, timeout)
        if "failed" in result:
            result = {**spec, **result, "ok": False, "error": result.pop("failed")}
        return result


def probe_device(runner: Runner, device: str) -> dict | None:
    """The device's description for the JSON; None (after a one-line message) when CUDA is asked for and absent."""
    if device == "cpu":
        return {"type": "cpu"}
    info = runner.run({"probe": True, "device": device})
    if not info.get("ok") or not info.get("cuda"):
        why = info.get("error") or "torch.cuda.is_available() is False"
        print(f"equal_work.py: --device cuda but no CUDA device is visible to torch ({why}); "
              f"run with --device cpu or on a machine with an NVIDIA GPU", file=sys.stderr)
        return None
    return {"type": "cuda", **{k: v for k, v in info.items() if k != "ok"}}


def peak_bytes(result: dict) -> float | None:
    """The peak that the memory ratio compares: CUDA's max_memory_allocated on the GPU, VmHWM on the CPU."""
    return result.get("gpu_peak_allocated_bytes", result.get("peak_rss_bytes"))


def find(results: list[dict], name: str, rnd: int, side: str) -> dict:
    return next(x for x in results if x["config"] == name and x["round"] == rnd and x["side"] == side)


def _cell(result: dict, value: str) -> str:
    return value if result.get("ok") else "failed"


def _median_of(runs: list[dict], measure) -> float | None:
    return common.median([measure(x) for x in runs])


def summarise(configs: list[dict], results: list[dict], rounds: int, cuda: bool) -> tuple[list, list, list]:
    """Table rows, the per-configuration summary and the failures (one line each)."""
    rows, summary, failures = [], [], []
    for c in configs:
        name, pairs = config_name(c), []
        for r in range(1, rounds + 1):
            mtt, ours = find(results, name, r, "mtt"), find(results, name, r, "astkit")
            failures += [f"{name} round {r} {side}: {res.get('error')}"
                         for side, res in (("MTT", mtt), ("astkit", ours)) if not res.get("ok")]
            speed = memory = None
            if mtt.get("ok") and ours.get("ok"):
                speed = mtt["seconds_per_iteration"] / ours["seconds_per_iteration"]
                memory = peak_bytes(ours) / peak_bytes(mtt)
                pairs.append({"round": r, "speedup": speed, "memory_ratio": memory})
            row = [name, str(r)]
            row += [_cell(x, common.fmt(x.get("seconds_per_iteration"), ".3f")) for x in (mtt, ours)]
            row += [common.fmt(speed, ".2f")]
            row += [_cell(x, common.gib(peak_bytes(x))) for x in (mtt, ours)]
            row += [common.fmt(memory, ".2f")]
            if cuda:
                row += [common.gib(x.get("peak_rss_bytes")) for x in (mtt, ours)]
            rows.append(row)
        entry = {**c, "name": name, "pairs": pairs,
                 "speedup_median": common.median([p["speedup"] for p in pairs]),
                 "memory_ratio_median": common.median([p["memory_ratio"] for p in pairs])}
        for side in ("mtt", "astkit"):
            runs = [x for x in results if x["config"] == name and x["side"] == side and x.get("ok")]
            entry[f"{side}_seconds_median"] = _median_of(runs, lambda x: x["seconds_per_iteration"])
            entry[f"{side}_peak_bytes_median"] = _median_of(runs, peak_bytes)
            entry[f"{side}_errors"] = [x.get("error") for x in results
                                       if x["config"] == name and x["side"] == side and not x.get("ok")]
        summary.append(entry)
    return rows, summary, failures


def anchor_rows(summary: list[dict], gpu_name: str) -> list[list[str]]:
    """Published figures (NCFM's Table 3) beside the medians measured here, for the CIFAR-100 configurations."""
    rows = []
    for s in summary:
        if s["shape"] != "32c" or s["classes"] != 100 or s["ipc"] not in ANCHORS:
            continue
        for method, seconds, gb, note in ANCHORS[s["ipc"]]:
            rows.append([s["name"], f"{method} (published, A100 80 GB)", note or common.fmt(seconds, ".2f"),
                         "" if note else common.fmt(gb, ".1f")])
        for side, label in (("mtt", "MTT formulation (measured)"), ("astkit", "astkit (measured)")):
            seconds, peak = s[f"{side}_seconds_median"], s[f"{side}_peak_bytes_median"]
            if seconds is None:
                oom = any(str(e).startswith("out of memory") for e in s.get(f"{side}_errors", []))
                rows.append([s["name"], f"{label}, {gpu_name}", "out of memory" if oom else "failed", ""])
            else:
                rows.append([s["name"], f"{label}, {gpu_name}", common.fmt(seconds, ".2f"), common.fmt(peak / 1e9, ".1f")])
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None,
                        help=f"{CONFIG_SYNTAX} (default: {' '.join(DEFAULT_CONFIGS)}; --quick: {' '.join(QUICK_CONFIGS)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides run (default cpu); cuda times with torch.cuda.synchronize() around "
                             "each iteration and compares torch.cuda.max_memory_allocated()")
    parser.add_argument("--rounds", type=int, default=None, help="baseline/astkit pairs per configuration (default 2)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--width", type=int, default=None, help="ConvNet width (default 128; --quick: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-allocator", choices=("system", "retain"), default="system",
                        help="glibc malloc settings of the baseline's process (default: as plain PyTorch runs; "
                             "retain: astkit's allocator = retain, the baseline tuned alike)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is abandoned")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all runs together: each run's timeout is cut to what is left, and runs "
                             "that would start after it are reported as not run")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed iterations, profile one more iteration of each run (torch.profiler): "
                             "self time per operator category, printed and written to the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny problem, same-work check first (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        common.emit(child(json.loads(args._worker)))
        return 0

    width = args.width or (8 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)
    iterations = args.iterations or (1 if args.quick else 2)
    if args.quick and args.threads is None:
        args.threads = 1
    configs = args.configs or [parse_config(c) for c in (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)]
    command = common.command_line()
    print(f"$ {command}", file=sys.stderr)
    runner = Runner(args.timeout, args.budget)
    device = probe_device(runner, args.device)
    if device is None:
        return 2
    cuda = args.device == "cuda"
    base = {"width": width, "threads": args.threads, "seed": args.seed, "warmup": args.warmup,
            "iterations": iterations, "device": args.device, "baseline_allocator": args.baseline_allocator,
            "profile": args.profile}

    checks = [runner.run({**base, **c, "check": True}) for c in configs] if args.quick else []
    results = []
    for r in range(1, rounds + 1):
        for c in configs:
            for side in ("mtt", "astkit"):
                print(f"{config_name(c)} round {r}: {side} ...", file=sys.stderr)
                results.append({**runner.run({**base, **c, "side": side}), "round": r, **c, "config": config_name(c)})

    rows, summary, failures = summarise(configs, results, rounds, cuda)
    headers = ["config", "round", "MTT s/it", "astkit s/it", "speed-up", "MTT GiB", "astkit GiB", "memory"]
    if cuda:
        headers += ["MTT host GiB", "astkit host GiB"]
    print()
    print(f"Distillation iteration, MTT's formulation (plain PyTorch) vs astkit's Distiller.step at its defaults, on "
          f"{args.device}{' (' + device['gpu_name'] + ')' if cuda else ''}; ConvNet width {width} depth {DEPTH} "
          f"instance norm, DSA, batch_syn as configured (default all images); {iterations} timed iteration(s) after "
          f"{args.warmup} warm-up per run; threads {args.threads or 'torch default'}; baseline allocator "
          f"{args.baseline_allocator}")
    print(common.table(headers, rows))
    for line in failures:
        print(f"failed: {line}")
    for check in checks:
        if check.get("ok"):
            print(f"same work ({check['name']}, {check['device']}): loss {check['loss_mtt']:.6g} vs "
                  f"{check['loss_astkit']:.6g}, image gradient max rel diff {check['image_grad_rel_diff']:.2e}, "
                  f"lr gradient rel diff {check['lr_grad_rel_diff']:.2e}")
        else:
            print(f"same work check failed: {check.get('error')}")
    memory_note = ("GiB: peak torch.cuda.max_memory_allocated of each process (host GiB: its VmHWM)" if cuda
                   else "GiB: each process's VmHWM")
    print(f"speed-up: MTT s/it / astkit s/it of one pair (run one after the other); memory: astkit peak / MTT peak; "
          f"{memory_note}")
    anchors = anchor_rows(summary, device.get("gpu_name", "")) if cuda else []
    if anchors:
        print()
        print(f"Published anchors ({ANCHOR_SOURCE}, under NCFM's own settings, which may differ from MTT's "
              f"published syn_steps and batch_syn used here) beside the medians measured here (GB = 10^9 bytes, "
              f"the peak of torch.cuda.max_memory_allocated):")
        print(common.table(["config", "method", "s/it", "peak GB"], anchors))
    if args.profile:
        print_profiles(results)
    print(f"command: {command}")
    common.write_json(args.json, {
        "benchmark": "equal_work", "command": command, "quick": args.quick,
        "settings": {"width": width, "depth": DEPTH, "rounds": rounds, "iterations": iterations,
                     "warmup": args.warmup, "threads": args.threads, "seed": args.seed, "device": args.device,
                     "baseline_allocator": args.baseline_allocator,
                     "timeout": args.timeout, "budget": args.budget,
                     "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "VmHWM",
                     "baseline": "MTT distill.py's step in plain PyTorch (flat vector, autograd.grad per step on "
                                 "batch_syn images, normalised matching loss, DSA, SGD momentum 0.5 on images and lr)"},
        "environment": {**common.environment(args.threads), "device": device}, "checks": checks, "results": results,
        "summary": summary, "failures": failures,
        "anchors": {"source": ANCHOR_SOURCE, "figures": {str(k): v for k, v in ANCHORS.items()}} if anchors else None,
    })
    ok = all(r.get("ok") for r in results) and all(c.get("ok") for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
