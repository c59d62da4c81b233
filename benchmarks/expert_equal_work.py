"""astkit's expert training against the reference training loops, on equal work, in one run.

One epoch of one expert, two modes:

``mtt``  MTT's buffer.py: SGD lr 0.01 (no momentum, no weight decay), batches
         of 256 in a shuffled order, DSA on every batch, cross-entropy, step.
         astkit's side runs the ``mtt`` preset.
``ast``  the AST authors' buffer loop: SGD lr 0.003, momentum 0.9, weight
         decay 1e-3; the cross-entropy on the augmented batch times the
         clipping ramp (0.50, 0.55, ..., 0.95 over epochs 0..9, then 1; epoch
         0 is measured) plus 2 x the per-pixel gradient penalty
         ``mean((||d sum(logits) / d x||_channels - 1)^2)`` on the clean batch
         (a second forward pass, ``create_graph=True``). astkit's side runs the
         ``ast-reference`` preset.

The baseline is written here in plain PyTorch, as the reference code runs it:
MTT's ConvNet (``Conv2d``, ``GroupNorm(C, C)``, ``ReLU(inplace=True)``,
``AvgPool2d(2)``, ``Linear``; the first convolution padded by 3 on 1x28x28),
a ``DataLoader`` over a ``TensorDataset`` (batch 256, ``num_workers=0``), MTT's
``epoch()``: per batch DSA, forward, loss, the batch accuracy through numpy,
zero_grad, backward, step; then the test pass as MTT's ``epoch("test")`` (batch
256, no ``no_grad``), the snapshot of every parameter and ``torch.save`` of the
trajectory. astkit's side is ``Engine(config, dataset=...).train_experts([0])``
with the preset and ``experts.epochs=1`` (what ``astkit experts --plugins
PRESET`` runs: its epoch, its test pass, its snapshot and its file, in a
temporary folder). The time of one run is that whole call on each side; loading
the data and building the engine are not timed.

Equal work: both sides build the network after ``torch.manual_seed`` of
astkit's expert seed, so the initial weights are the same; the batch order is
``torch.randperm`` of the expert's generator (the baseline hands it to its
``DataLoader`` as the sampler: a shuffled loader is that permutation); DSA is
astkit's port on both sides, drawn from the same generator in the same order,
so the augmentation draws are the same too (the comparison therefore leaves out
any speed difference between astkit's DSA and the reference ``DiffAugment``).
Every run (``--quick`` included; ``--no-check`` skips it) first checks this
in one process, for each mode, on the first 640 training and 200 test images
(three steps, the last one a partial batch) at the measured width: the same
initial weights and parameter names, and after the epoch the same update to
float32 tolerance (``update_rel_diff``: max |difference of the two updates| /
max |astkit's update|). In ``mtt`` mode the updates are bitwise equal; in
``ast`` mode they differ by rounding only (about 1e-5 at width 8: astkit's
instance norm has an analytic double backward, the baseline's ``GroupNorm``
autograd's; with astkit's norm in the baseline they are bitwise equal too). The
same comparison against the baseline run without DSA
(``update_rel_diff_without_augmentation``, tenths) shows that the check sees
a difference in the work.

Each measured run is a fresh process (peak memory is its VmHWM, with the
dataset in memory on both sides), alternating baseline and astkit for
``--rounds`` rounds per mode; a ratio pairs a baseline run with the astkit run
that follows it. With one epoch the lr decay of the AST script (x0.6 after
epoch T//2+1) is never reached.

    python benchmarks/expert_equal_work.py --threads 2 --json benchmarks/results/expert_equal_work.json
    python benchmarks/expert_equal_work.py --modes ast --width 32 --subset 6000 --threads 1
    python benchmarks/expert_equal_work.py --quick

Data: Fashion-MNIST through astkit's loader (``--data-root``, default
/usr/share/datasets/fashion-mnist), 60,000 training and 10,000 test images;
``--quick``: random 1x28x28 images (640 to train on, 200 to test), width 8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
MODES = ("mtt", "ast")
SIDES = ("baseline", "astkit")
PRESETS = {"mtt": "mtt", "ast": "ast-reference"}
#: the reference scripts' expert optimiser and loss, per mode
REFERENCE = {
    "mtt": {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "smooth": False},
    "ast": {"lr": 0.003, "momentum": 0.9, "weight_decay": 1e-3, "smooth": True},
}
CLIP_RAMP = [0.50 + 0.05 * e for e in range(10)]  # the authors' lambda per epoch, then 1
PENALTY_COEFFICIENT, PENALTY_TARGET = 2.0, 1.0
BATCH, DEPTH, NUM_CLASSES, CHANNELS, SIZE = 256, 3, 10, 1, 28
QUICK_TRAIN, QUICK_TEST = 640, 200
CHECK_TRAIN, CHECK_TEST = 640, 200


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one line, ``error: ...``, and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class UserFailure(Exception):
    """A child refused its input (missing data, bad option): stop, no traceback."""


# ------------------------------------------------------------------ the data
def load_data(spec: dict, train: int | None = None, test: int | None = None):
    """Fashion-MNIST through astkit's loader (or random images with ``quick``), cut to the first N images."""
    import dataclasses

    import torch

    from astkit.data import load_dataset
    from astkit.data.dataset import Dataset

    if spec["quick"]:
        g = torch.Generator().manual_seed(spec["seed"] + 1)
        ds = Dataset("random", torch.randn(QUICK_TRAIN, CHANNELS, SIZE, SIZE, generator=g),
                     torch.randint(0, NUM_CLASSES, (QUICK_TRAIN,), generator=g),
                     torch.randn(QUICK_TEST, CHANNELS, SIZE, SIZE, generator=g),
                     torch.randint(0, NUM_CLASSES, (QUICK_TEST,), generator=g),
                     [str(c) for c in range(NUM_CLASSES)], (0.5,), (0.25,))
    else:
        ds = load_dataset("fashion-mnist", spec["data_root"])
    train = train or spec.get("subset")
    return dataclasses.replace(ds, train_images=ds.train_images[:train].contiguous(),
                               train_labels=ds.train_labels[:train].contiguous(),
                               test_images=ds.test_images[:test].contiguous(),
                               test_labels=ds.test_labels[:test].contiguous())


# ------------------------------------------------------------------ baseline
def mtt_convnet(width: int):
    """MTT's ConvNet (networks.py) on 1x28x28: the first convolution padded by 3, maps 32 -> 16 -> 8 -> 4."""
    from torch import nn

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            layers, channels = [], CHANNELS
            for d in range(DEPTH):
                layers += [nn.Conv2d(channels, width, 3, padding=3 if d == 0 else 1),
                           nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
                channels = width
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(width * 4 * 4, NUM_CLASSES)

        def forward(self, x):
            out = self.features(x)
            return self.classifier(out.view(out.size(0), -1))

    return ConvNet()


def pixel_penalty(net, clean):
    """The authors' penalty: ``mean((||grad_x sum(net(x))||_2 over channels - 1)^2)`` on the clean batch."""
    import torch

    clean = clean.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(clean).sum(), clean, create_graph=True)
    return ((grad.norm(2, dim=1) - PENALTY_TARGET) ** 2).mean()


def run_epoch(mode: str, loader, net, optimizer, augment, generator, smooth: bool, epoch: int):
    """MTT's ``utils.epoch`` (+ the AST authors' clipping and penalty when ``smooth``): mean loss and accuracy."""
    import numpy as np
    import torch.nn.functional as F

    net.train(mode == "train")
    loss_sum, correct, count = 0.0, 0, 0
    for img, lab in loader:
        img, lab = img.float(), lab.long()
        clean = img
        if augment is not None:
            img = augment(img, generator=generator)
        output = net(img)
        loss = F.cross_entropy(output, lab)
        correct += int(np.sum(np.equal(np.argmax(output.detach().numpy(), axis=-1), lab.numpy())))
        if mode == "train" and smooth:
            loss = loss * (CLIP_RAMP[epoch] if epoch < len(CLIP_RAMP) else 1.0)
            loss = loss + PENALTY_COEFFICIENT * pixel_penalty(net, clean)
        loss_sum += loss.item() * lab.shape[0]
        count += lab.shape[0]
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss_sum / max(1, count), correct / max(1, count)


def baseline_expert(data, mode: str, seed: int, width: int, out: str, augment=True) -> dict:
    """One epoch of the reference buffer loop: returns the flat snapshots, names and the test accuracy."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from astkit.augment import build_augmentation
    from astkit.config import AugmentConfig
    from astkit.experts import expert_seed

    r = REFERENCE[mode]
    s = expert_seed(seed, 0)
    torch.manual_seed(s)
    net = mtt_convnet(width)
    generator = torch.Generator().manual_seed(s)
    dsa = build_augmentation(AugmentConfig().strategy, AugmentConfig().mode) if augment else None
    optimizer = torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    train_set = TensorDataset(data.train_images, data.train_labels)
    test_loader = DataLoader(TensorDataset(data.test_images, data.test_labels), batch_size=BATCH, shuffle=False,
                             num_workers=0)
    timestamps = [[p.detach().cpu().clone() for p in net.parameters()]]
    epoch = 0  # the one measured epoch
    order = torch.randperm(len(train_set), generator=generator).tolist()  # what shuffle=True draws
    train_loader = DataLoader(train_set, batch_size=BATCH, sampler=order, num_workers=0)
    run_epoch("train", train_loader, net, optimizer, dsa, generator, r["smooth"], epoch)
    _, test_acc = run_epoch("test", test_loader, net, None, None, None, False, epoch)
    timestamps.append([p.detach().cpu().clone() for p in net.parameters()])
    torch.save(timestamps, Path(out) / "replay_buffer_0.pt")
    return {"snapshots": [torch.cat([p.reshape(-1) for p in t]) for t in timestamps],
            "names": [n for n, _ in net.named_parameters()], "test_accuracy": test_acc}


# -------------------------------------------------------------------- astkit
def astkit_engine(data, mode: str, seed: int, width: int, out: str, extra: list[str] = ()):
    """astkit's Engine with the mode's preset, one expert of one epoch, writing into ``out``; ``extra``: --set."""
    from astkit import Engine, RunConfig

    config = RunConfig.load(overrides=[
        f"plugins={PRESETS[mode]}", f"seed={seed}", "experts.num_experts=1", "experts.epochs=1",
        f"experts.batch_size={BATCH}", f"model.width={width}", f"model.depth={DEPTH}", "model.norm=instancenorm",
        f"out={out}", "device=cpu", *extra,
    ])
    return Engine(config, dataset=data)


def astkit_expert(engine) -> dict:
    """``engine.train_experts([0])``: astkit's flat snapshots, parameter names and final test accuracy."""
    trajectory = engine.train_experts(indices=[0])[0]
    return {"snapshots": list(trajectory.snapshots), "names": list(trajectory.layout.names),
            "test_accuracy": trajectory.test_accuracy[-1]}


# ------------------------------------------------------------------ children
def prepay_imports() -> None:
    """The first torch optimiser imports torch._dynamo (about 2 s, once per process): not part of an epoch."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def worker(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    t0 = time.perf_counter()
    data = load_data(spec)
    load_seconds = time.perf_counter() - t0
    prepay_imports()
    with tempfile.TemporaryDirectory(prefix="astkit-bench-") as out:
        engine = (astkit_engine(data, spec["mode"], spec["seed"], spec["width"], out, spec["set"])
                  if spec["side"] == "astkit" else None)
        rss_before = common.peak_memory()["rss_bytes"]
        cpu_before = common.cpu_times()
        t0 = time.perf_counter()
        if engine is None:
            result = baseline_expert(data, spec["mode"], spec["seed"], spec["width"], out)
        else:
            result = astkit_expert(engine)
        seconds = time.perf_counter() - t0
        cpu = common.cpu_delta(cpu_before, common.cpu_times())
    print(f"  {spec['mode']} {spec['side']}: {seconds:.2f} s, test acc {result['test_accuracy']:.4f}", file=sys.stderr)
    return {"side": spec["side"], "mode": spec["mode"], "seconds_per_epoch": seconds,
            "images_per_second": int(data.train_images.shape[0]) / seconds, "load_seconds": load_seconds,
            "num_train": int(data.train_images.shape[0]), "num_test": int(data.test_images.shape[0]),
            "num_params": int(result["snapshots"][0].numel()), "final_test_accuracy": result["test_accuracy"],
            "allocator": engine.config.allocator if engine is not None else "system",
            "threads": threads, "torch": torch.__version__, **cpu, "baseline_rss_bytes": rss_before,
            **common.peak_memory()}


def max_rel(a, b) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def same_work(data, mode: str, seed: int, width: int, extra: list[str] = ()) -> dict:
    """Baseline (with and without DSA) and astkit on ``data``: same start, same update after the epoch."""
    with tempfile.TemporaryDirectory(prefix="astkit-bench-") as out:
        ref = baseline_expert(data, mode, seed, width, out)
        plain = baseline_expert(data, mode, seed, width, out, augment=False)
        ours = astkit_expert(astkit_engine(data, mode, seed, width, out, extra))
    start, end = ours["snapshots"][0], ours["snapshots"][-1]
    update = end - start
    return {"mode": mode, "preset": PRESETS[mode], "steps": -(-int(data.train_images.shape[0]) // BATCH),
            "num_params": int(start.numel()), "same_names": ref["names"] == ours["names"],
            "init_max_abs_diff": float((ref["snapshots"][0] - start).abs().max()),
            "param_rel_diff": max_rel(ref["snapshots"][-1], end),
            "update_rel_diff": max_rel(ref["snapshots"][-1] - ref["snapshots"][0], update),
            "update_rel_diff_without_augmentation": max_rel(plain["snapshots"][-1] - plain["snapshots"][0], update),
            "update_norm": float(update.norm()),
            "test_accuracy_baseline": ref["test_accuracy"], "test_accuracy_astkit": ours["test_accuracy"]}


def same_work_checks(spec: dict) -> dict:
    """The same-work check of every mode, in this one process, on the first 640 / 200 images."""
    common.set_threads(spec["threads"])
    data = load_data(spec, CHECK_TRAIN, CHECK_TEST)
    return {"checks": [same_work(data, mode, spec["seed"], spec["width"], spec["set"]) for mode in spec["modes"]]}


def child(spec: dict) -> int:
    from astkit.errors import UserError

    try:
        common.emit(same_work_checks(spec) if spec.get("check") else worker(spec))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# -------------------------------------------------------------------- parent
def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="what to measure (default: both)")
    parser.add_argument("--rounds", type=positive, default=None,
                        help="baseline/astkit pairs per mode (default 2; --quick: 1)")
    parser.add_argument("--width", type=positive, default=None, help="ConvNet width (default 128; --quick: 8)")
    parser.add_argument("--threads", type=positive, default=None,
                        help="torch threads on both sides (default: torch's; --quick: 1)")
    parser.add_argument("--data-root", default=None,
                        help="Fashion-MNIST's folder (default: astkit's, /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--subset", type=positive, default=None,
                        help="train on the first N images only (default: all 60,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an astkit config key for astkit's side, e.g. allocator=system (repeatable)")
    parser.add_argument("--no-check", action="store_true", help="skip the same-work check before the measured runs")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is abandoned")
    parser.add_argument("--quick", action="store_true", help="random images, width 8, one round: seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(spec: dict, timeout: float | None) -> dict:
    result = common.run_child(SCRIPT, spec, timeout)
    if result.get("error") == "exit status 2":
        raise UserFailure
    return result


def pair_rows(modes, rounds, results) -> tuple[list, list]:
    """The table's rows and the per-mode summary (ratios of each baseline run and the astkit run after it)."""
    rows, summary = [], []
    for mode in modes:
        pairs = []
        for r in range(1, rounds + 1):
            base, ours = ([x for x in results if x["mode"] == mode and x["round"] == r and x["side"] == s][0]
                          for s in SIDES)
            if not (base.get("ok") and ours.get("ok")):
                rows.append([mode, str(r), "failed", base.get("error", "") or ours.get("error", ""), "", "", "", ""])
                continue
            speed = base["seconds_per_epoch"] / ours["seconds_per_epoch"]
            memory = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
            pairs.append({"round": r, "speedup": speed, "memory_ratio": memory})
            rows.append([mode, str(r), common.fmt(base["seconds_per_epoch"], ".2f"),
                         common.fmt(ours["seconds_per_epoch"], ".2f"), common.fmt(speed, ".2f"),
                         common.gib(base["peak_rss_bytes"]), common.gib(ours["peak_rss_bytes"]),
                         common.fmt(memory, ".2f")])
        summary.append({"mode": mode, "preset": PRESETS[mode], "pairs": pairs,
                        "speedup_median": common.median([p["speedup"] for p in pairs]),
                        "memory_ratio_median": common.median([p["memory_ratio"] for p in pairs])})
    return rows, summary


def report(checks: list, rows: list, width: int, args, command: str) -> None:
    print()
    print(f"Expert epoch, the reference loops (plain PyTorch) vs astkit's train_experts with the mtt / ast-reference "
          f"preset; ConvNet width {width} depth {DEPTH} instance norm on 1x28x28, batch {BATCH}, DSA; "
          f"{'random images' if args.quick else 'Fashion-MNIST'}; threads {args.threads or 'torch default'}")
    print(common.table(["mode", "round", "base s/ep", "astkit s/ep", "speed-up", "base GiB", "astkit GiB", "memory"],
                       rows))
    for c in checks:
        if c.get("ok"):
            print(f"same work ({c['mode']}, {c['steps']} steps): "
                  f"initial weights max diff {c['init_max_abs_diff']:.1e}, "
                  f"update max rel diff {c['update_rel_diff']:.2e} (baseline without DSA: "
                  f"{c['update_rel_diff_without_augmentation']:.2e}), parameters {c['param_rel_diff']:.2e}")
        else:
            print(f"same work check ({c.get('mode')}) failed: {c.get('error')}")
    print("speed-up: baseline s / astkit s of one pair (run one after the other); memory: astkit peak / baseline "
          "peak (each process's VmHWM); s/ep: one epoch with its test pass, snapshot and file")
    print(f"command: {command}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return child(json.loads(args._worker))
    width = args.width or (8 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)
    if args.quick and args.threads is None:
        args.threads = 1
    command = common.command_line()
    print(f"$ {command}", file=sys.stderr)
    base = {"width": width, "threads": args.threads, "seed": args.seed, "quick": args.quick,
            "data_root": args.data_root, "subset": args.subset, "set": args.set}
    checks, results = [], []
    try:
        if not args.no_check:
            print(f"same-work check ({', '.join(args.modes)}) ...", file=sys.stderr)
            found = run({**base, "modes": args.modes, "check": True}, args.timeout)
            checks = ([{**c, "ok": True} for c in found["checks"]] if found.get("ok")
                      else [{"mode": m, "ok": False, "error": found.get("error")} for m in args.modes])
        for mode in args.modes:
            for r in range(1, rounds + 1):
                for side in SIDES:
                    print(f"{mode} round {r}: {side} ...", file=sys.stderr)
                    results.append({**run({**base, "mode": mode, "side": side}, args.timeout), "round": r,
                                    "mode": mode, "side": side})
    except UserFailure:
        return 2
    rows, summary = pair_rows(args.modes, rounds, results)
    report(checks, rows, width, args, command)
    common.write_json(args.json, {
        "benchmark": "expert_equal_work", "command": command, "quick": args.quick,
        "settings": {"width": width, "depth": DEPTH, "batch_size": BATCH, "rounds": rounds, "threads": args.threads,
                     "seed": args.seed, "astkit_set": args.set, "modes": args.modes,
                     "presets": {m: PRESETS[m] for m in args.modes},
                     "reference": {m: REFERENCE[m] for m in args.modes}, "clip_ramp": CLIP_RAMP,
                     "penalty": {"coefficient": PENALTY_COEFFICIENT, "target": PENALTY_TARGET,
                                 "norm": "per pixel over channels", "inputs": "clean batch"},
                     "data": "random 1x28x28" if args.quick else "fashion-mnist", "data_root": args.data_root,
                     "subset": args.subset, "check_images": [CHECK_TRAIN, CHECK_TEST],
                     "baseline": "MTT buffer.py / the AST authors' buffer loop in plain PyTorch (MTT's ConvNet with "
                                 "nn.GroupNorm, DataLoader over a TensorDataset, epoch() with DSA; test pass, "
                                 "snapshot, torch.save)",
                     "astkit": "Engine(config, dataset).train_experts([0]) with the preset, experts.epochs=1"},
        "environment": common.environment(args.threads), "checks": checks, "results": results, "summary": summary,
    })
    ok = all(r.get("ok") for r in results) and all(c.get("ok") for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
