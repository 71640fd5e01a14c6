"""A UnityEyes folder in the generator's own layout (N.jpg + N.json, 2-D points with y measured
from the bottom): `unityeyes_sample` writes one sample, `unityeyes_folder` 4 good ones and 6 bad ones
(conftest.py's `unityeyes_dir` fixture)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

UE_H, UE_W = 240, 320


def unityeyes_sample(folder, name: str, eye_xy, iris_xy, look_vec, head_pose="(10.0, 170.0, 355.0)") -> None:
    """A gray face with a dark iris disc at `iris_xy` (image pixels, y down) and its UnityEyes JSON."""
    yy, xx = np.mgrid[0:UE_H, 0:UE_W]
    image = np.full((UE_H, UE_W), 190, np.uint8)
    image[(xx - iris_xy[0]) ** 2 + (yy - iris_xy[1]) ** 2 < 12 ** 2] = 20
    Image.fromarray(image).convert("RGB").save(folder / f"{name}.jpg", quality=95)

    def unity(points):  # image pixels → Unity screen coordinates: corner origin, y up
        return [f"({x + 0.5:.4f}, {UE_H - (y + 0.5):.4f}, 9.6000)" for x, y in points]

    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    margin = np.stack([eye_xy[0] + 50 * np.cos(t), eye_xy[1] + 18 * np.sin(t)], 1)
    iris = np.stack([iris_xy[0] + 12 * np.cos(2 * t), iris_xy[1] + 12 * np.sin(2 * t)], 1)
    meta = {
        "interior_margin_2d": unity(margin),
        "caruncle_2d": unity(margin[:4] + [4, 0]),
        "iris_2d": unity(iris),
        "eye_details": {"look_vec": look_vec, "pupil_size": "0.0385", "iris_size": "0.9143",
                        "iris_texture": "eyeball_amber"},
        "lighting_details": {"skybox_texture": "cape_hill_4k", "skybox_exposure": "1.0"},
        "eye_region_details": {"primary_skin_texture": "m01_color"},
        "head_pose": head_pose,
    }
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=1))


def unityeyes_folder(root) -> None:
    """4 good samples and 6 bad ones under `root`/imgs."""
    (root / "imgs").mkdir(parents=True)
    # The eye sits in the top half: a missing y-flip would crop the empty bottom half.
    for i, iris_dx in enumerate((-15, 0, 15, 25)):
        unityeyes_sample(root / "imgs", str(i + 1), (160, 70), (160 + iris_dx, 70), "(0.3, 0.4, -0.8, 0.0)")
    imgs = root / "imgs"
    unityeyes_sample(imgs, "10", (160, 70), (160, 70), "(0.3, 0.4, -0.8, 0.0)")
    (imgs / "10.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    unityeyes_sample(imgs, "11", (160, 70), (160, 70), "(0.3, 0.4, -0.8, 0.0)")
    meta = json.loads((imgs / "11.json").read_text())
    del meta["eye_details"]["look_vec"]
    (imgs / "11.json").write_text(json.dumps(meta))
    unityeyes_sample(imgs, "12", (160, 70), (160, 70), "(0.3, 0.4, -0.8, 0.0)")
    (imgs / "12.json").unlink()
    unityeyes_sample(imgs, "13", (160, 70), (160, 70), "(0.3, 0.4, -0.8, 0.0)")
    (imgs / "13.json").write_text("{ not json")
    unityeyes_sample(imgs, "14", (160, 70), (160, 70), "(nan, 0.4, -0.8, 0.0)")
    unityeyes_sample(imgs, "15", (160, 70), (160, 70), "(0.3, 0.4, -0.8, 0.0)")
    (imgs / "15.jpg").unlink()
