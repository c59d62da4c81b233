"""AST end to end on digits: all five techniques, and each one disabled in turn,
through the public API and through the CLI; plus kill -9 leaving readable files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from astkit import DistilledSet, Engine, Trajectory
from astkit_plugins.presets import AST

from conftest import TINY, tiny_config

CLI_TINY = [arg for item in TINY for arg in ("--set", item)]


@pytest.mark.parametrize("disabled", [None, *AST])
def test_api_run_with_ast_and_each_technique_disabled(tmp_path, digits, disabled):
    overrides = ["plugins=ast", "experts.momentum=0.9"] + ([f"disable={disabled}"] if disabled else [])
    engine = Engine(tiny_config(tmp_path, *overrides), dataset=digits)
    assert engine.enabled == [name for name in AST if name != disabled]
    result = engine.run()
    assert result.distilled.images.shape == (20, 1, 8, 8)
    assert 0.0 <= result.evaluation["convnet"].mean <= 1.0
    terms = result.history[-1].terms
    assert len(terms) == (1 if disabled == "intermediate-matching" else 2)
    recorded = DistilledSet.load(engine.out / "distilled.safetensors").meta["plugins"]
    assert sorted(recorded) == sorted(engine.enabled)


def cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("disabled", [None, *AST])
def test_cli_run_with_ast_and_each_technique_disabled(tmp_path, disabled):
    extra = ["--disable", disabled] if disabled else []
    result = cli("run", "--plugins", "ast", *extra, *CLI_TINY, "--out", "r", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy (convnet" in result.stdout
    meta = DistilledSet.load(tmp_path / "r" / "distilled.safetensors").meta
    assert set(AST) - {disabled} <= set(meta["plugins"]) and disabled not in meta["plugins"]


def test_kill_9_leaves_every_file_readable(tmp_path):
    prep = cli("experts", *CLI_TINY, "--out", "r", "--quiet", cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    cmd = [sys.executable, "-m", "astkit", "distill", *CLI_TINY, "--set", "distill.iterations=100000",
           "--set", "distill.checkpoint_every=1", "--out", "r", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "r" / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # somewhere in the middle of later writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from astkit import store

    meta = store.read_metadata(checkpoint)
    assert meta["kind"] == "checkpoint" and meta["state"]["iteration"] >= 1
    store.load(checkpoint, "checkpoint")
    for path in (tmp_path / "r" / "experts").glob("*.safetensors"):
        Trajectory.load(path)
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[:-1]:
        json.loads(line)  # every complete line parses (the last may be cut)
    resumed = cli("distill", *CLI_TINY, "--set", f"distill.iterations={meta['state']['iteration'] + 1}",
                  "--out", "r", "--resume", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
