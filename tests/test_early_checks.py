"""Every check that can be made before training is made before training.

Each bad input ends in one line ``error: ...`` with exit status 2 (a
UserError / FileFormatError), before any expert is trained or any
distillation iteration runs, and leaves no run files behind. CLI behaviours
run ``python -m astkit`` in a subprocess; the rest are checked in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from astkit import Engine, store
from astkit.config import RunConfig
from astkit.data import load_dataset
from astkit.errors import FileFormatError, UserError

from conftest import tiny_config

#: the CLI's tiny protocol (the experts of the `made` fixture have width 8, 2 epochs)
CLI = ["--set", "model.width=8", "--set", "experts.num_experts=2", "--set", "experts.epochs=2",
       "--set", "distill.max_start_epoch=1", "--set", "distill.expert_epochs=1", "--set", "distill.iterations=1",
       "--set", "distill.syn_steps=2", "--set", "distill.ipc=1", "--set", "evaluate.epochs=1",
       "--set", "evaluate.num_nets=1", "--quiet"]
RUN = ["run", *CLI, "--grid-every", "0", "--out", "o"]


def astkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 and stderr exactly one line ``error: ...`` naming the problem and, after ';', the fix."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "(rerun with --debug" not in lines[0], lines[0]  # not the catch-all
    return lines[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def write_pngs(directory: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").save(directory / f"{i}.png")


def image_folder(root: Path, classes=("a", "b"), count: int = 3) -> Path:
    for k, name in enumerate(classes):
        write_pngs(root / "train" / name, count, seed=k)
        write_pngs(root / "test" / name, 2, seed=10 + k)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits) -> Path:
    """A tiny run made in-process: run/experts (2 experts, width 8, 2 epochs),
    run/checkpoint.safetensors and run/distilled.safetensors."""
    root = tmp_path_factory.mktemp("made")
    engine = Engine(tiny_config(root, "experts.epochs=2", "distill.max_start_epoch=1", "distill.expert_epochs=1",
                                "distill.iterations=1", "distill.syn_steps=2", "distill.ipc=1",
                                "distill.checkpoint_every=0"), dataset=digits)
    engine.distill(engine.train_experts())
    return root / "run"


# ------------------------------------------------------------------ data
def test_imagefolder_with_one_class_is_refused_before_training(tmp_path):
    image_folder(tmp_path / "imgs", classes=("only",))
    with pytest.raises(UserError, match="has one class \\(only\\), distillation needs at least 2"):
        load_dataset("imagefolder", tmp_path / "imgs")
    refused(astkit(*RUN, "--dataset", "imagefolder", "--data-root", "imgs", cwd=tmp_path), "at least 2")
    assert not (tmp_path / "o").exists()


def test_class_without_train_images_is_refused(digits):
    from astkit.data import RawData, build_dataset

    images = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    raw = RawData(images, [0, 0, 1, 1], images[:2], [0, 1], ["a", "b", "c"])
    with pytest.raises(UserError, match="class c has no train images"):
        build_dataset("mem", raw)


@pytest.mark.parametrize("which", ["first", "later"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_a_clean_error(tmp_path, which, damage):
    root = image_folder(tmp_path / "imgs")
    victim = root / "train" / ("a" if which == "first" else "b") / ("0.png" if which == "first" else "2.png")
    good = (root / "train" / "a" / "1.png").read_bytes()
    victim.write_bytes(b"not an image at all" if damage == "garbage" else good[:60])
    with pytest.raises(UserError, match=f"cannot read image .*{victim.name}.*; replace or delete the file"):
        load_dataset("imagefolder", root)


def test_corrupt_first_image_through_the_cli(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "a" / "0.png").write_bytes(b"not an image")
    refused(astkit(*RUN, "--dataset", "imagefolder", "--data-root", "imgs", cwd=tmp_path), "cannot read image")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ seed
@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 2**70])
def test_seed_out_of_range_is_refused_by_the_config(seed):
    config = RunConfig.load(overrides=[f"seed={seed}"])
    with pytest.raises(UserError, match="seed must be a whole number from 0 to 2\\*\\*63 - 1"):
        config.validate()


@pytest.mark.parametrize("value", ["abc", "1.5", "true", "[1]"])
def test_seed_that_is_not_an_integer_is_refused(value):
    with pytest.raises(UserError, match="config key seed expects an integer"):
        RunConfig.load(overrides=[f"seed={value}"])


def test_long_seed_is_kept_exactly():
    seed = 2**62 + 1  # a float would round it
    assert RunConfig.load(overrides=[f"seed={seed}"]).seed == seed
    RunConfig(seed=2**63 - 1).validate()


def test_huge_seed_is_refused_before_the_experts(tmp_path):
    refused(astkit(*RUN, "--seed", str(2**70), cwd=tmp_path), "seed must be")
    (tmp_path / "c.toml").write_text(f"seed = {2**64 + 3}\n")
    refused(astkit(*RUN, "--config", "c.toml", cwd=tmp_path), "seed must be")
    assert files_under(tmp_path) == {"c.toml"}


# --------------------------------------------------------- other config values
@pytest.mark.parametrize("override, message", [
    ("distill.lr_img=inf", "expects a finite number"),
    ("distill.lr_teacher=-inf", "expects a finite number"),
    ("distill.lr_img=1e400", "expects a finite number"),
    ("distill.iterations=inf", "expects an integer"),
    ("evaluate.momentum=2", "evaluate.momentum must be in [0, 1)"),
    ("evaluate.weight_decay=-1", "evaluate.weight_decay must be >= 0"),
    ("experts.weight_decay=-1", "experts.weight_decay must be >= 0"),
    ("distill.img_momentum=5", "distill.img_momentum must be in [0, 1)"),
    ("distill.lr_momentum=-1", "distill.lr_momentum must be in [0, 1)"),
    ("data.zca_eps=0", "data.zca_eps must be > 0"),
    ("evaluate.test_every=0", "evaluate.test_every must be >= 1"),
    ("experts.lr_decay_epoch=0", "experts.lr_decay_epoch must be >= 1"),
    ("experts.lr_decay=-1", "experts.lr_decay must be > 0"),
    ("evaluate.lr_decay=0", "evaluate.lr_decay must be > 0"),
    ("data.root=", "data.root is an empty path"),
    ("experts.dir=", "experts.dir is an empty path"),
    ("out=", "out is an empty path"),
])
def test_bad_config_values_are_refused(override, message):
    with pytest.raises(UserError) as info:
        RunConfig.load(overrides=[override]).validate()
    assert message in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--data-root", ""], "the path is empty"),
    (["--dataset", "imagefolder", "--set", "data.root="], "data.root is an empty path"),
    (["--out", ""], "the path is empty"),
    (["--experts", ""], "the path is empty"),
    (["--grid-every", "-1"], "--grid-every"),
])
def test_empty_paths_and_negative_counts_on_the_command_line(tmp_path, args, message):
    refused(astkit(*RUN, *args, cwd=tmp_path), message)
    assert files_under(tmp_path) == set()


# ---------------------------------------------------------- config files
def test_config_path_problems_say_what_is_wrong(tmp_path):
    (tmp_path / "folder").mkdir()
    refused(astkit(*RUN, "--config", "folder", cwd=tmp_path), "folder is a folder, not a TOML file")
    refused(astkit(*RUN, "--config", "missing.toml", cwd=tmp_path), "missing.toml does not exist")
    with pytest.raises(UserError, match="is a folder, not a TOML file"):
        RunConfig.load(tmp_path / "folder")
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe seed = 1")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        RunConfig.load(tmp_path / "bad.toml")
    assert files_under(tmp_path) == {"folder", "bad.toml"}


# -------------------------------------------------------------- metadata
def test_metadata_format_that_is_not_an_integer_is_a_file_format_error(tmp_path):
    from safetensors.torch import save_file

    for bad in ("one", None, [1], 1.5, True):
        meta = {"kind": "distilled", "format": bad, "astkit_version": "0"}
        path = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"astkit": json.dumps(meta)})
        with pytest.raises(FileFormatError, match="format that is not an integer"):
            store.read_metadata(path)
    refused(astkit("show", str(path), cwd=tmp_path), "format that is not an integer")
    refused(astkit("evaluate", str(path), "--quiet", cwd=tmp_path), "format that is not an integer")


# ----------------------------------------------------- ipc and eval models
def test_ipc_beyond_the_smallest_class_is_refused_before_the_experts(tmp_path):
    refused(astkit(*RUN, "--ipc", "200", cwd=tmp_path), "distill.ipc = 200 exceeds the smallest class")
    refused(astkit("experts", *CLI, "--set", "distill.ipc=200", "--out", "o", cwd=tmp_path), "exceeds the smallest")
    assert files_under(tmp_path) == set()


def test_ipc_is_checked_by_check_inputs(tmp_path, digits):
    with pytest.raises(UserError, match="exceeds the smallest class"):
        Engine(tiny_config(tmp_path, "distill.ipc=500"), dataset=digits).check_inputs()


def test_unknown_evaluation_model_is_refused_before_anything(tmp_path, made, digits):
    with pytest.raises(UserError, match="unknown model 'nope' in evaluate.models"):
        Engine(tiny_config(tmp_path, "evaluate.models=convnet,nope"), dataset=digits)
    refused(astkit(*RUN, "--set", "evaluate.models=nope", cwd=tmp_path), "unknown model 'nope' in evaluate.models")
    refused(astkit("distill", *CLI, "--set", "evaluate.models=nope", "--experts", str(made / "experts"),
                   "--out", "o", cwd=tmp_path), "unknown model 'nope'")
    refused(astkit("evaluate", str(made / "distilled.safetensors"), "--models", "convnet,nope", "--quiet",
                   cwd=tmp_path), "unknown model 'nope' in --models")
    assert files_under(tmp_path) == set()


# ------------------------------------------------------------------ resume
def copy_run(made: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(made, to)
    return to


def test_resume_with_experts_of_another_width_is_refused_before_training(tmp_path, made):
    copy_run(made, tmp_path / "o")
    before = files_under(tmp_path)
    wider = [*CLI, "--set", "model.width=16", "--set", "experts.num_experts=3", "--out", "o"]
    line = refused(astkit("run", *wider, "--grid-every", "0", "--resume", cwd=tmp_path),
                   "made for convnet(width=8)", "this run uses convnet(width=16)")
    assert "checkpoint.safetensors" in line or "expert_00" in line
    refused(astkit("experts", *wider, "--resume", cwd=tmp_path), "made for convnet(width=8)")
    refused(astkit("experts", *wider, "--only", "2", cwd=tmp_path), "made for convnet(width=8)")
    assert files_under(tmp_path) == before  # expert_002 was not trained


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path, made, digits):
    engine = Engine(tiny_config(tmp_path, "model.width=16", "distill.ipc=1"), dataset=digits)
    with pytest.raises(FileFormatError, match="checkpoint.safetensors: made for convnet\\(width=8\\)"):
        engine.check_checkpoint(made / "checkpoint.safetensors")
    other_ipc = Engine(tiny_config(tmp_path, "distill.ipc=2"), dataset=digits)
    with pytest.raises(FileFormatError, match="holds images \\(10, 1, 8, 8\\), this run makes \\(20, 1, 8, 8\\) \\(distill.ipc 1, not 2\\)"):
        other_ipc.check_checkpoint(made / "checkpoint.safetensors")
    with pytest.raises(FileFormatError, match="expected an astkit checkpoint"):
        other_ipc.check_checkpoint(made / "distilled.safetensors")


def test_train_experts_refuses_a_folder_of_another_model(tmp_path, made, digits):
    config = tiny_config(tmp_path, "model.width=16", "experts.epochs=2", f"experts.dir={made / 'experts'}",
                         "experts.num_experts=3")
    with pytest.raises(FileFormatError, match="made for convnet\\(width=8\\)"):
        Engine(config, dataset=digits).train_experts([2])
    assert not (made / "experts" / "expert_002.safetensors").exists()
    longer = tiny_config(tmp_path, "experts.epochs=3", f"experts.dir={made / 'experts'}", "experts.num_experts=3")
    with pytest.raises(FileFormatError, match="an expert of 2 epochs, this run trains 3"):
        Engine(longer, dataset=digits).train_experts([2])


# -------------------------------------------------------------- file paths
def test_file_arguments_say_what_is_wrong(tmp_path):
    (tmp_path / "d").mkdir()
    refused(astkit("show", "d", cwd=tmp_path), "d is a folder, not an astkit file")
    refused(astkit("show", "missing.safetensors", cwd=tmp_path), "missing.safetensors does not exist")
    refused(astkit("evaluate", "missing.safetensors", "--quiet", cwd=tmp_path), "missing.safetensors does not exist")
    refused(astkit("evaluate", "d", "--quiet", cwd=tmp_path), "d is a folder, not a distilled set")
    refused(astkit("show", "", cwd=tmp_path), "the path is empty")
    assert files_under(tmp_path) == {"d"}


def test_show_png_under_a_missing_folder_is_refused(tmp_path, made):
    distilled = str(made / "distilled.safetensors")
    refused(astkit("show", distilled, "--png", "no/such/grid.png", cwd=tmp_path),
            "the folder no/such does not exist")
    refused(astkit("show", distilled, "--png", ".", cwd=tmp_path), "is a folder")
    assert files_under(tmp_path) == set()


def test_experts_dir_that_is_a_file(tmp_path, digits):
    (tmp_path / "f").write_text("x")
    engine = Engine(tiny_config(tmp_path, f"experts.dir={tmp_path / 'f'}"), dataset=digits)
    with pytest.raises(UserError, match="is a file"):
        engine.load_experts()
    with pytest.raises(UserError, match="is a file"):
        engine.train_experts([0])


def test_out_that_is_a_file_is_refused_before_the_experts(tmp_path, digits):
    (tmp_path / "f").write_text("x")
    engine = Engine(tiny_config(tmp_path, f"out={tmp_path / 'f' / 'run'}"), dataset=digits)
    with pytest.raises(UserError, match="is a file, not a folder"):
        engine.check_inputs()
    refused(astkit(*RUN[:-2], "--out", "f", cwd=tmp_path), "out f: f is a file, not a folder")
    assert files_under(tmp_path) == {"f"}
