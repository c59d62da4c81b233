"""The example third-party plugin package: pip-installed, discovered, used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "astkit-example-plugin"
TINY = ["--set", "model.width=8", "--set", "experts.num_experts=1", "--set", "experts.epochs=3",
        "--set", "distill.max_start_epoch=2", "--set", "distill.expert_epochs=1", "--set", "distill.iterations=2",
        "--set", "distill.syn_steps=2", "--set", "distill.ipc=1", "--set", "evaluate.epochs=2",
        "--set", "evaluate.num_nets=1", "--quiet"]


def astkit(*args, cwd):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def installed():
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(EXAMPLE)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", "astkit-example-plugin"],
                   capture_output=True, timeout=300)


def test_installed_plugin_is_listed(installed, tmp_path):
    result = astkit("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "cosine-weight" in result.stdout and "astkit-example-plugin" in result.stdout
    assert "inner_loss_weight" in result.stdout and "register_models" in result.stdout


def test_installed_plugin_is_used_in_a_run(installed, tmp_path):
    result = astkit("run", "--plugins", "cosine-weight", "--set", "cosine-weight.amplitude=0.3",
                    "--set", "model.name=mlp", "--out", "r", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import json

    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    import math

    for line in lines:
        if line["event"] == "iteration":
            assert line["inner_weight"] == pytest.approx(1 + 0.3 * math.cos(math.pi * line["start_epoch"] / 2))
    config = (tmp_path / "r" / "config.toml").read_text()
    assert 'name = "mlp"' in config and "cosine-weight" in config
