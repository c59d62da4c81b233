"""The run folder owns every path of a run; the checkpoint is a typed file; the
engine leaves the caller's config alone."""

import ast
from pathlib import Path

import pytest
import torch

from astkit import Engine, FileFormatError, RunFolder
from astkit.checkpoint import Checkpoint

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ("checkpoint.safetensors", "distilled.safetensors", "metrics.jsonl", "report.md", "config.toml",
             "distilled.png", "curves.png", "avg_var.png")


def test_run_folder_names_every_file_of_a_run(tmp_path):
    folder = RunFolder(tmp_path / "out")
    assert folder.expert(3) == tmp_path / "out" / "experts" / "expert_003.safetensors"
    assert folder.checkpoint.name == "checkpoint.safetensors" and folder.metrics.name == "metrics.jsonl"
    assert folder.grid(12) == tmp_path / "out" / "grids" / "iter_000012.png"
    shared = RunFolder(tmp_path / "out", tmp_path / "shared")
    assert shared.expert(0) == tmp_path / "shared" / "expert_000.safetensors"
    shared.experts.mkdir()
    shared.expert(1).write_bytes(b"")
    assert shared.missing_experts(range(3)) == [0, 2] and shared.expert_files() == [shared.expert(1)]
    config = tiny_config(tmp_path, f"experts.dir={tmp_path / 'shared'}")
    assert RunFolder.of(config) == RunFolder(tmp_path / "run", tmp_path / "shared")


def _path_joins(tree: ast.AST):
    """Every ``x / "name"`` whose right side is a string literal or f-string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and isinstance(right.value, str):
                yield node.lineno, right.value
            elif isinstance(right, ast.JoinedStr) and right.values and isinstance(right.values[0], ast.Constant):
                yield node.lineno, str(right.values[0].value)


def test_only_the_run_folder_spells_the_run_files():
    offenders = []
    for base in ("astkit", "plugins", "benchmarks"):
        for path in sorted((ROOT / base).rglob("*.py")):
            if path.name == "run_folder.py":
                continue
            for line, name in _path_joins(ast.parse(path.read_text())):
                if name in RUN_FILES or name.startswith(("expert_", "iter_")):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} / {name!r}")
    assert not offenders, "build these paths with astkit.RunFolder: " + ", ".join(offenders)


def test_the_run_folder_check_can_fail():
    joins = list(_path_joins(ast.parse('out / "checkpoint.safetensors"\nd / f"expert_{i:03d}.safetensors"')))
    assert [name for _, name in joins] == ["checkpoint.safetensors", "expert_"]


def test_a_checkpoint_round_trips_and_names_what_is_missing(tmp_path, digits):
    engine = Engine(tiny_config(tmp_path, "distill.iterations=2"), dataset=digits)
    engine.distill(engine.train_experts())
    saved = Checkpoint.load(engine.folder.checkpoint)
    assert saved.iteration == 2 == Checkpoint.read_iteration(engine.folder.checkpoint)
    assert set(saved.momentum) == {"img", "lr"} and saved.momentum["img"].shape == saved.images.shape
    again = saved.save(tmp_path / "again.safetensors")
    loaded = Checkpoint.load(again)
    assert torch.equal(loaded.images, saved.images) and loaded.state == saved.state
    assert torch.equal(loaded.generator_state, saved.generator_state) and loaded.lr == saved.lr
    assert loaded.plugin_state == saved.plugin_state and "expert_order" in saved.plugin_state["astkit.defaults"]

    del saved.state["failures"]
    saved.save(tmp_path / "broken.safetensors")
    with pytest.raises(FileFormatError, match="checkpoint state is missing 'failures'; start without --resume"):
        Checkpoint.load(tmp_path / "broken.safetensors")


def test_the_engine_leaves_the_callers_config_alone(tmp_path, digits):
    config = tiny_config(tmp_path, "plugins=['smooth-experts']")
    before = config.to_dict()
    engine = Engine(config, dataset=digits)
    assert config.to_dict() == before
    assert engine.config is not config and engine.config.to_dict() != before  # its copy has options resolved
