"""Eye formats: UnityEyes renders, MPIIGaze's normalized day files, the Kaggle HDF5 files.

UnityEyes' `look_vec` is Unity's y-up frame, so its y is negated (the same flip its 2-D
points need); MPIIGaze's normalized gaze is already in our frame. `head_pose`: UnityEyes
Euler angles (pitch, yaw - 180°, roll) in radians wrapped to [-π, π), so a head facing the
camera is (0, 0, 0); MPIIGaze's normalized `pose` is stored as given (a rotation vector).
UnityEyes is cut around the interior-margin box, EYE_CROP_SCALE times wider than the eye
at 35:55, and resized with antialiasing.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from PIL import Image

from simgan_dist.data.formats.base import (
    Format,
    IngestError,
    Quarantined,
    Reject,
    Row,
    crop_box,
    crop_resize,
    natural_key,
    open_image,
    read_mat,
    to_crop,
)
from simgan_dist.data.render import EYE_H, EYE_W
from simgan_dist.data.schema import Layout

# The simulator's eye spans 38-46 of 55 px; this makes an ingested eye fill the crop alike.
EYE_CROP_SCALE = 1.35
MPII_IMAGE = (36, 60)


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
