"""AST's claims on real Fashion-MNIST, at a scale that fits a 2-core CPU.

Regenerates the tables of docs/results.md (section "Reproduction on
Fashion-MNIST") from scratch, in resumable stages:

1. ``experts``: six expert sets trained on the full train set (Table VII):
   SGD, SGD + momentum, and SGD + momentum with the smooth-experts plugin
   (clipping + penalty, penalty alone, clipping alone, and clipping + the
   penalty estimated on a quarter of each batch).
2. ``distill``: distillation runs, each from one expert set (every set is
   trained once and reused): Table VII's six (MTT's distillation on each
   set), Table VIII's cumulative ablation on smooth experts, AST against
   MTT at ipc 1, and both methods again at a smaller image learning rate
   and with the image gradient clipped. Every run evaluates itself every
   ``eval_every`` iterations (accuracy against iterations, paper Fig. 6).
3. ``baselines``: a random real subset and a K-Means real subset (the
   representative-init images, no distillation) at ipc 1 and 10, evaluated
   with the same protocol.
4. ``report``: one JSON with every number and the protocol, and the Markdown
   tables.

Each stage skips what is already done and resumes what was cut (experts
train only the missing files; a distillation continues from its checkpoint),
so a stage can be stopped at any moment and run again.

    python benchmarks/reproduce_fmnist.py                   # everything (a few hours on 2 cores)
    python benchmarks/reproduce_fmnist.py --stage experts   # one stage
    python benchmarks/reproduce_fmnist.py --only table7-sgd table7-momentum   # some runs of a stage
    python benchmarks/reproduce_fmnist.py --stage report --json benchmarks/results/reproduce_fmnist.json
    python benchmarks/reproduce_fmnist.py --stage report --json new.json --previous benchmarks/results/reproduce_fmnist.json
    python benchmarks/reproduce_fmnist.py --quick           # digits, tiny: a smoke test of every stage
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

#: The CPU protocol (``--quick`` overrides it with QUICK). Written down in docs/results.md.
PROTOCOL = {
    "data": {"dataset": "fashion-mnist"},
    "model": {"name": "convnet", "width": 32},
    "experts": {"num_experts": 3, "epochs": 6, "lr": 0.01, "batch_size": 256, "weight_decay": 0.0},
    "distill": {"ipc": 10, "iterations": 300, "syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 4,
                "lr_img": 100.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 25, "eval_every": 50},
    "evaluate": {"epochs": 300, "num_nets": 3},
}
#: A larger protocol for one GPU (``--scale gpu``, used by benchmarks/gpu_fmnist.sh): the paper's
#: width 128 and evaluation length, more iterations; only the runs of the AST-vs-MTT table.
GPU = {
    "data": {"dataset": "fashion-mnist"},
    "model": {"name": "convnet", "width": 128},
    "experts": {"num_experts": 4, "epochs": 12, "lr": 0.01, "batch_size": 256, "weight_decay": 0.0},
    "distill": {"ipc": 10, "iterations": 500, "syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 8,
                "lr_img": 100.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 50, "eval_every": 100},
    "evaluate": {"epochs": 1000, "num_nets": 3},
}
GPU_EXPERT_SETS = ["sgd", "smooth"]
GPU_RUNS = ["table7-sgd", "table8-4-weight-perturbation", "mtt-ipc1", "ast-ipc1"]
QUICK = {
    "data": {"dataset": "digits"},
    "model": {"name": "convnet", "width": 8},
    "experts": {"num_experts": 1, "epochs": 2, "lr": 0.01, "batch_size": 256, "weight_decay": 0.0},
    "distill": {"ipc": 2, "iterations": 2, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2,
                "lr_img": 10.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 1, "eval_every": 1},
    "evaluate": {"epochs": 2, "num_nets": 2},
}

SMOOTH = "smooth-experts"
#: Expert sets: plugins and overrides on top of the protocol (Table VII's rows).
EXPERT_SETS = {
    "sgd": {"plugins": [], "experts": {"momentum": 0.0}},
    "momentum": {"plugins": [], "experts": {"momentum": 0.9}},
    "smooth": {"plugins": [SMOOTH], "experts": {"momentum": 0.9}},
    "penalty": {"plugins": [SMOOTH], "experts": {"momentum": 0.9}, "options": {SMOOTH: {"clipping": False}}},
    "clipping": {"plugins": [SMOOTH], "experts": {"momentum": 0.9}, "options": {SMOOTH: {"penalty": False}}},
    # The cheaper, unbiased penalty estimate (on a random quarter of each batch): its effect on the teacher.
    "smooth-subsampled": {"plugins": [SMOOTH], "experts": {"momentum": 0.9},
                          "options": {SMOOTH: {"penalty_fraction": 0.25}}},
}
#: The second image learning rate both MTT and AST are run at (ipc 10), beside the protocol's.
LR_IMG_LOW = 30.0
#: The image-gradient norm both are clipped to in the clip-image-grad runs, fixed from AST's median (0.0025) and
#: MTT's largest norm in the first 107 iterations of lr-img-30-mtt (0.011), far below AST's spikes (0.2 to 1.1).
CLIP_IMAGE_GRAD = 0.02
AST_STAGE2 = ["representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]
#: MTT and AST as distillation runs: the expert set and the stage-2 plugins of each.
METHODS = {"mtt": {"experts": "sgd", "plugins": []}, "ast": {"experts": "smooth", "plugins": AST_STAGE2}}
#: Both methods again at ipc 10, tuned alike (run name prefix: label, distill overrides): is AST's deficit the
#: image lr they share, or the image-gradient spikes (clipped here; neither method clips)?
TUNED = {
    f"lr-img-{LR_IMG_LOW:g}": (f"lr_img {LR_IMG_LOW:g}", {"lr_img": LR_IMG_LOW}),
    "clip-image-grad": (f"image gradient clipped to {CLIP_IMAGE_GRAD:g}", {"clip_image_grad": CLIP_IMAGE_GRAD}),
}
#: Distillation runs: the expert set they use, their stage-2 plugins, overrides.
RUNS = {
    **{f"table7-{name}": {"experts": name, "plugins": []} for name in EXPERT_SETS},
    **{f"table8-{i}-{AST_STAGE2[i - 1]}": {"experts": "smooth", "plugins": AST_STAGE2[:i]} for i in range(1, 5)},
    "mtt-ipc1": {"experts": "sgd", "plugins": [], "distill": {"ipc": 1}},
    "ast-ipc1": {"experts": "smooth", "plugins": AST_STAGE2, "distill": {"ipc": 1}},
    **{f"{prefix}-{method}": {**spec, "distill": overrides}
       for prefix, (_, overrides) in TUNED.items() for method, spec in METHODS.items()},
}
#: Which run is which row of the AST-vs-MTT table (ipc 10 rows are shared with tables VII and VIII).
AST_VS_MTT = {("mtt", 10): "table7-sgd", ("ast", 10): "table8-4-weight-perturbation",
              ("mtt", 1): "mtt-ipc1", ("ast", 1): "ast-ipc1"}
STAGES = ["experts", "distill", "baselines", "report"]


def build_config(protocol: dict, out: Path, plugins: list[str], seed: int, sections: dict | None = None,
                 options: dict | None = None):
    from astkit import RunConfig

    data = copy.deepcopy({k: v for k, v in protocol.items() if k != "defaults"})
    for key, values in (sections or {}).items():
        data.setdefault(key, {}).update(values)
    data.update(out=str(out), plugins=list(plugins), seed=seed, options=copy.deepcopy(options or {}),
                **protocol.get("defaults", {}))
    return RunConfig.from_dict(data)


def expert_config(protocol: dict, work: Path, name: str, seed: int):
    spec = EXPERT_SETS[name]
    return build_config(protocol, work / "experts" / name, spec["plugins"], seed,
                        {"experts": spec["experts"]}, spec.get("options"))


def run_config(protocol: dict, work: Path, name: str, seed: int):
    from astkit import RunFolder

    spec = RUNS[name]
    experts_dir = RunFolder(work / "experts" / spec["experts"]).experts
    sections = {"experts": {"dir": str(experts_dir), **EXPERT_SETS[spec["experts"]]["experts"]},
                "distill": spec.get("distill", {})}
    return build_config(protocol, work / "runs" / name, spec["plugins"], seed, sections)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------ stages
def stage_experts(protocol: dict, work: Path, seed: int, only: list[str]) -> None:
    from astkit import Engine

    for name in only or list(EXPERT_SETS):
        done = work / "experts" / name / "summary.json"
        if done.is_file():
            log(f"experts {name}: done")
            continue
        engine = Engine(expert_config(protocol, work, name, seed))
        n = engine.config.experts.num_experts
        log(f"experts {name}: training {len(engine.folder.missing_experts(range(n)))} of {n}")
        t0 = time.perf_counter()
        engine.train_experts(resume=True)
        experts = engine.load_experts()
        save_json(done, {
            "set": name, "plugins": engine.config.plugins, "experts": EXPERT_SETS[name]["experts"],
            "options": EXPERT_SETS[name].get("options", {}),
            "avg_var": [t.avg_var for t in experts],
            "test_accuracy": [t.test_accuracy[-1] for t in experts],
            "test_accuracy_per_epoch": [t.test_accuracy for t in experts],
            "seconds_this_session": time.perf_counter() - t0,
        })
        log(f"experts {name}: Avg_Var {_mean([t.avg_var for t in experts]):.4g}, "
            f"test acc {_mean([t.test_accuracy[-1] for t in experts]):.4f}")


def stage_distill(protocol: dict, work: Path, seed: int, only: list[str]) -> None:
    from astkit import Engine
    from astkit.metrics_log import MetricsLog

    for name in only or list(RUNS):
        done = work / "runs" / name / "summary.json"
        if done.is_file():
            log(f"distill {name}: done")
            continue
        engine = Engine(run_config(protocol, work, name, seed))
        checkpoint = engine.folder.checkpoint
        log(f"distill {name}: {'resuming' if checkpoint.is_file() else 'starting'} "
            f"(plugins: {', '.join(engine.config.plugins) or 'none'})")
        t0 = time.perf_counter()
        distilled = engine.distill(engine.load_experts(), resume=checkpoint.is_file())
        result = engine.evaluate(distilled)
        curve = MetricsLog(engine.folder.metrics).records()
        curve = [(r["iteration"], r["architectures"]["convnet"]["mean"]) for r in curve if r["event"] == "evaluation"]
        save_json(done, {
            "run": name, **RUNS[name], "ipc": engine.config.distill.ipc, "learned_lr": distilled.lr,
            "final": result.to_json()["architectures"]["convnet"],
            "accuracy_vs_iteration": curve + [(distilled.iteration, result["convnet"].mean)],
            "seconds_this_session": time.perf_counter() - t0,
        })
        log(f"distill {name}: {result['convnet'].mean:.4f} ± {result['convnet'].std:.4f}")


def stage_baselines(protocol: dict, work: Path, seed: int, only: list[str]) -> None:
    import torch

    from astkit import DistilledSet, Engine, RunFolder

    done = work / "baselines.json"
    results = json.loads(done.read_text()) if done.is_file() else {}
    for ipc in (1, 10) if not only else [int(i) for i in only]:
        ast = work / "runs" / AST_VS_MTT[("ast", ipc)] / "summary.json"
        learned = json.loads(ast.read_text())["learned_lr"] if ast.is_file() else None
        for kind in ("random", "kmeans", "random-ast-lr"):
            key = f"{kind}-ipc{ipc}"
            if key in results:
                log(f"baseline {key}: done")
                continue
            if kind == "random-ast-lr" and learned is None:
                log(f"baseline {key}: skipped until the AST run at ipc {ipc} exists")
                continue
            plugins = ["representative-init"] if kind == "kmeans" else []
            config = build_config(protocol, work / "baselines" / key, plugins, seed,
                                  {"distill": {"ipc": ipc}, "experts": {"dir": str(RunFolder(work / "experts" / "smooth").experts)}})
            engine = Engine(config)
            if kind == "random":
                subset = engine.real_subset(ipc)
            elif kind == "random-ast-lr":  # the same images, given the lr AST learned: a baseline at its best
                subset = engine.real_subset(ipc, lr=learned)
            else:
                images, labels = engine.init_synthetic(engine.load_experts(), torch.Generator().manual_seed(seed))
                subset = DistilledSet(images, labels, config.distill.lr_teacher, 0,
                                      {**engine.metadata(), "origin": "K-Means real subset"})
            result = engine.evaluate(subset)["convnet"]
            results[key] = {"kind": kind, "ipc": ipc, "lr": subset.lr, **result.to_json()}
            save_json(done, results)
            log(f"baseline {key}: {result.mean:.4f} ± {result.std:.4f}")


def stage_report(protocol: dict, work: Path, json_path: Path | None, previous: Path | None = None) -> dict:
    """Gather every stage's results; with ``previous``, an earlier report fills what this work dir lacks."""
    from astkit import RunFolder

    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    experts = {n: read(work / "experts" / n / "summary.json") for n in EXPERT_SETS}
    runs = {n: read(work / "runs" / n / "summary.json") for n in RUNS}
    for name, run in runs.items():
        if run is not None and "image_grad_norm" not in run:
            clip = RUNS[name].get("distill", {}).get("clip_image_grad")
            spikes = image_grad_norms(RunFolder(work / "runs" / name).metrics, clip)
            if spikes:
                run["image_grad_norm"] = spikes
    baselines = read(work / "baselines.json") or {}
    carried = []
    if previous is not None:
        try:
            earlier = json.loads(previous.read_text())
            earlier = {key: earlier[key] for key in ("protocol", "experts", "distill", "baselines")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--previous {previous}: not a report JSON of this script ({err!r})") from None
        if earlier["protocol"] != protocol:
            raise SystemExit(f"--previous {previous}: its protocol differs from this one; not merging")
        for section, mine in (("experts", experts), ("distill", runs), ("baselines", baselines)):
            for name, value in earlier[section].items():
                if mine.get(name) is None and value is not None and (section == "baselines" or name in mine):
                    mine[name] = value
                    carried.append(f"{section}/{name}")
    report = {
        "benchmark": "reproduce_fmnist", "protocol": protocol, "expert_sets": EXPERT_SETS, "runs": RUNS,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {"python": platform.python_version(), "platform": platform.platform()},
        "experts": experts, "distill": runs, "baselines": baselines, "carried_from_previous": carried,
        "missing": [f"experts/{n}" for n, v in experts.items() if v is None]
                   + [f"runs/{n}" for n, v in runs.items() if v is None],
    }
    if json_path is not None:
        save_json(json_path, report)
    print(markdown(report))
    return report


def image_grad_norms(metrics: Path, clip: float | None = None) -> dict | None:
    """The median and the largest norm of the image gradient over a run, from its metrics.jsonl.

    With ``clip``, also in how many iterations the (logged, unclipped) norm exceeded it.
    """
    if not metrics.is_file():
        return None
    from astkit.metrics_log import MetricsLog

    rows = MetricsLog(metrics).records()
    rows = [r for r in rows if r["event"] == "iteration" and r.get("grad_norm") is not None]  # null: NaN
    if not rows:
        return None
    norms = sorted(r["grad_norm"] for r in rows)
    top = max(rows, key=lambda r: r["grad_norm"])
    return {"median": norms[len(norms) // 2], "max": top["grad_norm"], "max_iteration": top["iteration"],
            "max_start_epoch": top["start_epoch"], "iterations": len(rows),
            **({"above_clip": sum(n > clip for n in norms)} if clip is not None else {})}


# ------------------------------------------------------------------ tables
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _acc(run: dict | None) -> str:
    if run is None:
        return "not run"
    final = run["final"] if "final" in run else run
    return f"{100 * final['mean']:.2f} ± {100 * final['std']:.2f}"


def markdown(report: dict) -> str:
    experts, runs, baselines = report["experts"], report["distill"], report["baselines"]
    lines = ["Table VII shape (ipc 10; experts' mean over the set, distilled mean ± std over the evaluation nets)", "",
             "| experts | Avg_Var | expert test acc (%) | distilled acc (%) |", "|---|---|---|---|"]
    labels = {"sgd": "SGD", "momentum": "SGD + momentum", "smooth": "SGD + momentum + penalty + clipping",
              "penalty": "SGD + momentum + penalty", "clipping": "SGD + momentum + clipping",
              "smooth-subsampled": "SGD + momentum + penalty on 1/4 of each batch + clipping"}
    for name, label in labels.items():
        e = experts.get(name)
        avg_var = f"{_mean(e['avg_var']):.4g}" if e else "not run"
        acc = f"{100 * _mean(e['test_accuracy']):.2f}" if e else "not run"
        lines.append(f"| {label} | {avg_var} | {acc} | {_acc(runs.get(f'table7-{name}'))} |")
    lines += ["", "Table VIII shape (smooth experts, ipc 10, cumulative)", "", "| stage-2 techniques | acc (%) |", "|---|---|",
              f"| none (smooth experts only) | {_acc(runs.get('table7-smooth'))} |"]
    for i, plugin in enumerate(AST_STAGE2, 1):
        lines.append(f"| + {plugin} | {_acc(runs.get(f'table8-{i}-{plugin}'))} |")
    lines += ["", "AST against MTT and real subsets (mean ± std over the evaluation nets)", "",
              "| ipc | random real | random real, AST's lr | K-Means real | MTT | AST |", "|---|---|---|---|---|---|"]
    for ipc in (1, 10):
        lines.append(f"| {ipc} | {_acc(baselines.get(f'random-ipc{ipc}'))} | {_acc(baselines.get(f'random-ast-lr-ipc{ipc}'))} "
                     f"| {_acc(baselines.get(f'kmeans-ipc{ipc}'))} "
                     f"| {_acc(runs.get(AST_VS_MTT[('mtt', ipc)]))} | {_acc(runs.get(AST_VS_MTT[('ast', ipc)]))} |")
    full = [_mean(e["test_accuracy"]) for e in experts.values() if e]
    if full:
        lines.append(f"\nFull training set, same ConvNet (best expert set's mean final test accuracy): {100 * max(full):.2f} %")
    lines += ["", "Accuracy against iterations (%, ipc 10; the Table VIII chain and the tuned runs show where a curve turns)", ""]
    curves = [("MTT", AST_VS_MTT[("mtt", 10)]), ("smooth experts, no stage-2 technique", "table7-smooth")]
    curves += [(f"+ {plugin}" + (" (AST)" if i == len(AST_STAGE2) else ""), f"table8-{i}-{plugin}")
               for i, plugin in enumerate(AST_STAGE2, 1)]
    curves += [(f"{m.upper()}, {label}", f"{prefix}-{m}") for prefix, (label, _) in TUNED.items() for m in METHODS]
    for label, key in curves:
        run = runs.get(key)
        points = ", ".join(f"{it}: {100 * acc:.2f}" for it, acc in run["accuracy_vs_iteration"]) if run else "not run"
        lines.append(f"* {label}: {points}")
    spikes = [(name, run["image_grad_norm"]) for name, run in runs.items() if run and run.get("image_grad_norm")]
    if spikes:
        lines += ["", "Image-gradient norm per iteration (from the metrics.jsonl of each run whose file was at hand when a report was made)", "",
                  "| run | median | largest | at iteration | its start epoch |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {g['median']:.3g} | {g['max']:.3g} | {g['max_iteration']} | {g['max_start_epoch']} |"
                  for name, g in spikes]
    lines += ["", "Both methods tuned alike (ipc 10; the protocol's lr_img unless the column says otherwise; in brackets "
              "the largest image-gradient norm of the run and, when clipped, in how many iterations the norm was above "
              "the bound)", "", f"| method | lr_img {report['protocol']['distill']['lr_img']:g} | "
              + " | ".join(label for label, _ in TUNED.values()) + " |", "|---|" + "---|" * (1 + len(TUNED))]
    for method in METHODS:
        cells = []
        for key in (AST_VS_MTT[(method, 10)], *(f"{prefix}-{method}" for prefix in TUNED)):
            run, g = runs.get(key), (runs.get(key) or {}).get("image_grad_norm")
            notes = [f"{g['max']:.3g}"] if g else []
            if g and "above_clip" in g:
                notes.append(f"clipped in {g['above_clip']} of {g['iterations']}")
            cells.append(_acc(run) + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"| {method.upper()} | {' | '.join(cells)} |")
    if report["missing"]:
        lines += ["", f"Not run yet: {', '.join(report['missing'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES + ["all"], default="all")
    parser.add_argument("--only", nargs="*", default=[], help="names within the stage (expert sets, runs, or ipcs)")
    parser.add_argument("--work", type=Path, default=Path("runs/reproduce-fmnist"), help="where every stage writes")
    parser.add_argument("--json", type=Path, default=None, help="write the report JSON here")
    parser.add_argument("--previous", type=Path, default=None,
                        help="report stage: an earlier report JSON of the same protocol fills what --work lacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="digits and tiny settings: a smoke test of every stage")
    parser.add_argument("--scale", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: width 128, longer runs, only the AST-vs-MTT runs (see GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (the config's device)")
    args = parser.parse_args(argv)
    import torch

    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    protocol = copy.deepcopy(QUICK if args.quick else GPU if args.scale == "gpu" else PROTOCOL)
    protocol["defaults"] = {"device": args.device}
    stages = STAGES if args.stage == "all" else [args.stage]
    gpu_only = {"experts": GPU_EXPERT_SETS, "distill": GPU_RUNS} if args.scale == "gpu" and not args.quick else {}
    t0 = time.perf_counter()
    for stage in stages:
        only = args.only or gpu_only.get(stage, [])
        if stage == "experts":
            stage_experts(protocol, args.work, args.seed, only)
        elif stage == "distill":
            stage_distill(protocol, args.work, args.seed, only)
        elif stage == "baselines":
            stage_baselines(protocol, args.work, args.seed, only)
        else:
            stage_report(protocol, args.work, args.json, args.previous)
    log(f"done in {time.perf_counter() - t0:.0f} s; command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
