"""AST's claims on real Fashion-MNIST, at a scale that fits a 2-core CPU.

Regenerates the tables of docs/results.md (section "Reproduction on
Fashion-MNIST") from scratch, in resumable stages:

1. ``experts``: seven expert sets trained on the full train set, one
   expert at a time: what the ``mtt``, ``ast`` and ``ast-reference``
   presets train, and Table VII's chain at the ``ast`` preset's expert
   optimiser (SGD, + momentum, + penalty, + clipping, both = ``ast``).
2. ``distill``: distillation runs, each from one expert set (every set is
   trained once and reused): Table VII's five (MTT's distillation on each
   set of the chain), Table VIII's cumulative ablation on the smooth
   experts (ending at the ``ast`` preset), ``ast-reference``, ``mtt``, and
   MTT, MTT on smooth experts, ``ast`` and ``ast-reference`` at ipc 1.
   Every run evaluates itself every ``eval_every`` iterations (accuracy
   against iterations, paper Fig. 6).
3. ``baselines``: a random real subset and a K-Means real subset (the
   representative-init images, no distillation) at ipc 1 and 10, evaluated
   with the same protocol.
4. ``report``: one JSON with every number and the protocol, and the Markdown
   tables.

Each stage skips what is already done and resumes what was cut (experts
train only the missing files; a distillation continues from its checkpoint),
so a stage can be stopped at any moment and run again. A distillation the
engine stops as diverged (``DivergenceError``) is recorded as such in its
summary.json, shown as ``diverged`` in the tables, and the stage goes on with
the other runs (delete that summary.json to run it again). Wall times survive
resumes: experts are timed one by one (``seconds.json``), distillations from
the per-iteration and evaluation seconds of their metrics.jsonl.

    python benchmarks/reproduce_fmnist.py                   # everything (well over ten hours on 2 cores)
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

#: The CPU protocol (``--quick`` overrides it with QUICK). Written down in docs/results.md. Expert optimiser
#: settings come from the presets (EXPERT_SETS); the protocol fixes what every run shares.
PROTOCOL = {
    "data": {"dataset": "fashion-mnist"},
    "model": {"name": "convnet", "width": 32},
    "experts": {"num_experts": 2, "epochs": 15, "batch_size": 256},
    "distill": {"ipc": 10, "iterations": 500, "syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 8,
                "lr_img": 100.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 25, "eval_every": 100},
    "evaluate": {"epochs": 300, "num_nets": 5},
}
#: A larger protocol for one GPU (``--scale gpu``, used by benchmarks/gpu_fmnist.sh): the paper's
#: width 128 and evaluation length, more experts; only the runs of the AST-vs-MTT table.
GPU = {
    "data": {"dataset": "fashion-mnist"},
    "model": {"name": "convnet", "width": 128},
    "experts": {"num_experts": 4, "epochs": 20, "batch_size": 256},
    "distill": {"ipc": 10, "iterations": 1000, "syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 10,
                "lr_img": 100.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 50, "eval_every": 100},
    "evaluate": {"epochs": 1000, "num_nets": 5},
}
GPU_EXPERT_SETS = ["mtt", "smooth", "ast-reference"]
GPU_RUNS = ["mtt", "table7-smooth", "ast", "ast-reference", "mtt-ipc1", "mtt-smooth-ipc1", "ast-ipc1",
            "ast-reference-ipc1"]
QUICK = {
    "data": {"dataset": "digits"},
    "model": {"name": "convnet", "width": 8},
    "experts": {"num_experts": 1, "epochs": 2, "batch_size": 256},
    "distill": {"ipc": 2, "iterations": 2, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2,
                "lr_img": 10.0, "lr_lr": 1e-5, "lr_teacher": 0.01, "checkpoint_every": 1, "eval_every": 1},
    "evaluate": {"epochs": 2, "num_nets": 2},
}

SMOOTH = "smooth-experts"
#: Expert sets: plugins (presets included) and overrides on top of the protocol. ``mtt``, ``smooth`` and
#: ``ast-reference`` are what the presets of those names train; the Table VII chain (sgd, momentum,
#: penalty, clipping, smooth) shares the ``ast`` preset's expert optimiser (lr 0.003, weight decay 1e-3,
#: lr halved at half the epochs) and differs only in momentum and the two smooth-experts terms.
EXPERT_SETS = {
    "mtt": {"plugins": ["mtt"]},
    "sgd": {"plugins": ["ast", f"no:{SMOOTH}"], "experts": {"momentum": 0.0}},
    "momentum": {"plugins": ["ast", f"no:{SMOOTH}"]},
    "penalty": {"plugins": ["ast"], "options": {SMOOTH: {"clipping": False}}},
    "clipping": {"plugins": ["ast"], "options": {SMOOTH: {"penalty": False}}},
    "smooth": {"plugins": ["ast"]},
    "ast-reference": {"plugins": ["ast-reference"]},
}
AST_STAGE2 = ["representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]
#: Distillation runs: the expert set they use, their plugins (presets included), overrides. ``table7-*`` is
#: MTT's distillation (no stage-2 technique) on each expert set; ``table8-i`` adds AST's stage-2 techniques
#: one by one on the smooth experts (``table8-4`` is the ``ast`` preset, also named ``ast``).
RUNS = {
    **{f"table7-{name}": {"experts": name, "plugins": []} for name in ("sgd", "momentum", "penalty", "clipping", "smooth")},
    **{f"table8-{i}-{AST_STAGE2[i - 1]}": {"experts": "smooth",
                                           "plugins": ["ast"] + [f"no:{p}" for p in AST_STAGE2[i:]]}
       for i in range(1, 4)},
    "ast": {"experts": "smooth", "plugins": ["ast"]},
    "ast-reference": {"experts": "ast-reference", "plugins": ["ast-reference"]},
    "mtt": {"experts": "mtt", "plugins": ["mtt"]},
    "mtt-ipc1": {"experts": "mtt", "plugins": ["mtt"], "distill": {"ipc": 1}},
    "mtt-smooth-ipc1": {"experts": "smooth", "plugins": [], "distill": {"ipc": 1}},
    "ast-ipc1": {"experts": "smooth", "plugins": ["ast"], "distill": {"ipc": 1}},
    "ast-reference-ipc1": {"experts": "ast-reference", "plugins": ["ast-reference"], "distill": {"ipc": 1}},
}
#: The columns of the AST-vs-MTT table and their run at each ipc.
METHODS = {
    "MTT (SGD experts)": {10: "mtt", 1: "mtt-ipc1"},
    "MTT (smooth experts)": {10: "table7-smooth", 1: "mtt-smooth-ipc1"},
    "AST (`ast`)": {10: "ast", 1: "ast-ipc1"},
    "AST (`ast-reference`)": {10: "ast-reference", 1: "ast-reference-ipc1"},
}
#: ``ast-reference`` diverged at ipc 1 under the protocol's lr_lr (its student's momentum 0.9 gives large lr
#: gradients); the four ipc-1 runs again with a 10x smaller lr_lr, every method alike.
IPC1_LR_LR = 1e-6
TUNED_IPC1 = {label: f"{keys[1]}-lr-lr-1e-6" for label, keys in METHODS.items()}
RUNS.update({run: {**RUNS[METHODS[label][1]], "distill": {**RUNS[METHODS[label][1]]["distill"], "lr_lr": IPC1_LR_LR}}
             for label, run in TUNED_IPC1.items()})
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
                        {"experts": spec.get("experts", {})}, spec.get("options"))


def run_config(protocol: dict, work: Path, name: str, seed: int):
    from astkit import RunFolder

    spec = RUNS[name]
    experts_dir = RunFolder(work / "experts" / spec["experts"]).experts
    sections = {"experts": {"dir": str(experts_dir)}, "distill": spec.get("distill", {})}
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
    """Train each set's missing experts one by one; ``seconds.json`` keeps each expert's wall time."""
    from astkit import Engine

    for name in only or list(EXPERT_SETS):
        folder = work / "experts" / name
        done = folder / "summary.json"
        if done.is_file():
            log(f"experts {name}: done")
            continue
        engine = Engine(expert_config(protocol, work, name, seed))
        n = engine.config.experts.num_experts
        missing = engine.folder.missing_experts(range(n))
        log(f"experts {name}: training {len(missing)} of {n}")
        seconds_file = folder / "seconds.json"
        seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
        for index in missing:
            t0 = time.perf_counter()
            engine.train_experts([index])
            seconds[str(index)] = time.perf_counter() - t0
            save_json(seconds_file, seconds)
            log(f"experts {name}: expert {index} in {seconds[str(index)]:.0f} s")
        experts = engine.load_experts()
        save_json(done, {
            "set": name, **EXPERT_SETS[name], "config": expert_settings(engine.config),
            "avg_var": [t.avg_var for t in experts],
            "test_accuracy": [t.test_accuracy[-1] for t in experts],
            "test_accuracy_per_epoch": [t.test_accuracy for t in experts],
            "seconds_per_expert": [seconds.get(str(i)) for i in range(n)],
        })
        log(f"experts {name}: Avg_Var {_mean([t.avg_var for t in experts]):.4g}, "
            f"test acc {_mean([t.test_accuracy[-1] for t in experts]):.4f}")


def expert_settings(config) -> dict:
    """The expert optimiser a set was trained with (presets applied)."""
    e = config.experts
    keys = ("optimizer", "lr", "momentum", "weight_decay", "lr_decay", "lr_decay_epoch", "lr_decay_fraction",
            "reset_optimizer_on_decay", "epochs")
    return {k: getattr(e, k) for k in keys}


def run_seconds(metrics: Path) -> dict:
    """Wall time of a distillation from its metrics.jsonl (iterations and evaluations; survives resumes)."""
    from astkit.metrics_log import MetricsLog

    rows = MetricsLog(metrics).records() if metrics.is_file() else []
    distill = sum(r.get("seconds") or 0.0 for r in rows if r["event"] == "iteration")
    evaluation = sum(r.get("seconds") or 0.0 for r in rows if r["event"] in ("evaluation", "final_evaluation"))
    return {"distill": distill, "evaluation": evaluation}


def stage_distill(protocol: dict, work: Path, seed: int, only: list[str]) -> None:
    from astkit import DivergenceError, Engine
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
        try:
            distilled = engine.distill(engine.load_experts(), resume=checkpoint.is_file())
        except DivergenceError as err:  # a result of the protocol: recorded as such, the other runs go on
            save_json(done, {"run": name, **RUNS[name], "ipc": engine.config.distill.ipc, "diverged": str(err),
                             "seconds": run_seconds(engine.folder.metrics)})
            log(f"distill {name}: {err} (recorded in {done}; delete it to run again)")
            continue
        t0 = time.perf_counter()
        result = engine.evaluate(distilled)
        final_seconds = time.perf_counter() - t0
        curve = MetricsLog(engine.folder.metrics).records()
        curve = [(r["iteration"], r["architectures"]["convnet"]["mean"]) for r in curve if r["event"] == "evaluation"]
        seconds = run_seconds(engine.folder.metrics)
        save_json(done, {
            "run": name, **RUNS[name], "ipc": engine.config.distill.ipc, "learned_lr": distilled.lr,
            "final": result.to_json()["architectures"]["convnet"],
            "accuracy_vs_iteration": curve + [(distilled.iteration, result["convnet"].mean)],
            "seconds": {**seconds, "evaluation": seconds["evaluation"] + final_seconds},
        })
        log(f"distill {name}: {result['convnet'].mean:.4f} ± {result['convnet'].std:.4f}")


def stage_baselines(protocol: dict, work: Path, seed: int, only: list[str]) -> None:
    import torch

    from astkit import DistilledSet, Engine, RunFolder

    done = work / "baselines.json"
    results = json.loads(done.read_text()) if done.is_file() else {}
    for ipc in (1, 10) if not only else [int(i) for i in only]:
        ast = work / "runs" / METHODS["AST (`ast`)"][ipc] / "summary.json"
        learned = json.loads(ast.read_text())["learned_lr"] if ast.is_file() else None
        for kind in ("random", "kmeans", "random-ast-lr"):
            key = f"{kind}-ipc{ipc}"
            if key in results:
                log(f"baseline {key}: done")
                continue
            if kind == "random-ast-lr" and learned is None:
                log(f"baseline {key}: skipped until the AST run at ipc {ipc} exists")
                continue
            t0 = time.perf_counter()
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
            results[key] = {"kind": kind, "ipc": ipc, "lr": subset.lr, **result.to_json(),
                            "seconds": time.perf_counter() - t0}
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
    if "diverged" in run:
        return "diverged"
    final = run["final"] if "final" in run else run
    return f"{100 * final['mean']:.2f} ± {100 * final['std']:.2f}"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _curves(runs: dict, curves: list[tuple[str, str]]) -> list[str]:
    """One bullet per (label, run): the run's accuracy at each evaluated iteration."""
    lines = []
    for label, key in curves:
        run = runs.get(key)
        points = ("not run" if run is None else "diverged" if "diverged" in run
                  else ", ".join(f"{it}: {100 * acc:.2f}" for it, acc in run["accuracy_vs_iteration"]))
        lines.append(f"* {label}: {points}")
    return lines


def markdown(report: dict) -> str:
    experts, runs, baselines = report["experts"], report["distill"], report["baselines"]
    lines = ["Table VII shape (ipc 10; the `ast` preset's expert optimiser on every row; experts' mean over the set, "
             "distilled by MTT (no stage-2 technique), mean ± std over the evaluation nets)", "",
             "| experts | Avg_Var | expert test acc (%) | distilled acc (%) |", "|---|---|---|---|"]
    labels = {"sgd": "SGD", "momentum": "SGD + momentum", "penalty": "SGD + momentum + penalty",
              "clipping": "SGD + momentum + clipping", "smooth": "SGD + momentum + penalty + clipping"}
    for name, label in labels.items():
        e = experts.get(name)
        avg_var = f"{_mean(e['avg_var']):.4g}" if e else "not run"
        acc = f"{100 * _mean(e['test_accuracy']):.2f}" if e else "not run"
        lines.append(f"| {label} | {avg_var} | {acc} | {_acc(runs.get(f'table7-{name}'))} |")
    lines += ["", "Other expert sets (their preset's optimiser)", "",
              "| experts | Avg_Var | expert test acc (%) |", "|---|---|---|"]
    for name in ("mtt", "ast-reference"):
        e = experts.get(name)
        avg_var = f"{_mean(e['avg_var']):.4g}" if e else "not run"
        acc = f"{100 * _mean(e['test_accuracy']):.2f}" if e else "not run"
        lines.append(f"| {name} | {avg_var} | {acc} |")
    lines += ["", "Table VIII shape (smooth experts, ipc 10, cumulative)", "", "| stage-2 techniques | acc (%) |", "|---|---|",
              f"| none (smooth experts only) | {_acc(runs.get('table7-smooth'))} |"]
    for i, plugin in enumerate(AST_STAGE2, 1):
        key = "ast" if i == len(AST_STAGE2) else f"table8-{i}-{plugin}"
        lines.append(f"| + {plugin} | {_acc(runs.get(key))} |")
    lines += ["", "AST against MTT and real subsets (mean ± std over the evaluation nets)", "",
              "| ipc | random real | random real, AST's lr | K-Means real | " + " | ".join(METHODS) + " |",
              "|---|---|---|---|" + "---|" * len(METHODS)]
    for ipc in (1, 10):
        lines.append(f"| {ipc} | {_acc(baselines.get(f'random-ipc{ipc}'))} | {_acc(baselines.get(f'random-ast-lr-ipc{ipc}'))} "
                     f"| {_acc(baselines.get(f'kmeans-ipc{ipc}'))} | "
                     + " | ".join(_acc(runs.get(keys[ipc])) for keys in METHODS.values()) + " |")
    lines += ["", f"ipc 1 with lr_lr {IPC1_LR_LR:g} for every method (the protocol's {PROTOCOL['distill']['lr_lr']:g} "
              "diverged for `ast-reference`)", "", "| " + " | ".join(TUNED_IPC1) + " |", "|" + "---|" * len(TUNED_IPC1),
              "| " + " | ".join(_acc(runs.get(run)) for run in TUNED_IPC1.values()) + " |"]
    full = [_mean(e["test_accuracy"]) for e in experts.values() if e]
    if full:
        lines.append(f"\nFull training set, same ConvNet (best expert set's mean final test accuracy): {100 * max(full):.2f} %")
    lines += ["", "Accuracy against iterations (%, ipc 10)", ""]
    curves = [("MTT (SGD experts)", "mtt"), ("MTT (smooth experts)", "table7-smooth")]
    curves += [(f"+ {plugin}" + (" (AST)" if i == len(AST_STAGE2) else ""),
                "ast" if i == len(AST_STAGE2) else f"table8-{i}-{plugin}") for i, plugin in enumerate(AST_STAGE2, 1)]
    curves += [("AST (`ast-reference`)", "ast-reference")]
    lines += _curves(runs, curves)
    lines += ["", "Accuracy against iterations (%, ipc 1)", ""]
    lines += _curves(runs, [(label, keys[1]) for label, keys in METHODS.items()]
                     + [(f"{label}, lr_lr {IPC1_LR_LR:g}", run) for label, run in TUNED_IPC1.items()])
    spikes = [(name, run["image_grad_norm"]) for name, run in runs.items() if run and run.get("image_grad_norm")]
    if spikes:
        lines += ["", "Image-gradient norm per iteration (from the metrics.jsonl of each run whose file was at hand when a report was made)", "",
                  "| run | median | largest | at iteration | its start epoch |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {g['median']:.3g} | {g['max']:.3g} | {g['max_iteration']} | {g['max_start_epoch']} |"
                  for name, g in spikes]
    lines += ["", "Wall time of every stage (minutes on this machine)", "",
              "| stage | item | minutes |", "|---|---|---|"]
    for name, e in experts.items():
        if e:
            total = sum(s for s in e.get("seconds_per_expert", []) if s is not None)
            lines.append(f"| experts | {name} ({len(e['avg_var'])} experts) | {_minutes(total)} |")
    for name, run in runs.items():
        if run and "seconds" in run:
            lines.append(f"| distill | {name} (distillation + evaluations) | "
                         f"{_minutes(run['seconds']['distill'])} + {_minutes(run['seconds']['evaluation'])} |")
    for name, b in baselines.items():
        if "seconds" in b:
            lines.append(f"| baselines | {name} | {_minutes(b['seconds'])} |")
    diverged = [(name, run["diverged"]) for name, run in runs.items() if run and "diverged" in run]
    if diverged:
        lines += ["", "Diverged runs (the engine stopped them; their table cells say `diverged`)", ""]
        lines += [f"* {name}: {message}" for name, message in diverged]
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
