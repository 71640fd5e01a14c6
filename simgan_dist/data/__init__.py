"""Datasets: storage URIs, the Parquet contract, the simulator and Ray Data pipelines.

Importing this package does not import Ray; `simgan_dist.data.pipeline` does.
"""

from simgan_dist.data.schema import (
    DatasetError,
    DatasetWriter,
    Layout,
    Manifest,
    images_from_binary,
    load_numpy,
    read_manifest,
    validate,
)
from simgan_dist.data.storage import StorageError, join, resolve

__all__ = [
    "DatasetError",
    "DatasetWriter",
    "Layout",
    "Manifest",
    "StorageError",
    "images_from_binary",
    "join",
    "load_numpy",
    "read_manifest",
    "resolve",
    "validate",
]
