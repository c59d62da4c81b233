"""Speed and memory of one distillation iteration (stage 2), per configuration.

One iteration is what ``astkit.distill.Distiller.step`` does for the
gradient: ``unroll`` of ``syn_steps`` differentiable SGD steps of the student
(ConvNet, DSA with the default strategy, all ``ipc x 10`` images per step) from
a start vector, ``matching_loss`` against a target vector, and ``backward()``
to the images and the student lr. Images, start and target are random tensors
(speed does not depend on their values). The optimiser step, NaN checks and
expert loading of a real run are not included.

Each configuration runs in a fresh subprocess: seconds per iteration (median
of the timed iterations after warm-up), peak resident memory of that process,
FLOPs of one iteration (``torch.utils.flop_counter.FlopCounterMode``, which
follows the double backward and the segment recomputation) and the achieved
GFLOP/s. The ceiling is this CPU's fp32 GFLOP/s for one conv2d forward
(by default ``100x128x28x28``, ``128 -> 128``, 3x3), timed the same way.

    python benchmarks/distill_speed.py                      # the four reference configurations
    python benchmarks/distill_speed.py --configs 10x20 --threads 2 --json results/distill.json
    python benchmarks/distill_speed.py --configs 10x40 --segment 10
    python benchmarks/distill_speed.py --quick              # seconds: CI smoke test

A configuration is ``IPCxSYN_STEPS`` with an optional ``/SEGMENT`` (segment
recomputation every SEGMENT steps, ``astkit.matching.unroll(segment=...)``);
``--segment K`` sets it for every selected configuration (0 = full graph).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())

#: (ipc, syn_steps, segment): the issue's configurations; 10x80 needs recomputation to fit in 24 GiB.
DEFAULT_CONFIGS = ["10x20", "1x50", "10x40", "10x80/10"]
QUICK_CONFIGS = ["2x4", "1x6", "2x8/4"]
NUM_CLASSES, CHANNELS, IMAGE_SIZE, DEPTH, EXPERT_EPOCHS = 10, 1, 28, 3, 2
FLOP_METHOD = ("torch.utils.flop_counter.FlopCounterMode over one whole iteration (unroll + matching_loss + "
               "backward, double backward and segment recomputation included; counts convolution and matmul "
               "ops only: norms, activations, pooling and DSA are not counted)")


def parse_config(text: str) -> dict:
    """``"10x20"`` or ``"10x80/10"`` -> ``{ipc, syn_steps, segment}``."""
    body, _, seg = text.strip().partition("/")
    ipc, x, syn = body.lower().partition("x")
    try:
        if not x:
            raise ValueError
        config = {"ipc": int(ipc), "syn_steps": int(syn), "segment": int(seg) if seg else 0}
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}; write IPCxSYN_STEPS[/SEGMENT], e.g. 10x20 or 10x80/10")
    if config["ipc"] < 1 or config["syn_steps"] < 1 or config["segment"] < 0:
        raise argparse.ArgumentTypeError(f"bad configuration {text!r}: ipc and syn_steps must be >= 1, segment >= 0")
    return config


def config_name(c: dict) -> str:
    return f"{c['ipc']}x{c['syn_steps']}" + (f"/{c['segment']}" if c["segment"] else "")


# ------------------------------------------------------------------ children
def worker_iteration(spec: dict) -> dict:
    import torch

    threads = common.set_threads(spec["threads"])
    from astkit import allocator

    allocator.configure(spec.get("allocator", "system"))
    from astkit.augment import DSA
    from astkit.functional import FlatModel
    from astkit.matching import MatchPoint, matching_loss, unroll
    from astkit.models import build_model

    ipc, syn_steps, segment, width = spec["ipc"], spec["syn_steps"], spec["segment"], spec["width"]
    torch.manual_seed(spec["seed"])
    model = build_model("convnet", channels=CHANNELS, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE,
                        width=width, depth=DEPTH)
    student = FlatModel(model)
    n = ipc * NUM_CLASSES
    images = torch.randn(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).requires_grad_(True)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(ipc)
    lr = torch.tensor(0.01, requires_grad=True)
    start = student.initial()
    target = start + 0.01 * torch.randn_like(start)  # stands in for the expert at start + expert_epochs
    schedule = [MatchPoint(syn_steps, EXPERT_EPOCHS, 1.0)]  # MTT's default schedule
    targets = {EXPERT_EPOCHS: target}
    augment = DSA()  # astkit.augment.STRATEGY_DEFAULT, mode "single"
    generator = torch.Generator().manual_seed(spec["seed"])

    def iteration() -> float:
        # As Distiller.step: unroll from a fresh leaf copy of start, match, backward to images and lr.
        student_out = unroll(
            student, start.clone().requires_grad_(True), images, labels, lr, syn_steps,
            inner_weight=1.0, augment=augment, batch_syn=None, generator=generator, momentum=0.0,
            keep={p.student_step for p in schedule}, segment=segment,
        )
        loss, _ = matching_loss(student_out, start, targets, schedule)
        images.grad = None
        lr.grad = None
        loss.backward()
        return loss.item()

    forward_flops = None
    total_flops, by_op, method = None, {}, None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images.detach())
        forward_flops = counter.get_total_flops()
    except Exception:  # pragma: no cover - very old torch
        FlopCounterMode = None

    baseline = common.peak_memory()["rss_bytes"]
    times, warm, cpu_before = [], [], {}
    for i in range(spec["warmup"] + spec["iterations"]):
        if i == spec["warmup"]:
            cpu_before = common.cpu_times()
        count = FlopCounterMode is not None and spec["flops"] and i == 0
        t0 = time.perf_counter()
        if count:  # the first warm-up iteration also counts the FLOPs (it is not timed)
            with FlopCounterMode(display=False) as counter:
                loss = iteration()
            total_flops = counter.get_total_flops()
            by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
            method = FLOP_METHOD
        else:
            loss = iteration()
        elapsed = time.perf_counter() - t0
        (warm if i < spec["warmup"] else times).append(elapsed)
        print(f"  {config_name(spec)}: iteration {i + 1}/{spec['warmup'] + spec['iterations']} "
              f"{'(warm-up) ' if i < spec['warmup'] else ''}{elapsed:.2f} s, loss {loss:.4g}", file=sys.stderr)
    cpu = common.cpu_delta(cpu_before, common.cpu_times(), per=len(times))  # per timed iteration
    if spec["flops"] and total_flops is None and FlopCounterMode is not None:  # no warm-up: count afterwards
        with FlopCounterMode(display=False) as counter:
            iteration()
        total_flops = counter.get_total_flops()
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        method = FLOP_METHOD
    seconds = common.median(times)
    return {
        "kind": "iteration",
        "name": config_name(spec),
        "ipc": ipc,
        "syn_steps": syn_steps,
        "segment": segment,
        "width": width,
        "depth": DEPTH,
        "num_images": n,
        "num_params": int(start.numel()),
        "threads": threads,
        "torch": torch.__version__,
        "seconds_per_iteration": seconds,
        "seconds_min": min(times) if times else None,
        "seconds_all": times,
        "warmup_seconds": warm,
        "flops_per_iteration": total_flops,
        "flops_by_op": by_op,
        "flop_method": method,
        "forward_flops_per_step": forward_flops,
        "gflops_per_second": (total_flops / seconds / 1e9) if (total_flops and seconds) else None,
        **cpu,
        "baseline_rss_bytes": baseline,
        **common.peak_memory(),
    }


def worker_ceiling(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    threads = common.set_threads(spec["threads"])
    from astkit import allocator

    allocator.configure(spec.get("allocator", "system"))
    b, c, s = spec["batch"], spec["channels"], spec["size"]
    torch.manual_seed(0)
    x = torch.randn(b, c, s, s)
    w = torch.randn(c, c, 3, 3)
    bias = torch.randn(c)
    flops = 2 * b * c * s * s * c * 9  # multiply-adds x 2, stride 1, padding 1
    times = []
    with torch.no_grad():
        for _ in range(2):  # warm-up
            F.conv2d(x, w, bias, padding=1)
        spent = 0.0
        while len(times) < spec["min_reps"] or (spent < spec["seconds"] and len(times) < 1000):
            t0 = time.perf_counter()
            F.conv2d(x, w, bias, padding=1)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
    return {
        "kind": "ceiling",
        "op": f"conv2d forward fp32, input {b}x{c}x{s}x{s}, {c}->{c} 3x3, padding 1",
        "flops_per_call": flops,
        "reps": len(times),
        "seconds_median": common.median(times),
        "seconds_min": min(times),
        "gflops_per_second_best": flops / min(times) / 1e9,
        "gflops_per_second_median": flops / common.median(times) / 1e9,
        "threads": threads,
        "torch": torch.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        **common.peak_memory(),
    }


# -------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None,
                        help=f"IPCxSYN_STEPS[/SEGMENT] (default: {' '.join(DEFAULT_CONFIGS)}; --quick: {' '.join(QUICK_CONFIGS)})")
    parser.add_argument("--segment", type=int, default=None,
                        help="recompute every K steps in every selected configuration (0 = full graph)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default; --quick: 1)")
    parser.add_argument("--width", type=int, default=None, help="ConvNet width (default 128; --quick: 16)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per configuration (default 3; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first; the first one counts FLOPs (default 1)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the conv2d ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=None, help="time budget of the ceiling loop (default 5; --quick: 0.5)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a configuration is abandoned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=["system", "retain"], default="system",
                        help="astkit's allocator setting in each measured process (config key `allocator`)")
    parser.add_argument("--quick", action="store_true", help="width 16, tiny configurations, 2 iterations: a smoke test (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        import json

        spec = json.loads(args._worker)
        common.emit(worker_ceiling(spec) if spec["kind"] == "ceiling" else worker_iteration(spec))
        return 0

    if args.segment is not None and args.segment < 0:
        parser.error("--segment must be >= 0")
    width = args.width or (16 if args.quick else 128)
    if args.quick and args.threads is None:
        args.threads = 1  # a smoke test: one thread is steady on a shared machine
    iterations = args.iterations if args.iterations is not None else (2 if args.quick else 3)
    if iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    configs = args.configs or [parse_config(c) for c in (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)]
    if args.segment is not None:
        configs = [{**c, "segment": args.segment} for c in configs]
    command = common.command_line()
    print(f"$ {command}", file=sys.stderr)

    ceiling = None
    if args.ceiling:
        batch = 20 if args.quick else 100
        spec = {"kind": "ceiling", "batch": batch, "channels": width, "size": IMAGE_SIZE, "threads": args.threads,
                "allocator": args.allocator, "seconds": args.ceiling_seconds or (0.5 if args.quick else 5.0), "min_reps": 3}
        print(f"ceiling: conv2d {batch}x{width}x{IMAGE_SIZE}x{IMAGE_SIZE} ...", file=sys.stderr)
        ceiling = common.run_child(SCRIPT, spec, args.timeout)

    results = []
    for c in configs:
        spec = {"kind": "iteration", **c, "width": width, "threads": args.threads, "warmup": args.warmup,
                "iterations": iterations, "flops": args.flops, "seed": args.seed, "allocator": args.allocator}
        print(f"configuration {config_name(c)} (ipc {c['ipc']}, syn_steps {c['syn_steps']}, segment {c['segment']}, "
              f"width {width}) ...", file=sys.stderr)
        results.append(common.run_child(SCRIPT, spec, args.timeout))

    threads = next((r.get("threads") for r in [ceiling or {}, *results] if r.get("threads")), None)
    best = ceiling.get("gflops_per_second_best") if ceiling and ceiling.get("ok") else None
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append([config_name(r), str(r["ipc"]), str(r["syn_steps"]), str(r["segment"]), "failed: " + r["error"],
                         "", "", "", "", "", "", ""])
            continue
        gfs = r["gflops_per_second"]
        rows.append([
            r["name"], str(r["ipc"]), str(r["syn_steps"]), str(r["segment"]),
            common.fmt(r["seconds_per_iteration"], ".3f"), common.fmt(r["seconds_min"], ".3f"),
            common.gib(r["peak_rss_bytes"]),
            common.fmt(r["flops_per_iteration"] / 1e9 if r["flops_per_iteration"] else None, ".1f"),
            common.fmt(gfs, ".1f"),
            common.fmt(100 * gfs / best if gfs and best else None, ".0f"),
            common.fmt(r.get("cpu_user_seconds"), ".2f"), common.fmt(r.get("cpu_system_seconds"), ".2f"),
        ])
    print()
    print(f"Distillation iteration, ConvNet width {width} depth {DEPTH}, {CHANNELS}x{IMAGE_SIZE}x{IMAGE_SIZE} "
          f"images, {NUM_CLASSES} classes, DSA default strategy; {threads} torch threads; allocator {args.allocator}; "
          f"median of {iterations} timed iteration(s) after {args.warmup} warm-up")
    print(common.table(["config", "ipc", "syn", "segment", "s/iter", "min s", "peak GiB", "GFLOP/iter", "GFLOP/s",
                        "% ceil", "user s", "sys s"], rows))
    if ceiling:
        if ceiling.get("ok"):
            print(f"ceiling: {ceiling['op']}: {ceiling['gflops_per_second_best']:.1f} GFLOP/s best, "
                  f"{ceiling['gflops_per_second_median']:.1f} median ({ceiling['reps']} reps)")
        else:
            print(f"ceiling: failed: {ceiling['error']}")
    print(f"FLOPs: {FLOP_METHOD if args.flops else 'not counted (--no-flops)'}")
    loads = [r["load_average_1_5_15"][0] for r in results if r.get("ok") and r.get("load_average_1_5_15")]
    if loads:
        print(f"1-min load average at the end of each configuration: {', '.join(f'{v:.2f}' for v in loads)} "
              f"(on {common.os.cpu_count()} CPUs; other work on the cores makes the times noisy)")
    print("user s / sys s: CPU seconds of the process per timed iteration (all threads)")
    print("peak GiB: VmHWM of the configuration's own process (torch, model, data and the iteration's graph)")
    print(f"command: {command}")

    payload = {
        "benchmark": "distill_speed",
        "command": command,
        "quick": args.quick,
        "settings": {"width": width, "depth": DEPTH, "channels": CHANNELS, "image_size": IMAGE_SIZE,
                     "num_classes": NUM_CLASSES, "iterations": iterations, "warmup": args.warmup,
                     "threads": args.threads, "seed": args.seed, "allocator": args.allocator, "augment": "DSA default strategy, mode single",
                     "flop_method": FLOP_METHOD if args.flops else None},
        "environment": common.environment(threads),
        "ceiling": ceiling,
        "results": results,
    }
    common.write_json(args.json, payload)
    return 0 if all(r.get("ok") for r in results) and (ceiling is None or ceiling.get("ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
