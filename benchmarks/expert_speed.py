"""Speed and memory of expert training (stage 1) and of evaluating one network (stage 3).

Modes, each in a fresh subprocess (so that peak memory does not mix):

``plain``           MTT's expert: SGD lr 0.01, no momentum, batch 256, DSA, cross-entropy.
``smooth``          AST's smooth expert: the ``smooth-experts`` plugin (clipping + gradient
                    penalty, ``--variant``, default the paper's) with ``experts.momentum=0.9``.
``smooth-fraction`` the same with ``smooth-experts.penalty_fraction`` (``--penalty-fraction``,
                    default 0.25): the penalty estimated on a random part of each batch.
``evaluate``        ``Engine.evaluate`` of one fresh network (``astkit.evaluate.train_on_synthetic``)
                    on 100 real images (10 per class) for ``--eval-epochs`` epochs (default 1000),
                    then its test accuracy.

Expert modes run ``Engine.train_experts(indices=[0])`` with ``experts.epochs = --epochs``
(default 1) on the whole train set (Fashion-MNIST: 60,000 images), into a temporary
folder; seconds per epoch include DSA, the per-epoch test-set accuracy (its time
is also reported alone) and the snapshot, as a real run does. Loading the data
is timed separately and not included.

    python benchmarks/expert_speed.py                                 # Fashion-MNIST, all modes
    python benchmarks/expert_speed.py --modes plain smooth --threads 2 --json results/experts.json
    python benchmarks/expert_speed.py --quick                         # digits, width 16: seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
MODES = ("plain", "smooth", "smooth-fraction", "evaluate")
EXPERT_MODES = MODES[:3]


# ------------------------------------------------------------------ children
def _engine(spec: dict, out: str, extra: list[str], plugins: list[str]):
    import dataclasses

    import torch

    from astkit import Engine
    from astkit.config import RunConfig
    from astkit.data import load_dataset

    overrides = [
        f"seed={spec['seed']}",
        f"allocator={spec.get('allocator', 'system')}",
        f"data.dataset={spec['dataset']}",
        f"out={out}",
        "device=cpu",
        *([f"model.width={spec['width']}"] if spec["width"] else []),
        *extra,
    ]
    config = RunConfig.load(overrides=overrides)
    config.plugins = list(plugins)
    t0 = time.perf_counter()
    dataset = load_dataset(spec["dataset"], spec.get("data_root"))
    generator = torch.Generator().manual_seed(spec["seed"])
    if spec["subset"] and spec["subset"] < dataset.train_images.shape[0]:
        keep = torch.randperm(dataset.train_images.shape[0], generator=generator)[: spec["subset"]].sort().values
        dataset = dataclasses.replace(dataset, train_images=dataset.train_images[keep].contiguous(),
                                      train_labels=dataset.train_labels[keep].contiguous())
    if spec["test_subset"] and spec["test_subset"] < dataset.test_images.shape[0]:
        keep = torch.randperm(dataset.test_images.shape[0], generator=generator)[: spec["test_subset"]].sort().values
        dataset = dataclasses.replace(dataset, test_images=dataset.test_images[keep].contiguous(),
                                      test_labels=dataset.test_labels[keep].contiguous())
    load_seconds = time.perf_counter() - t0
    # The first torch.optim optimiser imports torch._dynamo (about 2 s, once per process): pay it here.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return Engine(config, dataset=dataset, progress=_Clock()), load_seconds


def _clock_class():
    from astkit.progress import Progress

    class Clock(Progress):
        """Timestamps of the engine's progress calls (one ``advance`` per expert epoch)."""

        def __init__(self):
            self.marks: dict[str, list[float]] = {}

        def start(self, task, description, total):
            self.marks[task] = [time.perf_counter()]

        def advance(self, task, steps=1, **fields):
            self.marks.setdefault(task, []).append(time.perf_counter())

    return Clock


def _Clock():  # noqa: N802 - a factory that imports astkit lazily
    return _clock_class()()


def worker_expert(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    from astkit.experts import accuracy

    mode = spec["mode"]
    extra = ["experts.num_experts=1", f"experts.epochs={spec['epochs']}"]
    plugins: list[str] = []
    if mode != "plain":
        plugins = ["smooth-experts"]
        extra += ["experts.momentum=0.9", f"smooth-experts.variant={spec['variant']}",
                  "smooth-experts.clipping=true", "smooth-experts.penalty=true",
                  f"smooth-experts.penalty_fraction={spec['penalty_fraction'] if mode == 'smooth-fraction' else 1.0}"]
    with tempfile.TemporaryDirectory(prefix="astkit-bench-") as out:
        engine, load_seconds = _engine(spec, out, extra, plugins)
        ds = engine.dataset
        spec_model = engine.model_spec
        baseline = common.peak_memory()["rss_bytes"]
        cpu_before = common.cpu_times()
        t0 = time.perf_counter()
        trajectories = engine.train_experts(indices=[0])
        total = time.perf_counter() - t0
        cpu = common.cpu_delta(cpu_before, common.cpu_times(), per=spec["epochs"])  # per epoch
        marks = engine.progress.marks.get("expert", [])
        epoch_seconds = [b - a for a, b in zip(marks, marks[1:])]
        # The per-epoch test pass, alone (it is inside every epoch above).
        torch.manual_seed(spec["seed"])
        model = spec_model.build(engine.models)
        accuracy(model, ds.test_images[:1024], ds.test_labels[:1024])  # warm-up
        t1 = time.perf_counter()
        accuracy(model, ds.test_images, ds.test_labels)
        test_seconds = time.perf_counter() - t1
        smooth = engine.config.plugin("smooth-experts") if plugins else None
    later = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    per_epoch = common.median(later) if later else total / spec["epochs"]
    e = engine.config.experts
    return {
        "kind": "expert",
        "mode": mode,
        "dataset": ds.name,
        "num_train": int(ds.train_images.shape[0]),
        "num_test": int(ds.test_images.shape[0]),
        "model": spec_model.to_json(),
        "threads": threads,
        "torch": torch.__version__,
        "epochs": spec["epochs"],
        "optimizer": {"name": e.optimizer, "lr": e.lr, "momentum": e.momentum, "batch_size": e.batch_size},
        "plugins": plugins,
        "smooth_experts": smooth,
        "seconds_per_epoch": per_epoch,
        "epoch_seconds": epoch_seconds,
        "total_seconds": total,
        "test_pass_seconds": test_seconds,
        "images_per_second": int(ds.train_images.shape[0]) / per_epoch if per_epoch else None,
        "load_seconds": load_seconds,
        "final_test_accuracy": trajectories[0].test_accuracy[-1],
        **cpu,
        "baseline_rss_bytes": baseline,
        **common.peak_memory(),
    }


def worker_evaluate(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    extra = ["evaluate.num_nets=1", f"evaluate.epochs={spec['eval_epochs']}"]
    with tempfile.TemporaryDirectory(prefix="astkit-bench-") as out:
        engine, load_seconds = _engine(spec, out, extra, [])
        distilled = engine.real_subset(spec["eval_ipc"], lr=0.01)
        baseline = common.peak_memory()["rss_bytes"]
        cpu_before = common.cpu_times()
        t0 = time.perf_counter()
        result = engine.evaluate(distilled)
        seconds = time.perf_counter() - t0
        cpu = common.cpu_delta(cpu_before, common.cpu_times())  # the whole network
    arch = next(iter(result.architectures.values()))
    return {
        "kind": "evaluate",
        "mode": "evaluate",
        "dataset": engine.dataset.name,
        "num_images": int(distilled.images.shape[0]),
        "num_test": int(engine.dataset.test_images.shape[0]),
        "model": engine.model_spec.to_json(),
        "threads": threads,
        "torch": torch.__version__,
        "epochs": spec["eval_epochs"],
        "seconds_per_network": seconds,
        "seconds_per_epoch": seconds / spec["eval_epochs"],
        "load_seconds": load_seconds,
        "final_test_accuracy": arch.accuracies[0],
        **cpu,
        "baseline_rss_bytes": baseline,
        **common.peak_memory(),
    }


# -------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to measure (default: all)")
    parser.add_argument("--dataset", default=None, help="dataset name (default fashion-mnist; --quick: digits)")
    parser.add_argument("--data-root", default=None, help="the dataset's folder (default: astkit's default place)")
    parser.add_argument("--subset", type=int, default=None, help="use only N random train images (default: all)")
    parser.add_argument("--test-subset", type=int, default=None, help="use only N random test images (default: all)")
    parser.add_argument("--width", type=int, default=None, help="ConvNet width (default: the model's, 128; --quick: 16)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="expert epochs per mode; with more than one, the first is dropped from the median (default 1)")
    parser.add_argument("--variant", choices=("paper", "reference"), default="paper", help="smooth-experts variant (default paper)")
    parser.add_argument("--penalty-fraction", type=float, default=0.25, help="for the smooth-fraction mode (default 0.25)")
    parser.add_argument("--eval-epochs", type=int, default=None, help="epochs of the evaluated network (default 1000; --quick: 20)")
    parser.add_argument("--eval-ipc", type=int, default=10, help="images per class of the evaluated set (default 10: 100 images)")
    parser.add_argument("--allocator", choices=["system", "retain"], default="system",
                        help="astkit's allocator setting (config key `allocator`) in each measured process")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default; --quick: 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a mode is abandoned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="digits, width 16, 20 evaluation epochs: a smoke test (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        import json

        spec = json.loads(args._worker)
        common.emit(worker_evaluate(spec) if spec["mode"] == "evaluate" else worker_expert(spec))
        return 0

    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not 0 < args.penalty_fraction <= 1:
        parser.error("--penalty-fraction must be in (0, 1]")
    dataset = args.dataset or ("digits" if args.quick else "fashion-mnist")
    width = args.width or (16 if args.quick else None)
    eval_epochs = args.eval_epochs or (20 if args.quick else 1000)
    if args.quick and args.threads is None:
        args.threads = 1  # a smoke test: one thread is steady on a shared machine
    command = common.command_line()
    print(f"$ {command}", file=sys.stderr)

    results = []
    for mode in args.modes:
        spec = {"mode": mode, "dataset": dataset, "data_root": args.data_root, "subset": args.subset,
                "test_subset": args.test_subset, "width": width, "epochs": args.epochs, "variant": args.variant,
                "penalty_fraction": args.penalty_fraction, "eval_epochs": eval_epochs, "eval_ipc": args.eval_ipc,
                "threads": args.threads, "seed": args.seed, "allocator": args.allocator}
        print(f"mode {mode} on {dataset} ...", file=sys.stderr)
        r = common.run_child(SCRIPT, spec, args.timeout)
        if r.get("ok"):
            what = (f"{r['seconds_per_epoch']:.2f} s/epoch" if mode != "evaluate"
                    else f"{r['seconds_per_network']:.2f} s/network")
            print(f"  {mode}: {what}, peak {common.gib(r['peak_rss_bytes'])} GiB", file=sys.stderr)
        results.append(r)

    threads = next((r.get("threads") for r in results if r.get("threads")), None)
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append([r["mode"], "failed: " + r["error"], "", "", "", "", "", ""])
        elif r["mode"] == "evaluate":
            rows.append([r["mode"], f"{r['seconds_per_network']:.2f} s/network ({r['epochs']} epochs, "
                         f"{r['num_images']} images)", "-", "-", common.gib(r["peak_rss_bytes"]),
                         f"{r['final_test_accuracy']:.3f}", common.fmt(r.get("cpu_user_seconds")),
                         common.fmt(r.get("cpu_system_seconds"))])
        else:
            rows.append([r["mode"], f"{r['seconds_per_epoch']:.2f} s/epoch", f"{r['test_pass_seconds']:.2f}",
                         f"{r['images_per_second']:.0f}", common.gib(r["peak_rss_bytes"]),
                         f"{r['final_test_accuracy']:.3f}", common.fmt(r.get("cpu_user_seconds")),
                         common.fmt(r.get("cpu_system_seconds"))])
    ok = [r for r in results if r.get("ok")]
    example = ok[0] if ok else {}
    print()
    print(f"Expert training and evaluation on {dataset}"
          + (f" ({example.get('num_train', '?')} train / {example.get('num_test', '?')} test images)" if example else "")
          + f", model {example.get('model', {}).get('options', {}) or 'default options'}; {threads} torch threads")
    print(common.table(["mode", "time", "test pass s", "train img/s", "peak GiB", "test acc", "user s",
                        "sys s"], rows))
    smooth = next((r for r in ok if r["mode"] == "smooth"), None)
    plain = next((r for r in ok if r["mode"] == "plain"), None)
    if smooth and plain:
        print(f"smooth / plain epoch time: {smooth['seconds_per_epoch'] / plain['seconds_per_epoch']:.2f}x")
    loads = [r["load_average_1_5_15"][0] for r in ok if r.get("load_average_1_5_15")]
    if loads:
        print(f"1-min load average at the end of each mode: {', '.join(f'{v:.2f}' for v in loads)} "
              f"(on {common.os.cpu_count()} CPUs; other work on the cores makes the times noisy)")
    print("user s / sys s: CPU seconds of the process per expert epoch, or for the whole evaluated network")
    print("peak GiB: VmHWM of the mode's own process (torch, the dataset, the model and training)")
    print(f"command: {command}")

    payload = {
        "benchmark": "expert_speed",
        "command": command,
        "quick": args.quick,
        "settings": {"dataset": dataset, "subset": args.subset, "test_subset": args.test_subset, "width": width,
                     "epochs": args.epochs, "variant": args.variant, "penalty_fraction": args.penalty_fraction,
                     "eval_epochs": eval_epochs, "eval_ipc": args.eval_ipc, "threads": args.threads,
                     "seed": args.seed, "allocator": args.allocator},
        "environment": common.environment(threads),
        "results": results,
    }
    common.write_json(args.json, payload)
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
