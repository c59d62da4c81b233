"""``astkit export`` and ``astkit.load_distilled``: a distilled set as an image
folder and back (issue 16, item 4).

The sets are built from the embedded digits (no training): a file written
with ``DistilledSet.save`` as the engine writes it.
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

import astkit
from astkit import DistilledSet, RunFolder
from astkit.export import from_pixels, load_distilled, to_pixels


def astkit_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def one_error_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def make_set(dataset, *, ipc: int = 2, soft: bool = False, spread: float = 1.5) -> DistilledSet:
    """``ipc`` train images per class, pushed a little out of the pixel range (some values clip)."""
    picks = torch.cat([idx[:ipc] for idx in dataset.class_indices()])
    images = dataset.train_images[picks] * spread
    labels = dataset.train_labels[picks]
    if soft:
        labels = torch.randn(len(picks), dataset.num_classes, generator=torch.Generator().manual_seed(0))
        labels[torch.arange(len(picks)), dataset.train_labels[picks]] += 5.0
    zca = dataset.zca.tensors() if dataset.zca is not None else {}
    meta = {"dataset": dataset.metadata(), "config": {"distill": {"label_temperature": 2.0}}}
    return DistilledSet(images, labels, 0.0123, 7, meta, zca)


@pytest.fixture(scope="module")
def digits_zca():
    from astkit.data import load_dataset

    return load_dataset("digits", zca=True)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.array(image), image.mode


# ------------------------------------------------------------------- export
def test_export_writes_an_image_folder_and_load_distilled_reads_it_back(tmp_path, digits):
    """CLI on a run folder; back within PNG quantisation (1/255 in pixels, /std normalised)."""
    original = make_set(digits)
    run = RunFolder(tmp_path / "run")
    original.save(run.distilled)
    result = astkit_cli("export", "run", "--out", "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exported 20 images of 10 classes to exported" in result.stdout

    out = tmp_path / "exported"
    record = json.loads((out / "labels.json").read_text())
    assert record["format"] == "astkit-export" and record["astkit_version"] == astkit.__version__
    assert record["source"] == str(run.distilled.resolve())
    assert record["class_names"] == digits.class_names and record["lr"] == pytest.approx(0.0123)
    assert record["normalisation"] == {"mean": list(digits.mean), "std": list(digits.std)}
    assert record["zca"] == {"applied": False, "undone": False} and record["soft_labels"] is False
    assert record["clipped_values"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*digits.class_names, "labels.json"])
    labels = original.labels.tolist()
    for i, entry in enumerate(record["images"]):
        assert entry["file"] == f"{digits.class_names[labels[i]]}/{i:02d}.png" and entry["class"] == labels[i]
        pixels, mode = read_png(out / entry["file"])
        assert mode == "L" and pixels.shape == (8, 8)  # 1 channel: grey
        expected = (to_pixels(original.images[i:i + 1], digits.mean, digits.std)[0, 0] * 255).round()
        assert np.array_equal(pixels, expected.to(torch.uint8).numpy())

    back = load_distilled(out)
    assert isinstance(back, torch.utils.data.Dataset) and len(back) == 20
    assert back.lr == pytest.approx(0.0123) and back.class_names == digits.class_names
    assert back.soft is False and back.whitened is False and torch.equal(back.labels, original.labels)
    clipped = from_pixels(to_pixels(original.images, digits.mean, digits.std), digits.mean, digits.std)
    tolerance = (1 / 255) / min(digits.std)
    assert (back.images - clipped).abs().max() <= tolerance
    inside = (to_pixels(original.images, digits.mean, digits.std, clamp=False) - 0.5).abs() < 0.5
    assert inside.float().mean() > 0.2
    assert (back.images - original.images)[inside].abs().max() <= tolerance
    image, label = back[3]
    assert image.shape == (1, 8, 8) and int(label) == labels[3]


def test_load_distilled_from_a_file_or_a_run_folder_gives_the_set_as_distilled(tmp_path, digits):
    original = make_set(digits)
    path = original.save(RunFolder(tmp_path).distilled)
    for source in (path, tmp_path, str(tmp_path)):
        data = astkit.load_distilled(source)
        assert torch.equal(data.images, original.images) and torch.equal(data.labels, original.labels)
        assert data.lr == pytest.approx(0.0123) and data.class_names == digits.class_names
        assert data.soft is False and data.whitened is False and data.iteration == 7
        assert data.source == path
    loader = torch.utils.data.DataLoader(astkit.load_distilled(path), batch_size=8)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 8, 8) and labels.dtype == torch.int64


def test_soft_labels_go_to_their_argmax_class_with_their_logits(tmp_path, digits):
    original = make_set(digits, soft=True)
    path = original.save(tmp_path / "soft.safetensors")
    record = astkit.export.export_distilled(path, tmp_path / "out")
    classes = original.labels.argmax(dim=1).tolist()
    for i, entry in enumerate(record["images"]):
        assert entry["class"] == classes[i] and entry["file"].startswith(f"{classes[i]}/")
        assert torch.equal(torch.tensor(entry["logits"], dtype=torch.float32), original.labels[i])
    assert record["soft_labels"] is True and record["label_temperature"] == 2.0
    back = load_distilled(tmp_path / "out")
    assert back.soft is True and torch.equal(back.labels, original.labels) and back.label_temperature == 2.0
    assert load_distilled(path).soft is True


def test_zca_is_undone_on_export_and_not_reapplied_on_load(tmp_path, digits_zca):
    original = make_set(digits_zca, spread=1.0)
    path = original.save(tmp_path / "zca.safetensors")
    record = astkit.export.export_distilled(path, tmp_path / "out")
    assert record["zca"] == {"applied": True, "undone": True}
    first = record["images"][0]["file"]
    pixels, _ = read_png(tmp_path / "out" / first)
    expected = (digits_zca.denormalise(original.images[:1])[0, 0] * 255).round().to(torch.uint8)  # the dataset's own inverse
    assert np.abs(pixels.astype(int) - expected.numpy().astype(int)).max() <= 1
    back = load_distilled(tmp_path / "out")
    assert back.whitened is False
    unwhitened = digits_zca.zca.invert(original.images)
    clipped = from_pixels(to_pixels(unwhitened, digits_zca.mean, digits_zca.std), digits_zca.mean, digits_zca.std)
    assert (back.images - clipped).abs().max() <= (1 / 255) / min(digits_zca.std) + 1e-4
    assert load_distilled(path).whitened is True


def test_rgb_images_and_class_names_that_are_not_file_names(tmp_path):
    images = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 0.25  # no value clips
    meta = {"dataset": {"name": "fake", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "zca": False,
                        "class_names": ["T-shirt/top", "..", "a", "A"]}}
    path = DistilledSet(images, torch.tensor([0, 1, 2, 3]), 0.01, 0, meta).save(tmp_path / "rgb.safetensors")
    record = astkit.export.export_distilled(path, tmp_path / "out")
    assert record["class_folders"] == ["T-shirt_top", "1", "a", "A-3"]
    assert record["clipped_values"] == 0
    pixels, mode = read_png(tmp_path / "out" / record["images"][0]["file"])
    assert mode == "RGB" and pixels.shape == (5, 6, 3)
    back = load_distilled(tmp_path / "out")
    assert back.images.shape == (4, 3, 5, 6) and back.class_names == meta["dataset"]["class_names"]
    assert (back.images - images).abs().max() <= (1 / 255) / 0.2


def test_a_previous_export_is_replaced_whole(tmp_path, digits):
    first = make_set(digits, ipc=3).save(tmp_path / "a.safetensors")
    second = make_set(digits, ipc=1).save(tmp_path / "b.safetensors")
    astkit.export.export_distilled(first, tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("*.png"))) == 30
    astkit.export.export_distilled(second, tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("*.png"))) == 10  # nothing of the first export is left
    assert len(load_distilled(tmp_path / "out")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "out"]  # no staging left
    (tmp_path / "empty").mkdir()
    astkit.export.export_distilled(second, tmp_path / "empty")
    assert (tmp_path / "empty" / "labels.json").is_file()


def test_figures_draw_with_the_one_pixel_rule():
    from astkit import figures

    assert figures.denormalise is astkit.to_pixels


# ----------------------------------------------------------------- refusals
def test_refusals_are_one_line_and_write_nothing(tmp_path, digits, capsys):
    from astkit.cli import main

    path = make_set(digits).save(tmp_path / "set.safetensors")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_error_line(capsys, main(["export", str(path), "--out", str(busy)]),
                   f"{busy} is not empty and is not a previous astkit export")
    one_error_line(capsys, main(["export", str(path), "--out", str(tmp_path / "new"), "--format", "jpg"]),
                   "unknown format 'jpg'; astkit exports png")
    one_error_line(capsys, main(["export", str(tmp_path), "--out", str(tmp_path / "new")]),
                   "is a folder without distilled.safetensors")
    one_error_line(capsys, main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "new")]),
                   "does not exist")

    exported = tmp_path / "exported"
    astkit.export.export_distilled(path, exported)
    (exported / "0" / "extra.png").write_bytes(b"")
    one_error_line(capsys, main(["export", str(path), "--out", str(exported)]),
                   "holds 0/extra.png, which is not part of its previous export")

    whitened = make_set(digits)
    whitened.meta["dataset"] = {**whitened.meta["dataset"], "zca": True}
    no_inverse = whitened.save(tmp_path / "no_inverse.safetensors")
    one_error_line(capsys, main(["export", str(no_inverse), "--out", str(tmp_path / "new")]),
                   "ZCA-whitened but the file holds no whitening tensors")
    bare = DistilledSet(whitened.images, whitened.labels, 0.01).save(tmp_path / "bare.safetensors")
    one_error_line(capsys, main(["export", str(bare), "--out", str(tmp_path / "new")]),
                   "records no normalisation")

    assert not (tmp_path / "new").exists()
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_distilled_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "labels.json").write_text("{}")
    with pytest.raises(astkit.FileFormatError, match="not a labels.json written by astkit export"):
        load_distilled(tmp_path)
    with pytest.raises(astkit.UserError, match="does not exist"):
        load_distilled(tmp_path / "nothing.safetensors")


def test_export_has_help(capsys):
    from astkit.cli import main

    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "astkit export" in out and "--out" in out and "--format" in out
