"""Arrow columns in the dataset contract → numpy: images from fixed_size_binary, labels from fixed_size_list."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from simgan_dist.errors import DatasetError

if TYPE_CHECKING:
    from simgan_dist.data.schema import Layout


def images_from_binary(column: Any, shape: tuple[int, ...] | list[int], dtype: str | np.dtype) -> np.ndarray:
    """fixed_size_binary image bytes → an N×H×W×C array with one np.frombuffer.

    Takes an Arrow (chunked) array, or the numpy object/bytes array that Ray Data
    and pandas turn such a column into. A single Arrow chunk is decoded without a
    copy (the result is then a read-only view of the Arrow buffer).
    """
    dtype = np.dtype(dtype)
    width = math.prod(shape) * dtype.itemsize
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.Array):
        if not pa.types.is_fixed_size_binary(column.type) or column.type.byte_width != width:
            raise DatasetError(f"image: expected fixed_size_binary({width}), got {column.type}")
        if column.null_count:
            raise DatasetError(f"image: {column.null_count} null image(s)")
        data = column.buffers()[1]
        flat = np.frombuffer(data, dtype=np.uint8, count=len(column) * width, offset=column.offset * width)
    else:
        column = np.asarray(column)
        if column.dtype.kind == "S" and column.dtype.itemsize == width:
            flat = column.view(np.uint8)  # fixed-width bytes: already one buffer
        else:
            if any(len(b) != width for b in column):
                raise DatasetError(f"image: every value must be {width} bytes for shape {list(shape)} {dtype}")
            flat = np.frombuffer(b"".join(column), dtype=np.uint8)
    return flat.view(dtype).reshape(len(flat) // width, *shape)


def labels_from_list(column: Any, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """fixed_size_list<float32> labels (Arrow, or numpy rows of arrays) → float32 N×shape."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.Array):
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.float32, copy=False).reshape(len(column), *shape)
    column = np.asarray(column)
    if column.dtype == object:
        column = np.stack(column) if len(column) else np.zeros((0, math.prod(shape)), np.float32)
    return column.astype(np.float32, copy=False).reshape(len(column), *shape)


def decode_table(table: pa.Table, layout: Layout) -> dict[str, np.ndarray]:
    """An Arrow table in the contract → numpy columns (images N×H×W×C, labels float32 N×shape)."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "image":
            out[name] = images_from_binary(column, layout.image_shape, layout.image_dtype)
        elif name in layout.label_fields:
            out[name] = labels_from_list(column, layout.label_fields[name])
        else:
            out[name] = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
    return out
