"""Importing the reference scripts' files: expert buffers and distilled sets.

The files are made here, in the reference layout, with ``torch.save``: a
buffer is a list of trajectories, each a list of per-epoch lists of the
parameters of DC/DSA/MTT's ``ConvNet`` in its ``net.parameters()`` order
(restated below from ``_make_layers``, not read from astkit's model); a
distilled set is ``images_best.pt`` / ``labels_best.pt`` / ``lr_best.pt``.
Everything runs on digits (1x8x8, 10 classes) at width 8.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astkit.errors import FileFormatError, UserError
from astkit.importing import import_buffers, import_distilled, load_plain, read_buffer, resolve_convnet
from astkit.importing.convnet import AMBIGUOUS_NORM_NOTE
from astkit.results import DistilledSet
from astkit.trajectory import Trajectory

DIGITS = dict(channels=1, num_classes=10, image_size=(8, 8))
TINY_DISTILL = ["--set", "distill.iterations=2", "--set", "distill.syn_steps=3", "--set", "distill.ipc=2",
                "--set", "distill.expert_epochs=1", "--set", "distill.max_start_epoch=2", "--grid-every", "0"]


# ----------------------------------------------------------- the reference
def reference_shapes(channels: int, num_classes: int, image_size: tuple[int, int], width: int, depth: int,
                     norm: str = "instancenorm", pooling: str = "avgpooling") -> list[tuple[int, ...]]:
    """The shapes of ``[p for p in net.parameters()]`` of the reference ConvNet:
    per block the conv (weight, bias), then the norm's affine (weight, bias):
    GroupNorm(width, width) / BatchNorm2d(width): (width,); LayerNorm over the
    planned C x H x W; none: nothing; pooling halves the planned map; then
    the classifier Linear(width * H * W, classes) (weight, bias). A 28 px
    image is planned as 32 px."""
    h, w = (32, 32) if image_size[0] == 28 else image_size
    shapes, in_channels = [], channels
    for _ in range(depth):
        shapes += [(width, in_channels, 3, 3), (width,)]
        if norm in ("instancenorm", "batchnorm"):
            shapes += [(width,), (width,)]
        elif norm == "layernorm":
            shapes += [(width, h, w), (width, h, w)]
        if pooling != "none":
            h, w = h // 2, w // 2
        in_channels = width
    return shapes + [(num_classes, width * h * w), (num_classes,)]


def astkit_names(depth: int, norm: str = "instancenorm") -> list[str]:
    """astkit's name of each reference parameter: block d is features.4d (conv),
    4d+1 (norm), 4d+2 (activation), 4d+3 (pooling)."""
    names = []
    for d in range(depth):
        names += [f"features.{4 * d}.weight", f"features.{4 * d}.bias"]
        if norm != "none":
            names += [f"features.{4 * d + 1}.weight", f"features.{4 * d + 1}.bias"]
    return names + ["classifier.weight", "classifier.bias"]


def make_buffer(path: Path, shapes, *, trajectories: int = 2, epochs: int = 4, seed: int = 0) -> list:
    """``torch.save`` a reference buffer: ``trajectories`` x (``epochs`` + 1) lists of tensors."""
    generator = torch.Generator().manual_seed(seed)
    buffer = []
    for _ in range(trajectories):
        start = [torch.randn(s, generator=generator) * 0.1 for s in shapes]
        timestamps = [start]
        for _ in range(epochs):
            timestamps.append([p + 0.01 * torch.randn(p.shape, generator=generator) for p in timestamps[-1]])
        buffer.append(timestamps)
    torch.save(buffer, path)
    return buffer


def astkit(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def one_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------ import-buffer
def test_import_buffer_keeps_every_tensor_and_distils_with_the_printed_command(tmp_path):
    shapes = reference_shapes(1, 10, (8, 8), width=8, depth=2)
    buffer = make_buffer(tmp_path / "replay_buffer_0.pt", shapes, trajectories=2, epochs=4)
    result = ok(astkit("import-buffer", "replay_buffer_0.pt", "--dataset", "digits", "--out", "experts",
                       cwd=tmp_path))
    assert "assuming instancenorm" in result.stderr  # per-channel norm parameters: said, not silent
    lines = result.stdout.splitlines()
    assert lines[0].startswith("experts: experts (2 imported, 4 epochs each, convnet(width=8)"), lines
    command = lines[1].removeprefix("distil with: ")
    assert shlex.split(command)[:6] == ["astkit", "distill", "--dataset", "digits", "--experts", "experts"]
    assert "model.width=8" in command

    files = sorted((tmp_path / "experts").glob("*.safetensors"))
    assert [f.name for f in files] == ["expert_000.safetensors", "expert_001.safetensors"]
    names = astkit_names(depth=2)
    for t, path in enumerate(files):
        trajectory = Trajectory.load(path)
        assert trajectory.num_epochs == 4 and trajectory.test_accuracy == []
        assert trajectory.model.options == {"width": 8}
        assert trajectory.meta["dataset"]["name"] == "digits"
        assert trajectory.meta["source"]["trajectory"] == t
        assert trajectory.meta["source"]["file"].endswith("replay_buffer_0.pt")
        assert trajectory.meta["origin"] == f"imported from replay_buffer_0.pt, trajectory {t}"
        for epoch in range(5):
            params = trajectory.params(epoch)
            assert len(params) == len(names)
            for name, saved in zip(names, buffer[t][epoch]):
                torch.testing.assert_close(params[name], saved, rtol=0, atol=0)

    run = [*shlex.split(command)[1:], *TINY_DISTILL, "--out", "run"]
    ok(astkit(*run, cwd=tmp_path))
    assert DistilledSet.load(tmp_path / "run" / "distilled.safetensors").images.shape == (20, 1, 8, 8)
    assert (tmp_path / "run" / "avg_var.png").is_file()  # Avg_Var of experts that record no accuracy
    assert "Mean Avg_Var" in (tmp_path / "run" / "report.md").read_text()
    shown = ok(astkit("show", "experts/expert_001.safetensors", cwd=tmp_path)).stdout
    assert "Avg_Var" in shown and "final test accuracy" in shown


def test_import_buffer_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save([[[RunsCodeOnLoad(str(marker))], [RunsCodeOnLoad(str(marker))]]], tmp_path / "evil.pt")
    result = astkit("import-buffer", "evil.pt", "--dataset", "digits", "--out", "experts", cwd=tmp_path)
    one_error(result, "evil.pt: not a plain tensor buffer", "weights_only=True")
    assert not marker.exists()
    assert not (tmp_path / "experts").exists()


class RunsCodeOnLoad:
    """Unpickling it calls ``open(path, "w")``: a file appears if the pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class SetsStateOnLoad:
    """Unpickling it calls ``__setstate__``, which writes a file."""

    def __init__(self, path: str):
        self.path = path

    def __setstate__(self, state):
        Path(state["path"]).write_text("ran")


def test_a_class_outside_torchs_allowed_list_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.save([[[SetsStateOnLoad(str(marker))]]], tmp_path / "state.pt")
    with pytest.raises(FileFormatError, match=r"not a plain tensor buffer \(it needs .*SetsStateOnLoad\)") as err:
        read_buffer(tmp_path / "state.pt")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_import_buffer_refuses_a_shape_mismatch_naming_the_parameter(tmp_path):
    make_buffer(tmp_path / "buffer.pt", reference_shapes(1, 10, (8, 8), width=8, depth=2), epochs=2)
    result = astkit("import-buffer", "buffer.pt", "--dataset", "digits", "--width", "16", "--out", "experts",
                    cwd=tmp_path)
    one_error(result, "buffer.pt: parameter 0 (block 1 conv weight) is (8, 1, 3, 3)", "has (16, 1, 3, 3)",
              "features.0.weight")
    assert not (tmp_path / "experts").exists()


@pytest.mark.parametrize("shapes, fragment", [
    (reference_shapes(3, 10, (8, 8), 8, 2), "parameter 0 (block 1 conv weight) is (8, 3, 3, 3)"),
    (reference_shapes(1, 100, (8, 8), 8, 2), "(classifier weight) is (100, 32)"),
    (reference_shapes(1, 10, (32, 32), 8, 3), "(classifier weight) is (10, 128)"),
], ids=["3 channels", "100 classes", "32 px"])
def test_a_buffer_of_another_dataset_is_refused(tmp_path, digits, shapes, fragment):
    make_buffer(tmp_path / "b.pt", shapes, trajectories=1, epochs=1)
    with pytest.raises(FileFormatError, match="pass the dataset the buffer was made on") as err:
        import_buffers([tmp_path / "b.pt"], digits, tmp_path / "experts")
    assert fragment in str(err.value)
    assert not (tmp_path / "experts").exists()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "layernorm", "none"])
def test_width_depth_and_norm_are_read_from_the_shapes(norm, depth):
    shapes = reference_shapes(1, 10, (8, 8), width=4, depth=depth, norm=norm)
    spec, notes = resolve_convnet(shapes, **DIGITS, given={}, registry=None, source="b.pt")
    expected_norm = "instancenorm" if norm == "batchnorm" else norm  # the shapes cannot tell these two apart
    options = {"width": 4, "norm": expected_norm, "depth": depth}
    defaults = {"norm": "instancenorm", "depth": 2}
    assert spec.options == {k: v for k, v in options.items() if defaults.get(k) != v}
    assert notes == ([AMBIGUOUS_NORM_NOTE] if expected_norm == "instancenorm" else [])
    given, _ = resolve_convnet(shapes, **DIGITS, given={"norm": norm}, registry=None, source="b.pt")
    assert given.options["norm"] == norm


def test_given_options_are_recorded_as_given_and_pooling_none_is_read():
    shapes = reference_shapes(1, 10, (8, 8), width=128, depth=2)
    spec, _ = resolve_convnet(shapes, **DIGITS, given={}, registry=None, source="b.pt")
    assert spec.options == {}  # every option at astkit's default: `astkit distill` needs no model key
    spec, notes = resolve_convnet(shapes, **DIGITS, given={"width": 128, "norm": "instancenorm"}, registry=None,
                                  source="b.pt")
    assert spec.options == {"width": 128, "norm": "instancenorm"} and notes == []
    flat = reference_shapes(1, 10, (8, 8), width=4, depth=2, pooling="none")
    spec, _ = resolve_convnet(flat, **DIGITS, given={}, registry=None, source="b.pt")
    assert spec.options == {"width": 4, "depth": 2, "pooling": "none"}  # without pooling the default depth is 3


@pytest.mark.parametrize("content, fragment", [
    ({"trajectories": []}, "holds a dict, not a list of trajectories"),
    ([], "holds no trajectory"),
    ([[[1.0, 2.0], [3.0, 4.0]]], "trajectory 0, epoch 0, parameter 0 is a float, not a tensor"),
    ([[torch.zeros(3), torch.zeros(3)]], "trajectory 0 is a list of tensors (one epoch?)"),
    ([[[torch.zeros(3)]]], "trajectory 0 has 1 epoch(s)"),
    ([[[torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)]]], "torch.int64 tensor"),
    ([[[torch.zeros(3)], [torch.zeros(4)]]],
     "trajectory 0, epoch 1: parameter 0 is (4,), trajectory 0, epoch 0 has (3,)"),
    ([[[torch.zeros(3)], [torch.zeros(3)]], [[torch.zeros(3)], [torch.zeros(3), torch.zeros(1)]]],
     "trajectory 1, epoch 1: 2 parameters, trajectory 0, epoch 0 has 1"),
    ([[[torch.zeros(3)], [torch.tensor([0.0, float("nan"), 0.0])]]], "parameter 0 holds NaN or Inf"),
    ("not a buffer", "holds a str"),
], ids=["dict", "empty", "floats", "one trajectory unwrapped", "one epoch", "integers", "shape changes",
        "count changes", "nan", "str"])
def test_anything_but_the_reference_layout_is_refused_in_one_line(tmp_path, content, fragment):
    torch.save(content, tmp_path / "b.pt")
    with pytest.raises(FileFormatError) as err:
        read_buffer(tmp_path / "b.pt")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_file_torch_did_not_write_is_refused(tmp_path):
    (tmp_path / "b.pt").write_text("not a torch file")
    with pytest.raises(FileFormatError, match="not a file torch.save wrote"):
        load_plain(tmp_path / "b.pt")


def test_numbering_continues_and_another_network_in_the_folder_is_refused(tmp_path, digits):
    shapes = reference_shapes(1, 10, (8, 8), width=8, depth=2)
    make_buffer(tmp_path / "a.pt", shapes, trajectories=2, epochs=2)
    make_buffer(tmp_path / "b.pt", shapes, trajectories=1, epochs=3, seed=1)
    out = tmp_path / "experts"
    first = import_buffers([tmp_path / "a.pt"], digits, out)
    second = import_buffers([tmp_path / "b.pt"], digits, out)
    assert [p.name for p in first.files] == ["expert_000.safetensors", "expert_001.safetensors"]
    assert [p.name for p in second.files] == ["expert_002.safetensors"] and second.epochs == [3]
    make_buffer(tmp_path / "wide.pt", reference_shapes(1, 10, (8, 8), width=16, depth=2), trajectories=1, epochs=2)
    with pytest.raises(FileFormatError, match=r"expert_000.safetensors: an expert of convnet\(width=8\)"):
        import_buffers([tmp_path / "wide.pt"], digits, out)
    assert len(list(out.glob("*.safetensors"))) == 3


def test_an_error_in_a_later_buffer_removes_what_was_written(tmp_path, digits):
    make_buffer(tmp_path / "a.pt", reference_shapes(1, 10, (8, 8), width=8, depth=2), trajectories=2, epochs=2)
    make_buffer(tmp_path / "b.pt", reference_shapes(1, 10, (8, 8), width=8, depth=1), trajectories=1, epochs=2)
    out = tmp_path / "experts"
    with pytest.raises(FileFormatError, match=r"b.pt: .*import buffers of one network together"):
        import_buffers([tmp_path / "a.pt", tmp_path / "b.pt"], digits, out)
    assert not out.exists()


def test_only_the_reference_convnet_is_mapped(tmp_path, digits):
    make_buffer(tmp_path / "a.pt", reference_shapes(1, 10, (8, 8), width=8, depth=2), trajectories=1, epochs=1)
    with pytest.raises(UserError, match="maps the reference ConvNet only"):
        import_buffers([tmp_path / "a.pt"], digits, tmp_path / "experts", model="resnet18")


def test_imported_experts_record_zca_and_a_run_without_it_refuses_them(tmp_path):
    from astkit.config import RunConfig
    from astkit.data import load_dataset
    from astkit.engine import Engine

    whitened = load_dataset("digits", zca=True)
    make_buffer(tmp_path / "a.pt", reference_shapes(1, 10, (8, 8), width=8, depth=2), trajectories=1, epochs=3)
    written = import_buffers([tmp_path / "a.pt"], whitened, tmp_path / "experts").files
    assert Trajectory.load(written[0]).meta["dataset"]["zca"] is True
    engine = Engine(RunConfig.load(overrides=["model.width=8", f"experts.dir={tmp_path / 'experts'}"]))
    with pytest.raises(FileFormatError, match="made with ZCA whitening; set data.zca to match"):
        engine.load_experts()


# --------------------------------------------------------- import-distilled
def test_import_distilled_hard_and_soft_labels_then_evaluate_and_show(tmp_path):
    generator = torch.Generator().manual_seed(0)
    torch.save(torch.randn(20, 1, 8, 8, generator=generator), tmp_path / "images_best.pt")
    torch.save(torch.arange(10).repeat_interleave(2), tmp_path / "labels_best.pt")  # MTT: int64, class order
    torch.save(0.02, tmp_path / "lr_best.pt")  # MTT saves syn_lr.item(), a float
    torch.save(torch.randn(20, 10, generator=generator), tmp_path / "soft.pt")  # DATM: learned logits
    torch.save(torch.tensor(0.03), tmp_path / "lr.pt")

    hard = ok(astkit("import-distilled", "--images", "images_best.pt", "--labels", "labels_best.pt",
                     "--lr", "lr_best.pt", "--dataset", "digits", "--out", "hard.safetensors", cwd=tmp_path))
    assert hard.stdout.startswith("distilled: hard.safetensors (20 images, 2 per class, hard labels, lr 0.02)")
    soft = ok(astkit("import-distilled", "--images", "images_best.pt", "--labels", "soft.pt", "--lr", "lr.pt",
                     "--dataset", "digits", "--out", "soft.safetensors", cwd=tmp_path))
    assert "soft labels, lr 0.03" in soft.stdout

    loaded = DistilledSet.load(tmp_path / "soft.safetensors")
    torch.testing.assert_close(loaded.images, torch.load(tmp_path / "images_best.pt", weights_only=True))
    torch.testing.assert_close(loaded.labels, torch.load(tmp_path / "soft.pt", weights_only=True))
    assert loaded.meta["origin"] == "imported from images_best.pt, soft.pt, lr.pt"
    assert loaded.meta["config"]["data"]["dataset"] == "digits" and loaded.zca == {}

    result = ok(astkit("evaluate", "soft.safetensors", "--epochs", "3", "--num-nets", "1", "--set", "model.width=8",
                       cwd=tmp_path))
    assert result.stdout.startswith("accuracy (convnet, 1 net): ")
    shown = ok(astkit("show", "soft.safetensors", cwd=tmp_path)).stdout
    assert "soft (20x10 logits)" in shown and (tmp_path / "soft.png").is_file()
    # the hard-label file in process (one command less): evaluate reads its recorded data section
    from astkit.config import RunConfig
    from astkit.engine import Engine

    distilled = DistilledSet.load(tmp_path / "hard.safetensors")
    config = RunConfig.from_dict({**distilled.meta["config"], "evaluate": {"epochs": 3, "num_nets": 1}})
    config.set("model.width", 8)
    accuracy = Engine(config).evaluate(distilled)["convnet"].mean
    assert 0.0 <= accuracy <= 1.0


def test_labels_default_to_ipc_per_class_in_class_order(tmp_path, digits):
    torch.save(torch.randn(30, 1, 8, 8), tmp_path / "images.pt")
    distilled, notes = import_distilled(tmp_path / "images.pt", digits, tmp_path / "d.safetensors", default_lr=0.01)
    assert distilled.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert distilled.lr == 0.01 and "no --lr given" in notes[0]
    torch.save(torch.randn(25, 1, 8, 8), tmp_path / "odd.pt")
    with pytest.raises(UserError, match="25 images do not divide into 10 classes"):
        import_distilled(tmp_path / "odd.pt", digits, tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()


@pytest.mark.parametrize("images, labels, lr, fragment", [
    (torch.randn(20, 3, 8, 8), None, None, "images are (20, 3, 8, 8), digits has (N, 1, 8, 8) images"),
    (torch.zeros(20, 1, 8, 8, dtype=torch.uint8), None, None, "images are torch.uint8"),
    ([torch.randn(1, 8, 8)], None, None, "holds a list, not an image tensor"),
    (torch.randn(20, 1, 8, 8), torch.arange(20), None, "hard labels must lie in 0..9"),
    (torch.randn(20, 1, 8, 8), torch.randn(20, 7), None, "soft labels are (20, 7), expected (20, 10)"),
    (torch.randn(20, 1, 8, 8), torch.zeros(20), None, "hard labels must be integers"),
    (torch.randn(20, 1, 8, 8), None, torch.tensor([0.1, 0.2]), "holds a tensor of shape (2,), not a number"),
    (torch.randn(20, 1, 8, 8), None, -0.5, "the lr is -0.5"),
], ids=["channels", "uint8", "list", "label range", "soft classes", "float hard", "lr vector", "negative lr"])
def test_import_distilled_refuses_what_does_not_fit_the_dataset(tmp_path, digits, images, labels, lr, fragment):
    torch.save(images, tmp_path / "images.pt")
    kwargs = {}
    for name, value in (("labels", labels), ("lr", lr)):
        if value is not None:
            torch.save(value, tmp_path / f"{name}.pt")
            kwargs[name] = tmp_path / f"{name}.pt"
    with pytest.raises(UserError) as err:
        import_distilled(tmp_path / "images.pt", digits, tmp_path / "d.safetensors", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "d.safetensors").exists()


def test_import_distilled_refuses_code_and_an_existing_out(tmp_path, digits):
    marker = tmp_path / "PWNED"
    torch.save(RunsCodeOnLoad(str(marker)), tmp_path / "images.pt")
    with pytest.raises(FileFormatError, match="not a plain tensor file"):
        import_distilled(tmp_path / "images.pt", digits, tmp_path / "d.safetensors")
    assert not marker.exists()
    (tmp_path / "d.safetensors").write_text("keep me")
    torch.save(torch.randn(10, 1, 8, 8), tmp_path / "images.pt")
    with pytest.raises(UserError, match="already exists"):
        import_distilled(tmp_path / "images.pt", digits, tmp_path / "d.safetensors")
    assert (tmp_path / "d.safetensors").read_text() == "keep me"


def test_import_distilled_with_zca_stores_the_whitening(tmp_path):
    from astkit.data import load_dataset

    whitened = load_dataset("digits", zca=True)
    torch.save(torch.randn(10, 1, 8, 8), tmp_path / "images.pt")
    distilled, _ = import_distilled(tmp_path / "images.pt", whitened, tmp_path / "d.safetensors")
    loaded = DistilledSet.load(tmp_path / "d.safetensors")
    assert loaded.zca and loaded.meta["dataset"]["zca"] is True
    loaded.check_fits(whitened)
    with pytest.raises(FileFormatError, match="disagree on ZCA"):
        loaded.check_fits(load_dataset("digits"))
