"""Datasets: the registry, loaders, normalisation and ZCA; data held once in memory as tensors."""

from astkit.data.dataset import Dataset
from astkit.data.raw import RawData, build_dataset
from astkit.data.registry import BUILTIN_DATASETS, DatasetLoader, dataset_names, describe_dataset, load_dataset
from astkit.data.zca import ZCA

__all__ = [
    "BUILTIN_DATASETS", "Dataset", "DatasetLoader", "RawData", "ZCA", "build_dataset", "dataset_names",
    "describe_dataset", "load_dataset",
]
