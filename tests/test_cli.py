"""The ``astkit`` command line, run as a user runs it (``python -m astkit``).

Every run uses the embedded digits data and a tiny protocol, so a command
takes seconds. Commands run in a temporary folder as cwd.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = [
    "--set", "model.width=8",
    "--set", "experts.num_experts=2",
    "--set", "experts.epochs=3",
    "--set", "experts.batch_size=512",
    "--set", "distill.max_start_epoch=2",
    "--set", "distill.expert_epochs=1",
    "--set", "distill.iterations=3",
    "--set", "distill.syn_steps=3",
    "--set", "distill.ipc=2",
    "--set", "evaluate.epochs=5",
    "--set", "evaluate.num_nets=1",
]
ACCURACY = re.compile(r"^accuracy \(convnet, 1 net\): (\d\.\d{4}) ± (\d\.\d{4})")
BUILTIN_PLUGINS = ["smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching",
                   "weight-perturbation"]
COMMANDS = ["run", "experts", "distill", "evaluate", "plugins", "show", "datasets", "models"]


def astkit(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def mtt_run(workdir) -> tuple[Path, subprocess.CompletedProcess]:
    """``astkit run`` end to end (the MTT baseline) into workdir/mtt."""
    result = ok(astkit("run", *TINY, "--out", "mtt", "--grid-every", "2", cwd=workdir))
    return workdir / "mtt", result


# ------------------------------------------------------------------ run
def test_run_writes_every_file_and_prints_the_accuracy(mtt_run):
    out, result = mtt_run
    for name in ("distilled.safetensors", "checkpoint.safetensors", "metrics.jsonl", "config.toml", "report.md",
                 "distilled.png", "curves.png", "avg_var.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "experts").glob("*.safetensors")) == [
        "expert_000.safetensors", "expert_001.safetensors"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["iter_000000.png", "iter_000002.png"]
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["event"] == "iteration"] == [0, 1, 2]
    assert records[-1]["event"] == "final_evaluation"
    assert 'ipc = 2' in (out / "config.toml").read_text()
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    last = result.stdout.strip().splitlines()[-1]
    match = ACCURACY.match(last)
    assert match, result.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert str(Path("mtt") / "distilled.png") in last

    report = (out / "report.md").read_text()
    for heading in ("## Configuration", "## Plugins", "## Experts", "## Distillation", "## Evaluation", "## Files"):
        assert heading in report
    assert "None: the MTT baseline." in report
    assert "| final | convnet | 1 |" in report
    assert "`distilled.safetensors`" in report


def test_run_with_the_ast_preset(workdir):
    result = ok(astkit("run", *TINY, "--set", "experts.num_experts=1", "--plugins", "ast", "--out", "ast",
                       "--quiet", cwd=workdir))
    out = workdir / "ast"
    assert ACCURACY.match(result.stdout.strip().splitlines()[-1]), result.stdout
    assert result.stderr.strip() == "", "--quiet prints no progress"
    assert (out / "distilled.png").is_file() and (out / "report.md").is_file()
    config = (out / "config.toml").read_text()
    assert 'plugins = ["ast"]' in config and "[options.smooth-experts]" in config
    report = (out / "report.md").read_text()
    for name in BUILTIN_PLUGINS:
        assert f"| {name} |" in report


# --------------------------------------------------------------- stages
def test_experts_then_distill_then_evaluate(workdir):
    ok(astkit("experts", *TINY, "--out", "stage1", "-q", cwd=workdir))
    experts = workdir / "stage1" / "experts"
    assert len(list(experts.glob("*.safetensors"))) == 2
    assert (workdir / "stage1" / "avg_var.png").is_file()

    result = ok(astkit("distill", *TINY, "--experts", str(experts), "--out", "stage2", "-q", cwd=workdir))
    distilled = workdir / "stage2" / "distilled.safetensors"
    assert distilled.is_file() and (workdir / "stage2" / "checkpoint.safetensors").is_file()
    assert (workdir / "stage2" / "distilled.png").is_file()
    assert not (workdir / "stage2" / "experts").exists()
    assert "distilled:" in result.stdout

    # the protocol (tiny model, 1 net, 5 epochs) comes from the file's metadata
    result = ok(astkit("evaluate", str(distilled), "-q", cwd=workdir))
    assert ACCURACY.match(result.stdout.strip().splitlines()[-1]), result.stdout


def test_evaluate_cross_architecture(mtt_run, workdir):
    out, _ = mtt_run
    result = ok(astkit("evaluate", str(out / "distilled.safetensors"), "--models", "convnet,alexnet",
                       "--epochs", "2", "-q", cwd=workdir))
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("accuracy (convnet, 1 net): ") and lines[1].startswith("accuracy (alexnet, 1 net): ")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_writes_a_checkpoint_and_resume_continues(mtt_run, workdir):
    out, _ = mtt_run
    args = [*TINY, "--experts", str(out / "experts"), "--out", "intr", "--set", "distill.checkpoint_every=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "astkit", "distill", *args, "--iterations", "100000"], cwd=workdir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell may ignore SIGINT
    )
    metrics = workdir / "intr" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stderr.strip().splitlines()[-1]

    from astkit import store

    done = store.read_metadata(workdir / "intr" / "checkpoint.safetensors")["state"]["iteration"]
    assert done >= 1
    ok(astkit("distill", *args, "--iterations", str(done + 2), "--resume", "-q", cwd=workdir))
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in lines if r["event"] == "iteration"] == list(range(done + 2))


# ----------------------------------------------------------------- help
def test_run_help_lists_plugin_switches_and_presets(workdir):
    result = ok(astkit("run", "--help", cwd=workdir))
    text = result.stdout
    for option in ("--plugins", "-p", "--disable", "--config", "--set", "--out", "--seed", "--device", "--dataset",
                   "--data-root", "--debug", "--quiet", "--resume"):
        assert option in text, option
    assert "ast = smooth-experts" in " ".join(text.split())


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command, capsys):
    from astkit.cli import main

    code = main([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Usage" in out
    if command:
        assert f"astkit {command}" in out


def test_no_arguments_shows_help(capsys):
    from astkit.cli import main

    assert main([]) == 0
    assert "run" in capsys.readouterr().out


# ------------------------------------------------------------- inspect
def test_plugins_lists_builtin_plugins_presets_and_options(workdir):
    result = ok(astkit("plugins", "--plugins", "ast,no:weight-perturbation", cwd=workdir))
    text = result.stdout
    for name in BUILTIN_PLUGINS:
        assert name in text
    assert "Presets" in text and "ast" in text
    assert "penalty_fraction" in text  # a declared option with its default
    assert "astkit_plugins.smooth_experts" in text  # entry point
    enabled = [line for line in text.splitlines() if line.startswith("enabled for this selection:")]
    assert enabled and "smooth-experts" in enabled[0] and "weight-perturbation" not in enabled[0]


def test_plugins_reports_a_plugin_that_failed_to_load(monkeypatch, capsys):
    from astkit.plugins import FailedPlugin, PluginSet

    real = PluginSet.discover.__func__

    def discover(cls, *args, **kwargs):
        found = real(cls, *args, **kwargs)
        found.failed.append(FailedPlugin("broken-thing", "broken_pkg.module", "ImportError: no module named torchx"))
        return found

    monkeypatch.setattr(PluginSet, "discover", classmethod(discover))
    from astkit.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "failed to load" in out and "broken-thing" in out and "broken_pkg.module" in out
    assert "torchx" in out


def test_a_command_discovers_plugins_once_and_says_how_to_resume(monkeypatch, capsys, tmp_path):
    """The CLI's PluginSet goes to the Engine (no second discovery), and the
    "resume with:" line is built from this command's own arguments."""
    from astkit.cli import main
    from astkit.engine import Engine
    from astkit.plugins import PluginSet

    real, calls = PluginSet.discover.__func__, []

    def discover(cls, *args, **kwargs):
        calls.append(1)
        return real(cls, *args, **kwargs)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PluginSet, "discover", classmethod(discover))
    monkeypatch.setattr(Engine, "train_experts", interrupted)
    out = tmp_path / "run"
    assert main(["experts", "--plugins", "ast", "--num-experts", "1", "--out", str(out), "-q"]) == 130
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert f"resume with: astkit experts --plugins ast --num-experts 1 --out {out} -q --resume" in err
    calls.clear()
    assert main(["datasets"]) == 0
    assert len(calls) == 1


def test_plugin_commands_are_added_and_a_broken_one_is_skipped(capsys):
    import typer

    from astkit import hookimpl
    from astkit.cli import register_plugin_commands
    from astkit.plugins import PluginSet

    class Good:
        astkit_plugin_name = "good"

        @hookimpl
        def astkit_register_commands(self, app):
            @app.command("hello")
            def hello():
                typer.echo("hello from a plugin")

    class Broken:
        astkit_plugin_name = "broken"

        @hookimpl
        def astkit_register_commands(self, app):
            raise RuntimeError("boom")

    app = typer.Typer()

    @app.command("run")
    def run():
        pass

    found = PluginSet()
    found.add(Good())
    found.add(Broken())
    register_plugin_commands(app, found)
    names = [c.name for c in app.registered_commands]
    assert names == ["run", "hello"]
    assert "broken" in capsys.readouterr().err


def test_show_prints_shapes_and_writes_the_grid(mtt_run, workdir):
    out, _ = mtt_run
    png = workdir / "shown.png"
    result = ok(astkit("show", str(out / "distilled.safetensors"), "--png", str(png), cwd=workdir))
    assert "20x1x8x8" in result.stdout and "distilled" in result.stdout and "digits" in result.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_show_json_of_a_trajectory(mtt_run, capsys):
    from astkit.cli import main

    out, _ = mtt_run
    assert main(["show", str(out / "experts" / "expert_000.safetensors"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["kind"] == "trajectory" and data["tensors"]["snapshots"]["shape"][0] == 4


def test_datasets_and_models(capsys):
    from astkit.cli import main

    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "cifar10" in out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "convnet" in out and "resnet18" in out


def test_datasets_and_models_name_the_plugin_that_registered_them(monkeypatch, capsys):
    from torch import nn

    from astkit import hookimpl
    from astkit.cli import main
    from astkit.plugins import PluginSet

    def tiny_mlp(channels, num_classes, image_size, *, hidden: int = 4):
        """A two-layer perceptron from a plugin."""
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def blobs(root=None):
        """Gaussian blobs from a plugin."""
        raise AssertionError("listing must not load the data")

    class Zoo:
        astkit_plugin_name = "zoo"

        @hookimpl
        def astkit_register_models(self, register):
            register("tiny-mlp", tiny_mlp)

        @hookimpl
        def astkit_register_datasets(self, register):
            register("blobs", blobs)

    real = PluginSet.discover.__func__
    monkeypatch.setattr(PluginSet, "discover", classmethod(lambda cls, extra=(): real(cls, [*extra, Zoo()])))
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "tiny-mlp" in line)
    assert "plugin zoo" in row and "hidden" in row and "two-layer perceptron" in row
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "blobs" in line)
    assert "plugin zoo" in row and "Gaussian blobs" in row
    assert "built in" in next(line for line in out.splitlines() if "digits" in line)


# -------------------------------------------------------------- errors
@pytest.mark.parametrize("args, fragments", [
    (["run", "--dataset", "no-such-data"], ["unknown dataset 'no-such-data'"]),
    (["run", "--plugins", "no-such-plugin"], ["unknown plugin 'no-such-plugin'"]),
    (["run", "-p", "no:no-such-plugin"], ["unknown plugin 'no-such-plugin'"]),
    (["run", "--set", "distill.bogus=1"], ["distill.bogus"]),
    (["run", "--set", "distill.ipc=abc"], ["distill.ipc", "integer"]),
    (["run", "--set", "no-equals-sign"], ["key=value"]),
    (["run", "--seed", "x"], ["--seed"]),
    (["run", "--no-such-option"], ["--no-such-option"]),
    (["show", "not-astkit.safetensors"], ["not an astkit file"]),
    (["evaluate", "not-astkit.safetensors"], ["not an astkit file"]),
    (["show", "missing.safetensors"], ["no such file"]),
])
def test_user_errors_are_one_line(args, fragments, workdir, monkeypatch, capsys):
    """In-process (fast); the subprocess test below checks the real streams."""
    from astkit.cli import main

    (workdir / "not-astkit.safetensors").write_bytes(b"definitely not a safetensors file")
    monkeypatch.chdir(workdir)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(subprocess.CompletedProcess(args, code, captured.out, captured.err), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["run", "--dataset", "no-such-data"], ["unknown dataset 'no-such-data'"]),
    (["show", "not-astkit.safetensors"], ["not an astkit file"]),
])
def test_user_errors_in_a_real_process(args, fragments, workdir):
    (workdir / "not-astkit.safetensors").write_bytes(b"definitely not a safetensors file")
    result = astkit(*args, cwd=workdir, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == assert_one_error_line(result, *fragments)


def test_evaluate_rejects_a_trajectory_and_debug_shows_the_traceback(mtt_run, capsys):
    from astkit.cli import main

    out, _ = mtt_run
    expert = str(out / "experts" / "expert_000.safetensors")
    assert main(["evaluate", expert]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(subprocess.CompletedProcess([], 2, captured.out, captured.err), "distilled")
    assert main(["evaluate", expert, "--debug"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and captured.err.strip().splitlines()[-1].startswith("error:")
