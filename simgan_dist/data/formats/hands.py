"""Hand depth formats: NYU hand (real `depth_*` or synthetic `synthdepth_*` PNGs + `joint_data.mat`).

Crops are a square HAND_CROP_SCALE times the joints' u/v box, resized with nearest
neighbour, so every output depth is a measured one (no blending across the hand's
silhouette). `joints_uvd` depth stays in millimetres.
"""

from __future__ import annotations

import re

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
    open_image,
    read_mat,
    to_crop,
)
from simgan_dist.data.render import HAND_SIZE
from simgan_dist.data.schema import Layout

# Joints are bone centres: the hand's surface reaches a little beyond their box.
HAND_CROP_SCALE = 1.3


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
