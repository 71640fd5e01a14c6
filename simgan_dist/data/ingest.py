"""`simgan-dist ingest`: convert the datasets people download into the Parquet contract.

Every format is a `Format`: `scan` runs once in the driver and lists the work items
(files, HDF5 keys, ...) in a fixed natural order, `read_item` turns one item into
contract rows. The plumbing is shared: items are cut into fixed-size chunks, read
in a process pool (results consumed in chunk order, so the output and its ids do
not depend on the number of workers), checked row by row and written by
`DatasetWriter`. An item that cannot be used raises `Reject` and lands in
`_quarantine/quarantine.parquet` (source_path, reason, detail) beside the shards, written
before the manifest; the manifest's `extra` counts it. Nothing is dropped silently. The
leading `_` keeps it out of what plain Parquet readers take for the dataset's rows.

Label conventions are the simulator's (`simulate.py`):

* `gaze`: unit vector in the camera frame, x right, y down, z away from the camera
  ((0, 0, -1) looks into the camera). UnityEyes' `look_vec` is Unity's y-up frame,
  so its y is negated — the same flip its 2-D points need; MPIIGaze's normalized
  gaze is already in this frame.
* `pupil_xy`, `joints_uvd` u/v: pixels of the output image, x right, y down, pixel
  centres at integer coordinates. `joints_uvd` depth stays in millimetres.
* `head_pose`: UnityEyes Euler angles (pitch, yaw - 180°, roll) in radians wrapped
  to [-π, π), so a head facing the camera is (0, 0, 0); MPIIGaze's normalized `pose`
  is stored as given (a rotation vector, radians).

Crops: UnityEyes is cut around the interior-margin box, EYE_CROP_SCALE times wider
than the eye at 35:55, and resized with antialiasing; NYU hands are cut as a square
HAND_CROP_SCALE times the joints' u/v box and resized with nearest neighbour, so
every output depth is a measured one (no blending across the hand's silhouette).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from simgan_dist.config import Config, StorageConfig, load_config
from simgan_dist.data import storage
from simgan_dist.data.schema import DatasetWriter, Layout, Manifest
from simgan_dist.data.simulate import EYE_H, EYE_W, GAZE_CONVENTION, HAND_SIZE
from simgan_dist.errors import UserError

QUARANTINE_NAME = "_quarantine/quarantine.parquet"
# Where datasets ingested before the `_` convention keep it (plain readers took it for data).
LEGACY_QUARANTINE_NAME = "quarantine.parquet"
KINDS = ("synthetic", "real", "real_test")
# The simulator's eye spans 38-46 of 55 px; this makes an ingested eye fill the crop alike.
EYE_CROP_SCALE = 1.35
# Joints are bone centres: the hand's surface reaches a little beyond their box.
HAND_CROP_SCALE = 1.3
MPII_IMAGE = (36, 60)


class IngestError(UserError, ValueError):
    """SRC or the options cannot be ingested at all; the message names the file or field."""


class Reject(Exception):
    """One item cannot be used: it goes to quarantine under `reason` (a short category)."""

    def __init__(self, reason: str, detail: str, path: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.path = reason, detail, path


@dataclass
class Row:
    id: str
    image: np.ndarray  # H×W×C
    labels: dict[str, Any]
    source: str  # the file (and part of it) the row came from, relative to SRC


@dataclass(frozen=True)
class Quarantined:
    source_path: str
    reason: str
    detail: str


@dataclass
class IngestResult:
    format: str
    out: str
    rows: int
    quarantined: list[Quarantined]
    manifest: Manifest

    def reasons(self) -> Counter:
        return Counter(q.reason for q in self.quarantined)

    def summary(self) -> str:
        lines = [f"ingest {self.format}: {self.rows} rows written to {self.out}, "
                 f"{len(self.quarantined)} quarantined"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.reasons().items())]
        if self.quarantined:
            lines.append(f"  see {storage.join(self.out, QUARANTINE_NAME)}")
        return "\n".join(lines)


# --- small parsers and image helpers shared by the formats --------------------------------------------------


def natural_key(text: str) -> list:
    """'imgs/10.jpg' sorts after 'imgs/9.jpg'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def parse_tuple(text: Any, name: str, sizes: tuple[int, ...]) -> np.ndarray:
    """UnityEyes' '(x, y, z)' strings → float64 array of one of `sizes` numbers."""
    try:
        values = np.array([float(v) for v in str(text).strip().strip("()").split(",")])
    except ValueError:
        values = np.zeros(0)
    if not isinstance(text, str) or len(values) not in sizes:
        raise Reject("bad value", f"{name}: expected '(…)' with {' or '.join(map(str, sizes))} numbers, got {text!r}")
    return values


def wrap_angle(radians: np.ndarray) -> np.ndarray:
    return (radians + np.pi) % (2 * np.pi) - np.pi


def gaze_from_look_vec(values: Any, name: str) -> np.ndarray:
    """A UnityEyes look_vec (x, y up, z[, 0]) → our camera frame: negate y.

    Two components are the x, y of a unit vector that looks towards the camera (z < 0).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) == 2:
        rest = 1.0 - float(v @ v)
        if rest < 0:
            raise Reject("bad label", f"{name}: 2-component look_vec {v.tolist()} is longer than 1")
        v = np.append(v, -math.sqrt(rest))
    elif len(v) < 2:
        raise Reject("wrong shape", f"{name}: expected at least 2 components, got {len(v)}")
    return v[:3] * (1.0, -1.0, 1.0)


def open_image(path: Path, mode: str | None = None) -> Image.Image:
    """Decode the whole file now (truncated files fail here) and convert to `mode`."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Reject("corrupt image", f"{path.name}: {exc}") from None


def read_mat(path: Path, rel: str, **options: Any) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path, **options)
    except Exception as exc:  # scipy fails on damaged files with IndexError, struct.error, ...
        raise Reject("corrupt file", f"{rel}: not a readable .mat file ({type(exc).__name__}: {exc})") from None


def crop_box(points: np.ndarray, scale: float, out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer box (x0, y0, w, h) with the output's aspect, centred on the points' bounding box
    and `scale` times larger than it along its tighter side."""
    lo, hi = points.min(0), points.max(0)
    aspect = out_hw[1] / out_hw[0]
    width = max(hi[0] - lo[0], (hi[1] - lo[1]) * aspect, 1.0) * scale
    cx, cy = (lo + hi) / 2
    w, h = max(1, round(width)), max(1, round(width / aspect))
    return round(cx - w / 2 + 0.5), round(cy - h / 2 + 0.5), w, h


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], out_hw: tuple[int, int],
                resample: int) -> np.ndarray:
    """Cut `box` (zeros where it leaves the image) and resize to out_hw."""
    x0, y0, w, h = box
    return np.asarray(img.crop((x0, y0, x0 + w, y0 + h)).resize(out_hw[::-1], resample))


def to_crop(points: np.ndarray, box: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Source pixel coordinates → output pixel coordinates (both with pixel centres at integers)."""
    x0, y0, w, h = box
    scale = np.array([out_hw[1] / w, out_hw[0] / h])
    return (points + 0.5 - np.array([x0, y0])) * scale - 0.5


def check_row(row: Row, layout: Layout) -> Row:
    """Shapes and finite labels; gaze is normalised to a unit vector."""
    if row.image.shape != layout.image_shape or row.image.dtype != np.dtype(layout.image_dtype):
        raise Reject("wrong shape", f"image: expected {list(layout.image_shape)} {layout.image_dtype}, "
                     f"got {list(row.image.shape)} {row.image.dtype}")
    labels = {}
    for name, shape in layout.label_fields.items():
        try:
            value = np.asarray(row.labels[name], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise Reject("bad value", f"{name}: not numeric ({exc})") from None
        if value.size != math.prod(shape):
            raise Reject("wrong shape", f"{name}: expected {list(shape)}, got {list(value.shape)}")
        if not np.isfinite(value).all():
            raise Reject("bad label", f"{name}: NaN or infinite value {value.ravel().tolist()}")
        if name == "gaze":
            norm = float(np.linalg.norm(value))
            if norm < 1e-6:
                raise Reject("bad label", "gaze: zero-length vector")
            value = value / norm
        labels[name] = value.reshape(shape)
    return Row(row.id, row.image, labels, row.source)


# --- the formats ---------------------------------------------------------------------------------------------


class Format:
    """One source format. Instances are pickled to the pool's workers: keep them small."""

    name: ClassVar[str]
    items_per_task: ClassVar[int] = 256

    def __init__(self, src: Path, kind: str | None, cfg: Config, labels_csv: Path | None):
        self.src = src
        self.kind = kind

    def scan(self) -> tuple[Layout, list[Any], list[Quarantined]]:
        """Driver side: the layout, the work items in order, and what is already known to be bad."""
        raise NotImplementedError

    def default_kind(self, layout: Layout) -> str:
        return "real"

    def where(self, item: Any) -> str:
        """The source path named in quarantine for an item that fails as a whole."""
        return str(item)

    def open(self) -> contextlib.AbstractContextManager:
        """Per-chunk resource handed to `read_item` (an open HDF5 file, ...)."""
        return contextlib.nullcontext()

    def read_item(self, item: Any, handle: Any) -> Iterable[Row | Quarantined]:
        raise NotImplementedError

    def read(self, items: list[Any]) -> Iterator[Row | Quarantined]:
        with self.open() as handle:
            for item in items:
                try:
                    yield from self.read_item(item, handle)
                except Reject as r:
                    yield Quarantined(r.path or self.where(item), r.reason, r.detail)

    def files(self, pattern: str) -> list[str]:
        """Paths under SRC matching `pattern` (a regex on the relative path), in natural order."""
        regex = re.compile(pattern, re.IGNORECASE)
        found = (p.relative_to(self.src).as_posix() for p in self.src.rglob("*") if p.is_file())
        return sorted((p for p in found if regex.search(p)), key=natural_key)


class UnityEyes(Format):
    """`N.jpg` + `N.json` pairs, anywhere under SRC; 2-D points have y measured from the bottom."""

    name = "unityeyes"
    layout = Layout((EYE_H, EYE_W, 1), "uint8", {"gaze": (3,), "pupil_xy": (2,), "head_pose": (3,)})

    def scan(self):
        stems: dict[str, set[str]] = {}
        for rel in self.files(r"\.(jpg|json)$"):
            stem, ext = rel.rsplit(".", 1)
            stems.setdefault(stem, set()).add(ext.lower())
        if not stems:
            raise IngestError(f"{self.src}: no UnityEyes files (N.jpg + N.json) found")
        items, bad = [], []
        for stem in sorted(stems, key=natural_key):
            if stems[stem] == {"jpg", "json"}:
                items.append(stem)
            elif "jpg" in stems[stem]:
                bad.append(Quarantined(f"{stem}.jpg", "missing file", f"{stem}.json is missing"))
            else:
                bad.append(Quarantined(f"{stem}.json", "missing file", f"{stem}.jpg is missing"))
        return self.layout, items, bad

    def default_kind(self, layout):
        return "synthetic"

    def where(self, stem):
        return f"{stem}.jpg"

    def read_item(self, stem, handle):
        meta_path = f"{stem}.json"
        try:
            meta = json.loads((self.src / meta_path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Reject("corrupt file", f"{meta_path}: not readable JSON ({exc})", meta_path) from None

        def get(name: str) -> Any:
            node = meta
            for part in name.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise Reject("missing field", f"{meta_path}: {name} is missing", meta_path)
                node = node[part]
            return node

        look_vec, head_pose = get("eye_details.look_vec"), get("head_pose")
        img = open_image(self.src / f"{stem}.jpg", "L")

        def points(name: str) -> np.ndarray:
            raw = get(name)
            if not isinstance(raw, list) or not raw:
                raise Reject("bad value", f"{meta_path}: {name} must be a non-empty list of '(x, y, z)'", meta_path)
            xy = np.array([parse_tuple(p, f"{meta_path}: {name}", (3,))[:2] for p in raw])
            # Unity measures y up from the bottom edge; its coordinates put pixel centres at .5.
            return np.stack([xy[:, 0], img.height - xy[:, 1]], axis=1) - 0.5

        margin, iris = points("interior_margin_2d"), points("iris_2d")
        box = crop_box(margin, EYE_CROP_SCALE, (EYE_H, EYE_W))
        pupil = to_crop(iris.mean(0), box, (EYE_H, EYE_W))
        if not (0 <= pupil[0] <= EYE_W - 1 and 0 <= pupil[1] <= EYE_H - 1):
            raise Reject("bad label", f"{meta_path}: iris_2d centre {pupil.round(1).tolist()} is outside the "
                         "eye crop", meta_path)
        pitch, yaw, roll = np.radians(parse_tuple(head_pose, f"{meta_path}: head_pose", (3,)))
        yield Row(
            id=stem,
            image=crop_resize(img, box, (EYE_H, EYE_W), Image.BILINEAR)[..., None],
            labels={"gaze": gaze_from_look_vec(parse_tuple(look_vec, f"{meta_path}: eye_details.look_vec", (3, 4)),
                                               f"{meta_path}: eye_details.look_vec"),
                    "pupil_xy": pupil,
                    "head_pose": wrap_angle(np.array([pitch, yaw - np.pi, roll]))},
            source=f"{stem}.jpg",
        )


class MPIIGaze(Format):
    """`Data/Normalized/pXX/dayYY.mat`: `data.{left,right}.{image,gaze,pose}`, both eyes of every day."""

    name = "mpiigaze"
    items_per_task = 1  # a day file holds hundreds of samples
    layout = Layout((EYE_H, EYE_W, 1), "uint8", {"gaze": (3,), "head_pose": (3,)})
    fields = {"image": MPII_IMAGE, "gaze": (3,), "pose": (3,)}

    def scan(self):
        items = self.files(r"(^|/)p\d+/day\d+\.mat$")
        if not items:
            raise IngestError(f"{self.src}: no MPIIGaze files (Data/Normalized/pXX/dayYY.mat) found")
        return self.layout, items, []

    def read_item(self, rel, handle):
        # squeeze_me unwraps MATLAB's 1×1 struct arrays into attribute access: data.left.image.
        data = read_mat(self.src / rel, rel, squeeze_me=True, struct_as_record=False).get("data")
        if data is None:
            raise Reject("missing field", f"{rel}: variable 'data' is missing")
        for side in ("left", "right"):
            try:
                arrays = self.eye_arrays(data, side, rel)
            except Reject as r:
                yield Quarantined(f"{rel}:{side}", r.reason, r.detail)
                continue
            day = rel[:-len(".mat")].split("/")[-2:]
            for i, image in enumerate(arrays["image"]):
                resized = np.asarray(Image.fromarray(image).resize((EYE_W, EYE_H), Image.BILINEAR))
                yield Row(id="/".join([*day, side, f"{i:04d}"]), image=resized[..., None],
                          labels={"gaze": arrays["gaze"][i], "head_pose": arrays["pose"][i]},
                          source=f"{rel}:{side}[{i}]")

    def eye_arrays(self, data: Any, side: str, rel: str) -> dict[str, np.ndarray]:
        arrays = {}
        for name, tail in self.fields.items():
            value = getattr(getattr(data, side, None), name, None)
            if value is None:
                raise Reject("missing field", f"{rel}: data.{side}.{name} is missing")
            value = np.asarray(value)
            if value.shape == tail:  # squeeze_me dropped the sample axis of a one-sample day
                value = value[None]
            if value.shape[1:] != tail:
                raise Reject("wrong shape", f"{rel}: data.{side}.{name}: expected N x {list(tail)}, "
                             f"got {list(value.shape)}")
            arrays[name] = value
        if arrays["image"].dtype != np.uint8:
            raise Reject("wrong dtype", f"{rel}: data.{side}.image: expected uint8, got {arrays['image'].dtype}")
        lengths = {name: len(v) for name, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise Reject("length mismatch", f"{rel}: data.{side}: " + ", ".join(f"{k} has {n} rows"
                                                                                for k, n in lengths.items()))
        return arrays


class KaggleH5(Format):
    """`gaze.h5` / `real_gaze.h5`: group `image` (one 35x55 dataset per key); `look_vec` and `path` are
    groups keyed like `image`, or datasets aligned with its keys in HDF5's name order (the order
    `f["image"].values()` yields). No look_vec: unlabeled."""

    name = "kaggle-h5"
    items_per_task = 1024

    def scan(self):
        import h5py

        if not self.src.is_file():
            raise IngestError(f"{self.src}: the kaggle-h5 format takes one .h5 file (gaze.h5 or real_gaze.h5)")
        try:
            with h5py.File(self.src, "r") as f:
                if not isinstance(f.get("image"), h5py.Group):
                    raise IngestError(f"{self.src}: no 'image' group (found {sorted(f)})")
                keys = list(f["image"])
                looks = f.get("look_vec")
                labeled = looks is not None
                looks_rows = looks.shape[0] if isinstance(looks, h5py.Dataset) else None
        except OSError as exc:
            raise IngestError(f"{self.src}: not a readable HDF5 file ({exc})") from None
        if not keys:
            raise IngestError(f"{self.src}: the 'image' group is empty")
        layout = Layout((EYE_H, EYE_W, 1), "uint8", {"gaze": (3,)} if labeled else {})
        if looks_rows is not None and looks_rows != len(keys):
            detail = f"look_vec has {looks_rows} rows, image has {len(keys)} keys"
            return layout, [], [Quarantined(self.where((i, k)), "length mismatch", detail) for i, k in enumerate(keys)]
        return layout, [(i, key) for i, key in enumerate(keys)], []

    def default_kind(self, layout):
        return "synthetic" if layout.label_fields else "real"

    def where(self, item):
        return f"{self.src.name}:image/{item[1]}"

    def open(self):
        import h5py

        return h5py.File(self.src, "r")

    def read_item(self, item, f):
        index, key = item
        try:
            image = np.asarray(f["image"][key])
            look_vec = self.aligned(f, "look_vec", index, key)
            path = self.aligned(f, "path", index, key)
        except (OSError, KeyError, ValueError) as exc:
            raise Reject("corrupt file", f"image/{key}: cannot read ({exc})") from None
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.shape != (EYE_H, EYE_W):
            raise Reject("wrong shape", f"image/{key}: expected {EYE_H}x{EYE_W}, got {list(image.shape)}")
        if image.dtype != np.uint8:
            raise Reject("wrong dtype", f"image/{key}: expected uint8, got {image.dtype}")
        labels = {}
        if "look_vec" in f:
            if look_vec is None:
                raise Reject("missing label", f"look_vec/{key} is missing")
            labels["gaze"] = gaze_from_look_vec(look_vec, f"look_vec/{key}")
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        origin = f":{path}" if path is not None else ""
        yield Row(f"{self.src.stem}/{key}", image[..., None], labels, f"{self.src.name}:image/{key}{origin}")

    @staticmethod
    def aligned(f: Any, name: str, index: int, key: str) -> Any:
        """The `name` entry for one image: by key in a group, by position in a dataset, None if absent."""
        node = f.get(name)
        if node is None or (hasattr(node, "keys") and key not in node):
            return None
        return node[key][()] if hasattr(node, "keys") else node[index]


class NYUHand(Format):
    """`depth_1_%07d.png` (real) or `synthdepth_1_%07d.png` (synthetic): depth in mm = (G << 8) | B;
    `joint_data.mat` in the same folder holds `joint_uvd` (views × N × J × 3). Any folder depth."""

    name = "nyu-hand"
    items_per_task = 64

    def scan(self):
        prefix = "synthdepth" if self.kind == "synthetic" else "depth"
        pattern = rf"(^|/){prefix}_(\d)_(\d{{7}})\.png$"
        pngs = [(rel, re.search(pattern, rel, re.IGNORECASE)) for rel in self.files(pattern)]
        if not pngs:
            raise IngestError(f"{self.src}: no NYU hand images ({prefix}_1_0000001.png, ...) found")
        joints_by_folder: dict[str, np.ndarray | Reject] = {}
        items, bad = [], []
        for rel, match in pngs:
            folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
            if folder not in joints_by_folder:
                joints_by_folder[folder] = self.load_joints(folder)
            joints = joints_by_folder[folder]
            view, index = int(match.group(2)) - 1, int(match.group(3)) - 1  # file numbers start at 1
            if isinstance(joints, Reject):
                bad.append(Quarantined(rel, joints.reason, joints.detail))
            elif view >= joints.shape[0] or index >= joints.shape[1]:
                bad.append(Quarantined(rel, "missing label", f"joint_uvd has no entry [{view}, {index}] "
                                       f"(shape {list(joints.shape)})"))
            else:
                items.append((rel, joints[view, index]))
        sizes = {j.shape[2] for j in joints_by_folder.values() if not isinstance(j, Reject)}
        if len(sizes) > 1:
            raise IngestError(f"{self.src}: joint_data.mat files disagree on the number of joints: {sorted(sizes)}")
        n_joints = sizes.pop() if sizes else 1
        return Layout((HAND_SIZE, HAND_SIZE, 1), "uint16", {"joints_uvd": (n_joints, 3)}), items, bad

    def load_joints(self, folder: str) -> np.ndarray | Reject:
        """The folder's joint_uvd, or the Reject that every image of the folder gets."""
        rel = f"{folder}/joint_data.mat" if folder else "joint_data.mat"
        if not (self.src / rel).is_file():
            return Reject("missing file", f"{rel} is missing")
        try:
            joints = read_mat(self.src / rel, rel, variable_names=["joint_uvd"]).get("joint_uvd")
        except Reject as r:
            return r
        if joints is None:
            return Reject("missing field", f"{rel}: joint_uvd is missing")
        if joints.ndim == 3:  # a single view saved without its axis
            joints = joints[None]
        if joints.ndim != 4 or joints.shape[3] != 3:
            return Reject("wrong shape", f"{rel}: joint_uvd: expected views x N x J x 3, got {list(joints.shape)}")
        return joints.astype(np.float32)

    def where(self, item):
        return item[0]

    def read_item(self, item, handle):
        rel, joints = item
        img = open_image(self.src / rel)
        if img.mode not in ("RGB", "RGBA"):
            raise Reject("wrong dtype", f"{rel}: expected an RGB PNG with depth in (G << 8) | B, got mode {img.mode}")
        depth = decode_nyu_depth(np.asarray(img.convert("RGB")))
        box = crop_box(joints[:, :2], HAND_CROP_SCALE, (HAND_SIZE, HAND_SIZE))
        image = crop_resize(Image.fromarray(depth), box, (HAND_SIZE, HAND_SIZE), Image.NEAREST)
        uvd = joints.copy()
        uvd[:, :2] = to_crop(joints[:, :2], box, (HAND_SIZE, HAND_SIZE))
        yield Row(rel[:-len(".png")], image[..., None], {"joints_uvd": uvd}, rel)


def decode_nyu_depth(rgb: np.ndarray) -> np.ndarray:
    """NYU's RGB-packed depth PNG (H×W×3 uint8) → depth in mm, uint16: (G << 8) | B."""
    return (rgb[..., 1].astype(np.uint16) << 8) | rgb[..., 2]


class Folder(Format):
    """Any PNG/JPEG under SRC → gray (or RGB for 3-channel models), resized to the model's size.

    The optional labels CSV has an `id` (or `filename`) column matching the image's path
    relative to SRC, with or without its extension; other columns are labels, grouped by
    name: gaze_x, gaze_y, gaze_z → `gaze` [3]; a column without siblings is a label of size 1.
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
        yield Row(rel, image.reshape(self.shape), labels, rel)


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


FORMATS: dict[str, type[Format]] = {f.name: f for f in (UnityEyes, MPIIGaze, KaggleH5, NYUHand, Folder)}


# --- the shared plumbing -------------------------------------------------------------------------------------


def read_chunk(fmt: Format, layout: Layout, items: list[Any]) -> tuple[dict[str, Any] | None, list[Quarantined]]:
    """Worker side: one chunk of items → a batch of checked rows (None if empty) and the rejects."""
    rows, bad = [], []
    for out in fmt.read(items):
        if isinstance(out, Quarantined):
            bad.append(out)
            continue
        try:
            rows.append(check_row(out, layout))
        except Reject as r:
            bad.append(Quarantined(out.source, r.reason, r.detail))
    if not rows:
        return None, bad
    batch = {"id": [r.id for r in rows], "image": np.stack([r.image for r in rows]),
             "source": [r.source for r in rows]}
    batch.update({name: np.stack([r.labels[name] for r in rows]) for name in layout.label_fields})
    return batch, bad


def ordered_map(fn: Callable, tasks: list[Any], workers: int) -> Iterator[Any]:
    """fn over tasks in a process pool, yielded in task order; at most two tasks per worker in flight,
    so a slow chunk never lets finished results pile up in memory."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # spawn, not fork: the driver may already run Arrow/S3 threads, which fork would copy mid-flight.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        window: deque = deque()
        for task in tasks:
            window.append(pool.submit(fn, task))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def write_quarantine(uri: str, quarantined: list[Quarantined], storage_cfg: StorageConfig | None = None) -> None:
    """`_quarantine/quarantine.parquet` under the dataset, always written (empty too) so no stale one survives."""
    table = pa.table({name: pa.array([getattr(q, name) for q in quarantined], pa.string())
                      for name in ("source_path", "reason", "detail")})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(storage.join(uri, QUARANTINE_NAME), sink.getvalue(), storage_cfg)


def read_quarantine(uri: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    try:
        data = storage.read_bytes(storage.join(uri, QUARANTINE_NAME), storage_cfg)
    except storage.MissingFileError:
        data = storage.read_bytes(storage.join(uri, LEGACY_QUARANTINE_NAME), storage_cfg)
    return pq.read_table(io.BytesIO(data))


def ingest(format_name: str, src: str | Path, out: str, *, cfg: Config | None = None, kind: str | None = None,
           labels_csv: str | Path | None = None, rows_per_shard: int = 50_000, workers: int | None = None,
           overwrite: bool = False, progress: bool = False) -> IngestResult:
    """Convert SRC (a downloaded dataset in `format_name`) into a contract dataset at `out`."""
    if format_name not in FORMATS:
        raise IngestError(f"unknown format {format_name!r}: choose one of {sorted(FORMATS)}")
    if kind is not None and kind not in KINDS:
        raise IngestError(f"kind must be one of {KINDS}, got {kind!r}")
    if labels_csv is not None and format_name != "folder":
        raise IngestError(f"--labels applies to the folder format only, not {format_name}")
    cfg = cfg or Config()
    src = Path(src).expanduser()
    if not src.exists():
        raise IngestError(f"{src}: no such file or folder")
    if src.is_dir() and not any(src.iterdir()):
        raise IngestError(f"{src}: the folder is empty")
    if labels_csv is not None and not Path(labels_csv).is_file():
        raise IngestError(f"{labels_csv}: labels CSV not found")
    fmt = FORMATS[format_name](src, kind, cfg, Path(labels_csv) if labels_csv else None)
    layout, items, quarantined = fmt.scan()
    chunks = [items[i:i + fmt.items_per_task] for i in range(0, len(items), fmt.items_per_task)]
    extra: dict[str, Any] = {"src": str(src.resolve()), "format": format_name}
    if "gaze" in layout.label_fields:
        extra["gaze_convention"] = GAZE_CONVENTION
    with DatasetWriter(out, layout, kind=kind or fmt.default_kind(layout), source=f"ingest:{format_name}",
                       extra=extra, rows_per_shard=rows_per_shard, storage_cfg=cfg.storage,
                       overwrite=overwrite) as writer, \
            tqdm(total=len(items), desc=f"ingest {format_name}", unit="item", disable=not progress) as bar:
        task = partial(read_chunk, fmt, layout)
        for chunk, (batch, bad) in zip(chunks, ordered_map(task, chunks, workers or os.cpu_count() or 1),
                                       strict=True):
            if batch is not None:
                writer.write(batch)
            quarantined += bad
            bar.update(len(chunk))
        write_quarantine(out, quarantined, cfg.storage)
        writer.extra.update(quarantined=len(quarantined), quarantine=QUARANTINE_NAME,
                            quarantine_reasons=dict(sorted(Counter(q.reason for q in quarantined).items())))
        manifest = writer.close()
    return IngestResult(format_name, out, manifest.rows, quarantined, manifest)


def cli_ingest(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    result = ingest(args.format, args.src, args.out, cfg=cfg, kind=args.kind, labels_csv=args.labels,
                    rows_per_shard=args.rows_per_shard, workers=args.workers, overwrite=args.overwrite,
                    progress=sys.stderr.isatty())
    print(result.summary())
    if not result.rows:
        print("simgan-dist ingest: error: no usable rows (every item was quarantined)", file=sys.stderr)
        return 1
    return 0
