"""astkit.data: registry, loaders, normalisation, ZCA."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from astkit.data import BUILTIN_DATASETS, ZCA, RawData, dataset_names, describe_dataset, load_dataset
from astkit.data.folders import IMAGENET_MEAN, MTT_SUBSET_CLASSES
from astkit.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR, read_idx
from astkit.errors import FileFormatError, UserError


# ``digits`` (the loaded digits Dataset) is a session fixture from conftest.py.


def channel_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images.transpose(0, 1).reshape(images.shape[1], -1)
    return flat.mean(1), flat.std(1)


# ----------------------------------------------------------------- registry
def test_registry_names_and_descriptions():
    expected = {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet", "imagefolder",
                "imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow"}
    assert set(dataset_names()) == expected == set(BUILTIN_DATASETS)
    assert dataset_names() == sorted(dataset_names())
    for name in expected:
        line = describe_dataset(name)
        assert line.startswith(f"{name}: ") and "\n" not in line and len(line) > len(name) + 5


def test_custom_registry():
    def tiny(root, download):
        """tiny: two classes."""
        images = torch.rand(6, 2, 4, 5)
        return RawData(images, [0, 1, 0, 1, 0, 1], images[:2], [1, 0], ["a", "b"], source="mem")

    registry = {"tiny": tiny}
    ds = load_dataset("tiny", registry=registry)
    assert (ds.channels, ds.image_size, ds.num_classes) == (2, (4, 5), 2)
    assert dataset_names(registry) == ["tiny"] and describe_dataset("tiny", registry) == "tiny: two classes."
    mean, std = channel_moments(ds.train_images)
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5) and torch.allclose(std, torch.ones(2), atol=0.15)


# ----------------------------------------------------------------- digits
def test_digits_shapes_and_normalisation(digits):
    assert digits.train_images.shape == (1347, 1, 8, 8) and digits.test_images.shape == (450, 1, 8, 8)
    assert digits.train_images.dtype == torch.float32 and digits.train_labels.dtype == torch.int64
    assert digits.class_names == [str(i) for i in range(10)]
    assert (digits.num_classes, digits.channels, digits.image_size) == (10, 1, (8, 8))
    assert digits.source == "sklearn" and digits.zca is None
    mean, std = channel_moments(digits.train_images)
    assert abs(float(mean[0])) < 1e-4 and abs(float(std[0]) - 1) < 1e-3
    json.dumps(digits.metadata())
    meta = digits.metadata()
    assert meta["num_train"] == 1347 and meta["num_test"] == 450 and meta["zca"] is False


def test_digits_split_is_stratified_and_deterministic(digits):
    again = load_dataset("digits")
    assert torch.equal(again.train_images, digits.train_images) and torch.equal(again.test_labels, digits.test_labels)
    train_counts = torch.bincount(digits.train_labels, minlength=10).float()
    test_counts = torch.bincount(digits.test_labels, minlength=10).float()
    fraction = test_counts / (train_counts + test_counts)
    assert torch.all((fraction - 0.25).abs() < 0.01)


def test_class_indices(digits):
    indices = digits.class_indices()
    assert indices is digits.class_indices() and len(indices) == 10
    assert sum(len(i) for i in indices) == len(digits.train_labels)
    for label, idx in enumerate(indices):
        assert torch.all(digits.train_labels[idx] == label)


# ----------------------------------------------------------------- idx
def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    data = struct.pack(">HBB", 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(directory: Path, gz: bool, train: int = 20, test: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train, 28, 28), dtype=np.uint8)
    write_idx(directory / "train-images-idx3-ubyte", images, gz)
    write_idx(directory / "train-labels-idx1-ubyte", (np.arange(train) % 10).astype(np.uint8), gz)
    write_idx(directory / "t10k-images-idx3-ubyte", images[:test], gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", (np.arange(test) % 10).astype(np.uint8), gz)
    return images


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array, gz)
    assert np.array_equal(read_idx(tmp_path / ("a.gz" if gz else "a")), array)
    wide = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "b", wide, gz)
    assert read_idx(tmp_path / ("b.gz" if gz else "b")).tolist() == [1, -2, 70000]


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(FileFormatError):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("sub,gz", [("", True), ("mnist", False), ("raw", True), ("MNIST/raw", False)])
def test_mnist_search_paths(tmp_path, sub, gz):
    images = write_mnist(tmp_path / sub, gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_images.shape == (20, 1, 28, 28) and ds.test_images.shape == (10, 1, 28, 28)
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert Path(ds.source) == tmp_path / sub
    assert torch.equal(ds.train_labels, torch.arange(20) % 10)
    assert torch.allclose(ds.denormalise(ds.train_images), torch.from_numpy(images[:, None]) / 255, atol=1e-6)


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.mean == (0.2861,)
    with pytest.raises(UserError, match="mnist: no idx files"):  # mnist never takes Fashion-MNIST's folder
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                    reason=f"{FASHION_MNIST_SYSTEM_DIR} missing: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((10,), 6000))
    mean, std = channel_moments(ds.train_images)
    assert abs(float(mean[0])) < 0.01 and abs(float(std[0]) - 1) < 0.01


# ----------------------------------------------------------------- folders
def write_pngs(directory: Path, count: int, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(directory / f"{i}.png")


def test_imagefolder(tmp_path):
    for k, cls in enumerate(["cat", "dog", "eel"]):
        write_pngs(tmp_path / "train" / cls, 4, (10, 12), seed=k)
        write_pngs(tmp_path / "test" / cls, 2, (20, 30), seed=10 + k)  # resized to the first image's size
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.class_names == ["cat", "dog", "eel"]
    assert ds.train_images.shape == (12, 3, 10, 12) and ds.test_images.shape == (6, 3, 10, 12)
    assert ds.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    mean, std = channel_moments(ds.train_images)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-2)
    first = np.array(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.allclose(ds.denormalise(ds.train_images[0]) * 255, torch.from_numpy(first).permute(2, 0, 1).float(),
                          atol=1e-3)


def test_imagefolder_grayscale_val(tmp_path):
    write_pngs(tmp_path / "train" / "a", 3, (6, 6), mode="L")
    write_pngs(tmp_path / "train" / "b", 3, (6, 6), mode="L")
    write_pngs(tmp_path / "val" / "b", 2, (6, 6), mode="L")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.train_images.shape == (6, 1, 6, 6) and ds.test_labels.tolist() == [1, 1]


def test_imagenet_subset(tmp_path):
    for k, cls in enumerate(["n01", "n02"]):
        write_pngs(tmp_path / "train" / cls, 3, (40, 30), seed=k)
        write_pngs(tmp_path / "val" / cls, 1, (30, 40), mode="L", seed=5 + k)
    ds = load_dataset("imagewoof", tmp_path)
    assert ds.train_images.shape == (6, 3, 128, 128) and ds.test_images.shape == (2, 3, 128, 128)
    assert ds.class_names == ["n01", "n02"] and ds.mean == IMAGENET_MEAN


def test_imagenet_subset_from_full_imagenet(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        (tmp_path / "train" / w).mkdir(parents=True)
    chosen = [wnids[i] for i in MTT_SUBSET_CLASSES["imagenette"]]
    for w in chosen:
        write_pngs(tmp_path / "train" / w, 1, (8, 8))
        write_pngs(tmp_path / "val" / w, 1, (8, 8))
    ds = load_dataset("imagenette", tmp_path)
    assert ds.class_names == chosen and ds.train_images.shape == (10, 3, 128, 128)


def test_tiny_imagenet_official_layout(tmp_path):
    for k, w in enumerate(["n001", "n002"]):
        d = tmp_path / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * k, 10 * i, 0)).save(d / f"{w}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    for i, w in enumerate(["n002", "n001", "n002"]):
        Image.new("RGB", (64, 64)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
    lines = [f"val_{i}.JPEG\t{w}\t0\t0\t63\t63" for i, w in enumerate(["n002", "n001", "n002"])]
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("tiny-imagenet", tmp_path)
    assert ds.train_images.shape == (4, 3, 64, 64) and ds.test_labels.tolist() == [1, 0, 1]
    assert ds.class_names == ["n001", "n002"]


# ----------------------------------------------------------------- ZCA
def test_zca_round_trip_and_tensors(digits):
    zca = ZCA.fit(digits.train_images, eps=0.1)
    assert zca.mean.shape == (1, 64) and zca.transform.shape == zca.inverse.shape == (64, 64)
    white = zca.apply(digits.test_images)
    assert white.shape == digits.test_images.shape
    assert torch.allclose(zca.invert(white), digits.test_images, atol=1e-3)
    again = ZCA.from_tensors(zca.eps, zca.tensors())
    assert again.eps == zca.eps and all(torch.equal(a, b) for a, b in zip(again.tensors().values(),
                                                                          zca.tensors().values()))
    with pytest.raises(FileFormatError):
        ZCA.from_tensors(0.1, {"mean": zca.mean})


def test_zca_matches_kornia(digits):
    from kornia.enhance import ZCAWhitening

    ours = ZCA.fit(digits.train_images, eps=0.1)
    theirs = ZCAWhitening(eps=0.1, compute_inv=True).fit(digits.train_images)
    assert torch.allclose(ours.apply(digits.test_images), theirs(digits.test_images), atol=1e-5)


def test_load_with_zca_and_denormalise(digits):
    ds = load_dataset("digits", zca=True, zca_eps=0.2)
    assert ds.zca is not None and ds.zca.eps == 0.2
    meta = ds.metadata()
    assert meta["zca"] is True and meta["zca_eps"] == 0.2
    assert torch.allclose(ds.train_images, ds.zca.apply(digits.train_images), atol=1e-5)
    pixels = digits.denormalise(digits.test_images)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(ds.denormalise(ds.test_images), pixels, atol=1e-4)
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float() / 16
    assert any(torch.allclose(pixels[0, 0], img, atol=1e-5) for img in raw)


# ----------------------------------------------------------------- errors
def one_line_error(match: str, name: str, root=None) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_dataset(name, root)
    assert "\n" not in str(info.value)


def test_unknown_name():
    one_line_error("unknown dataset 'nope'; known datasets: cifar10, cifar100, digits", "nope")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn", "imagefolder", "tiny-imagenet", "imagenette"])
def test_missing_root(name):
    one_line_error(f"{name}: no data root given; pass --data-root DIR", name)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar100", "imagefolder", "imageyellow"])
def test_missing_directory(tmp_path, name):
    one_line_error(f"{name}: no directory .*nowhere", name, tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    one_line_error("fashion-mnist: no idx files in .*dataset-fashion-mnist or pass --data-root DIR",
                   "fashion-mnist", tmp_path)
    one_line_error("cifar10: no cifar-10-batches-py in", "cifar10", tmp_path)
    one_line_error("imagefolder: no train/ folder in", "imagefolder", tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    one_line_error("imagefolder: no class folders in", "imagefolder", tmp_path)
    (tmp_path / "train" / "a").mkdir()
    one_line_error("class folder .*a holds no images", "imagefolder", tmp_path)
