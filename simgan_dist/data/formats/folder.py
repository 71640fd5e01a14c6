"""An image folder (PNG/JPEG) with an optional labels CSV, for real data in no dedicated format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from simgan_dist.data.formats.base import Format, IngestError, Quarantined, Row, open_image
from simgan_dist.data.schema import Layout


class Folder(Format):
    """Any PNG/JPEG under SRC → gray (or RGB for 3-channel models), resized to the model's size.

    The optional labels CSV has an `id` (or `filename`) column matching the image's path
    relative to SRC, with or without its extension; other columns are labels, grouped by
    name: gaze_x, gaze_y, gaze_z → `gaze` [3]; a column without siblings is a label of size 1.
    Labels in pixels of the source image are scaled with it: `*_xy` and `*_uv` fields are
    (x, y) pairs, `*_uvd` fields (u, v, depth) triples whose depth stays as it is.
    """

    name = "folder"

    def __init__(self, src, kind, cfg, labels_csv):
        super().__init__(src, kind, cfg, labels_csv)
        self.labels_csv = labels_csv
        model = cfg.model
        if model.image_channels not in (1, 3):
            raise IngestError(f"model.image_channels: the folder format makes 1 or 3 channels, "
                              f"got {model.image_channels}")
        self.shape = (model.image_height, model.image_width, model.image_channels)

    def scan(self):
        images = self.files(r"\.(png|jpe?g)$")
        if not images:
            raise IngestError(f"{self.src}: no PNG or JPEG images found")
        if self.labels_csv is None:
            return Layout(self.shape), [(rel, {}) for rel in images], []
        fields, table = read_labels_csv(self.labels_csv)
        for field, (size,) in fields.items():
            if pixel_step(field) and size % pixel_step(field):
                raise IngestError(f"{self.labels_csv}: label {field!r} has {size} column(s); a pixel label "
                                  f"needs a multiple of {pixel_step(field)}")
        items, bad, used = [], [], set()
        for rel in images:
            key = rel if rel in table else rel.rsplit(".", 1)[0]
            if key in table:
                used.add(key)
                items.append((rel, table[key]))
            else:
                bad.append(Quarantined(rel, "missing label", f"no row for {rel!r} in {self.labels_csv.name}"))
        bad += [Quarantined(f"{self.labels_csv.name}:{key}", "missing file", f"labels row {key!r} has no image")
                for key in table if key not in used]
        return Layout(self.shape, "uint8", fields), items, bad

    def where(self, item):
        return item[0]

    def read_item(self, item, handle):
        rel, labels = item
        img = open_image(self.src / rel, "L" if self.shape[2] == 1 else "RGB")
        image = np.asarray(img.resize((self.shape[1], self.shape[0]), Image.BILINEAR))
        yield Row(rel, image.reshape(self.shape), scale_pixel_labels(labels, img.size, self.shape), rel)


def pixel_step(field: str) -> int:
    """Values per point of a label in pixels ((x, y) or (u, v, depth)); 0 for other labels."""
    return 2 if field.endswith(("_xy", "_uv")) else 3 if field.endswith("_uvd") else 0


def scale_pixel_labels(labels: dict[str, np.ndarray], size: tuple[int, int],
                       shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Pixel labels of a (width, height) `size` image → the same points in the resized image
    (pixel centres at integers, as `to_crop`)."""
    scale = np.array([shape[1] / size[0], shape[0] / size[1]], np.float32)
    out = {}
    for field, value in labels.items():
        if pixel_step(field):
            points = np.array(value, np.float32).reshape(-1, pixel_step(field))
            points[:, :2] = (points[:, :2] + 0.5) * scale - 0.5
            value = points.reshape(np.shape(value))
        out[field] = value
    return out


def read_labels_csv(path: Path) -> tuple[dict[str, tuple[int]], dict[str, dict[str, np.ndarray]]]:
    """A labels CSV → (label fields and sizes, {image key: {field: values}})."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"id": str, "filename": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise IngestError(f"{path}: not a readable CSV ({exc})") from None
    key_col = next((c for c in ("id", "filename") if c in df.columns), None)
    if key_col is None:
        raise IngestError(f"{path}: needs an 'id' or 'filename' column, found {list(df.columns)}")
    keys = df[key_col].astype(str).str.strip()
    duplicated = keys[keys.duplicated()].tolist()
    if duplicated:
        raise IngestError(f"{path}: {key_col} {duplicated[0]!r} appears more than once")
    value_cols = [c for c in df.columns if c not in ("id", "filename")]
    for col in value_cols:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise IngestError(f"{path}: label column {col!r} is not numeric")
    prefix = Counter(c.rsplit("_", 1)[0] for c in value_cols)
    groups: dict[str, list[str]] = {}
    for col in value_cols:
        base = col.rsplit("_", 1)[0]
        groups.setdefault(base if prefix[base] > 1 else col, []).append(col)
    values = {name: df[cols].to_numpy(np.float32) for name, cols in groups.items()}
    table = {key: {name: v[i] for name, v in values.items()} for i, key in enumerate(keys)}
    return {name: (len(cols),) for name, cols in groups.items()}, table
