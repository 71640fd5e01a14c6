"""`simgan-dist ingest`: fixtures written in each dataset's real on-disk layout, round-tripped
through the Parquet contract with their labels checked, and corrupt files found in quarantine."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from simgan_dist import cli
from simgan_dist.config import load_config
from simgan_dist.data.formats import FORMATS
from simgan_dist.data.formats.base import to_crop
from simgan_dist.data.formats.hands import decode_nyu_depth
from simgan_dist.data.ingest import IngestError, ingest, read_quarantine
from simgan_dist.data.schema import load_numpy, read_manifest


def quarantine_of(uri: str) -> dict[str, str]:
    table = read_quarantine(uri).to_pydict()
    return dict(zip(table["source_path"], table["reason"], strict=True))


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --- UnityEyes: N.jpg + N.json, 2-D points with y measured from the bottom ----------------------------------


def test_unityeyes_round_trip_and_quarantine(unityeyes_dir, tmp_path):
    out = str(tmp_path / "ue")
    result = ingest("unityeyes", unityeyes_dir, out, workers=1)
    data = load_numpy(out)
    assert list(data["id"]) == ["imgs/1", "imgs/2", "imgs/3", "imgs/4"]
    assert data["image"].shape == (4, 35, 55, 1) and data["image"].dtype == np.uint8
    # look_vec is Unity's y-up frame: y is negated into the camera frame (y down), then normalised.
    np.testing.assert_allclose(data["gaze"], np.tile(unit([0.3, -0.4, -0.8]), (4, 1)), atol=1e-6)
    np.testing.assert_allclose(data["head_pose"][0], np.radians([10.0, -10.0, -5.0]), atol=1e-6)
    # pupil_xy lands on the dark iris disc of the crop, and moves right with the iris.
    for image, pupil in zip(data["image"][..., 0], data["pupil_xy"], strict=True):
        assert 0 <= pupil[0] <= 54 and 0 <= pupil[1] <= 34
        ys, xs = np.nonzero(image < 100)
        assert abs(xs.mean() - pupil[0]) < 1.0 and abs(ys.mean() - pupil[1]) < 1.0
    assert np.all(np.diff(data["pupil_xy"][:, 0]) > 2)
    assert set(data["source"]) == {f"imgs/{i}.jpg" for i in range(1, 5)}

    assert quarantine_of(out) == {
        "imgs/10.jpg": "corrupt image",
        "imgs/11.json": "missing field",
        "imgs/12.jpg": "missing file",
        "imgs/13.json": "corrupt file",
        "imgs/14.jpg": "bad label",
        "imgs/15.json": "missing file",
    }
    detail = read_quarantine(out).to_pydict()["detail"]
    assert any("eye_details.look_vec is missing" in d for d in detail)
    manifest = read_manifest(out)
    assert manifest.kind == "synthetic" and manifest.rows == 4
    assert manifest.extra["quarantined"] == 6 and manifest.extra["quarantine_reasons"]["missing file"] == 2
    assert result.reasons()["missing file"] == 2
    assert "4 rows written" in result.summary() and "6 quarantined" in result.summary()


def test_output_does_not_depend_on_worker_count(unityeyes_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(FORMATS["unityeyes"], "items_per_task", 2)  # several chunks for the pool
    ingest("unityeyes", unityeyes_dir, str(tmp_path / "one"), workers=1)
    ingest("unityeyes", unityeyes_dir, str(tmp_path / "two"), workers=2)
    one, two = load_numpy(str(tmp_path / "one")), load_numpy(str(tmp_path / "two"))
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    assert read_quarantine(str(tmp_path / "one")).equals(read_quarantine(str(tmp_path / "two")))


# --- MPIIGaze normalized: nested MATLAB structs, both eyes --------------------------------------------------


def mpii_eye(n: int, base: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(base)
    gaze = rng.normal([0, 0.2, -1], 0.1, (n, 3))
    return {"gaze": gaze, "image": np.stack([np.full((36, 60), base + i, np.uint8) for i in range(n)]),
            "pose": rng.normal(0, 0.1, (n, 3))}


@pytest.fixture
def mpiigaze_dir(tmp_path):
    root = tmp_path / "MPIIGaze"
    norm = root / "Data" / "Normalized"
    for rel, left, right in (("p00/day01.mat", mpii_eye(3, 10), mpii_eye(3, 20)),
                             ("p01/day02.mat", mpii_eye(1, 30), mpii_eye(2, 40))):  # a one-sample eye
        (norm / rel).parent.mkdir(parents=True, exist_ok=True)
        savemat(norm / rel, {"data": {"left": left, "right": right}})
    bad_left, bad_right = mpii_eye(3, 50), mpii_eye(3, 60)
    bad_left["gaze"] = bad_left["gaze"][:2]
    bad_right["gaze"][1, 0] = np.nan
    savemat(norm / "p00/day03.mat", {"data": {"left": bad_left, "right": bad_right}})
    (norm / "p00/day04.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    return root, {"p00/day01": (mpii_eye(3, 10), mpii_eye(3, 20)), "p01/day02": (mpii_eye(1, 30), mpii_eye(2, 40))}


def test_mpiigaze_round_trip_and_quarantine(mpiigaze_dir, tmp_path):
    root, days = mpiigaze_dir
    out = str(tmp_path / "mpii")
    ingest("mpiigaze", root, out, workers=1)
    data = load_numpy(out)
    expected_ids = [f"{day}/{side}/{i:04d}" for day, eyes in days.items()
                    for side, eye in zip(("left", "right"), eyes, strict=True) for i in range(len(eye["gaze"]))]
    expected_ids[6:6] = ["p00/day03/right/0000", "p00/day03/right/0002"]  # files in natural path order
    assert list(data["id"]) == expected_ids
    assert data["image"].shape == (len(expected_ids), 35, 55, 1)
    row = {rid: i for i, rid in enumerate(data["id"])}
    for day, eyes in days.items():
        for side, eye in zip(("left", "right"), eyes, strict=True):
            for i in range(len(eye["gaze"])):
                k = row[f"{day}/{side}/{i:04d}"]
                assert np.all(data["image"][k] == eye["image"][i, 0, 0])  # constant image survives the resize
                np.testing.assert_allclose(data["gaze"][k], unit(eye["gaze"][i]), atol=1e-6)
                np.testing.assert_allclose(data["head_pose"][k], eye["pose"][i], atol=1e-6)
    assert "pupil_xy" not in data
    assert quarantine_of(str(tmp_path / "mpii")) == {
        "Data/Normalized/p00/day03.mat:left": "length mismatch",
        "Data/Normalized/p00/day03.mat:right[1]": "bad label",
        "Data/Normalized/p00/day04.mat": "corrupt file",
    }
    assert read_manifest(out).kind == "real"


# --- Kaggle eye-gaze HDF5 -----------------------------------------------------------------------------------


def kaggle_h5(path, n: int, look_vec: str | None, bad_shape: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(1).integers(0, 256, (n, 35, 55), dtype=np.uint8)
    looks = np.random.default_rng(2).normal([0, 0, -1], 0.2, (n, 3))
    with h5py.File(path, "w") as f:
        for i in range(n):
            f.create_dataset(f"image/{i:03d}", data=images[i] if i != bad_shape else images[i, :20])
            f.create_dataset(f"path/{i:03d}", data=f"imgs/{i}.jpg".encode())
            if look_vec == "group" and i != 1:  # key 001 has no look_vec
                f.create_dataset(f"look_vec/{i:03d}", data=looks[i])
        if look_vec == "short-dataset":
            f.create_dataset("look_vec", data=looks[:-1])
    return images, looks


def test_kaggle_h5_labeled_unlabeled_and_mismatched(tmp_path):
    images, looks = kaggle_h5(tmp_path / "gaze.h5", 5, "group", bad_shape=3)
    ingest("kaggle-h5", tmp_path / "gaze.h5", str(tmp_path / "syn"), workers=1)
    data = load_numpy(str(tmp_path / "syn"))
    assert list(data["id"]) == ["gaze/000", "gaze/002", "gaze/004"]
    np.testing.assert_array_equal(data["image"][..., 0], images[[0, 2, 4]])
    np.testing.assert_allclose(data["gaze"], [unit(looks[i] * [1, -1, 1]) for i in (0, 2, 4)], atol=1e-6)
    assert data["source"][0] == "gaze.h5:image/000:imgs/0.jpg"
    assert quarantine_of(str(tmp_path / "syn")) == {"gaze.h5:image/001": "missing label",
                                                    "gaze.h5:image/003": "wrong shape"}
    assert read_manifest(str(tmp_path / "syn")).kind == "synthetic"

    kaggle_h5(tmp_path / "real_gaze.h5", 4, None)
    ingest("kaggle-h5", tmp_path / "real_gaze.h5", str(tmp_path / "real"), workers=1)
    manifest = read_manifest(str(tmp_path / "real"))
    assert manifest.rows == 4 and manifest.label_fields == {} and manifest.kind == "real"

    kaggle_h5(tmp_path / "short.h5", 3, "short-dataset")
    result = ingest("kaggle-h5", tmp_path / "short.h5", str(tmp_path / "short"), workers=1)
    assert result.rows == 0 and result.reasons() == {"length mismatch": 3}


# --- NYU hand: RGB PNGs holding (G << 8) | B, joint_data.mat ------------------------------------------------

NYU_H, NYU_W = 120, 160


def nyu_depth() -> np.ndarray:
    """Every pixel's depth encodes its position, so a crop can be traced back exactly."""
    yy, xx = np.mgrid[0:NYU_H, 0:NYU_W]
    return (1000 + yy * 200 + xx).astype(np.uint16)


def write_nyu_png(path, depth: np.ndarray) -> None:
    noise = np.random.default_rng(0).integers(0, 256, depth.shape, dtype=np.uint8)  # R is not part of depth
    Image.fromarray(np.stack([noise, depth >> 8, depth & 0xFF], -1).astype(np.uint8)).save(path)


@pytest.fixture
def nyu_dir(tmp_path):
    root = tmp_path / "nyu_hand_dataset_v2"
    train = root / "train"
    train.mkdir(parents=True)
    rng = np.random.default_rng(3)
    joint_uvd = np.zeros((3, 3, 36, 3))
    for view in range(3):
        for i in range(3):
            centre = [70 + 5 * i, 50 + 3 * i]
            joint_uvd[view, i, :, :2] = centre + rng.uniform(-20, 20, (36, 2))
            joint_uvd[view, i, :, 2] = rng.uniform(650, 750, 36)
    savemat(train / "joint_data.mat", {"joint_names": np.array(["F1_KNU3_A"] * 36, dtype=object),
                                       "joint_uvd": joint_uvd, "joint_xyz": joint_uvd * 0.5})
    for i in range(1, 4):
        write_nyu_png(train / f"depth_1_{i:07d}.png", nyu_depth())
    write_nyu_png(train / "synthdepth_1_0000001.png", nyu_depth())
    write_nyu_png(train / "depth_1_0000009.png", nyu_depth())  # no row 9 in joint_uvd
    Image.fromarray(np.zeros((NYU_H, NYU_W), np.uint8)).save(train / "depth_2_0000001.png")  # not RGB
    (train / "depth_3_0000001.png").write_bytes(b"\x89PNG broken")
    (root / "test").mkdir()
    write_nyu_png(root / "test" / "depth_1_0000001.png", nyu_depth())  # no joint_data.mat next to it
    return root, joint_uvd


def test_crop_coordinates_use_pixel_centres():
    box = (10, 20, 4, 2)  # 4x2 source pixels → 8x4 output pixels: each source pixel becomes 2x2
    np.testing.assert_allclose(to_crop(np.array([[10.0, 20.0], [9.5, 19.5], [13.0, 21.0]]), box, (4, 8)),
                               [[0.5, 0.5], [-0.5, -0.5], [6.5, 2.5]])


def test_nyu_depth_decoding_is_exact():
    depth = nyu_depth()
    rgb = np.stack([np.zeros_like(depth), depth >> 8, depth & 0xFF], -1).astype(np.uint8)
    np.testing.assert_array_equal(decode_nyu_depth(rgb), depth)


def test_nyu_hand_round_trip_and_quarantine(nyu_dir, tmp_path):
    root, joint_uvd = nyu_dir
    out = str(tmp_path / "hand")
    ingest("nyu-hand", root, out, workers=1)
    data = load_numpy(out)
    assert list(data["id"]) == [f"train/depth_1_{i:07d}" for i in range(1, 4)]
    assert data["image"].shape == (3, 224, 224, 1) and data["image"].dtype == np.uint16
    assert data["joints_uvd"].shape == (3, 36, 3)
    for image, uvd, truth in zip(data["image"][..., 0], data["joints_uvd"], joint_uvd[0], strict=True):
        np.testing.assert_allclose(uvd[:, 2], truth[:, 2], rtol=1e-6)  # depth of the joints stays in mm
        for (u, v), (u0, v0) in zip(uvd[:, :2], truth[:, :2], strict=True):
            assert 0 <= u <= 223 and 0 <= v <= 223
            # The output pixel at the mapped joint holds the source pixel at the joint (nearest neighbour).
            src_y, src_x = divmod(int(image[round(v), round(u)]) - 1000, 200)
            assert abs(src_x - u0) <= 1 and abs(src_y - v0) <= 1
    assert quarantine_of(out) == {
        "train/depth_1_0000009.png": "missing label",
        "train/depth_2_0000001.png": "wrong dtype",
        "train/depth_3_0000001.png": "corrupt image",
        "test/depth_1_0000001.png": "missing file",
    }
    synthetic = ingest("nyu-hand", root, str(tmp_path / "synth"), kind="synthetic", workers=1)
    assert synthetic.rows == 1 and read_manifest(str(tmp_path / "synth")).kind == "synthetic"


# --- A plain folder of images with a labels CSV, written to S3 ----------------------------------------------


@pytest.fixture
def folder_dir(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((40, 60), 77, np.uint8)).save(root / "a" / "x.png")
    Image.fromarray(np.full((100, 80, 3), 200, np.uint8)).save(root / "b.jpg", quality=100)
    Image.fromarray(np.full((35, 55), 5, np.uint8)).save(root / "c.png")
    Image.fromarray(np.full((10, 10), 9, np.uint8)).save(root / "d.png")
    (root / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    csv = tmp_path / "labels.csv"
    csv.write_text("id,gaze_x,gaze_y,gaze_z,score\n"
                   "a/x,0,0,-2,1.5\n"
                   "b.jpg,3,0,-4,2\n"
                   "c,nan,0,-1,0\n"
                   "e,0,0,-1,0\n"
                   "zzz,0,0,-1,0\n")
    return root, csv


@pytest.mark.slow
def test_folder_with_labels_to_s3(folder_dir, s3_bucket):
    root, csv = folder_dir
    out = f"{s3_bucket}/eyes/real"
    result = ingest("folder", root, out, labels_csv=csv, workers=1)
    data = load_numpy(out)
    assert list(data["id"]) == ["a/x.png", "b.jpg"]
    assert data["image"].shape == (2, 35, 55, 1)
    assert np.all(data["image"][0] == 77) and np.all(np.abs(data["image"][1].astype(int) - 200) <= 2)
    np.testing.assert_allclose(data["gaze"], [[0, 0, -1], [0.6, 0, -0.8]], atol=1e-6)
    np.testing.assert_allclose(data["score"], [[1.5], [2.0]])
    assert quarantine_of(out) == {"c.png": "bad label", "d.png": "missing label", "e.png": "corrupt image",
                                  "labels.csv:zzz": "missing file"}
    assert result.rows == 2 and read_manifest(out).extra["quarantined"] == 4


def test_folder_without_labels_uses_the_preset_size(folder_dir, tmp_path):
    root, _ = folder_dir
    result = ingest("folder", root, str(tmp_path / "f"), cfg=load_config("eye", overrides=["model.image_height=20",
                                                                                          "model.image_width=30"]))
    manifest = read_manifest(str(tmp_path / "f"))
    assert manifest.image_shape == [20, 30, 1] and manifest.label_fields == {}
    assert result.rows == 4 and result.reasons() == {"corrupt image": 1}


def test_folder_scales_pixel_labels_with_the_image(tmp_path):
    """issue 24 item 8: the pupil stayed at its source pixel, outside a smaller image."""
    root = tmp_path / "photos"
    root.mkdir()
    image = np.zeros((40, 80), np.uint8)
    image[8:13, 58:63] = 255  # a pupil centred at x=60, y=10
    Image.fromarray(image).save(root / "p.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("id,pupil_xy_x,pupil_xy_y,tip_uvd_u,tip_uvd_v,tip_uvd_d,score\np,60,10,0,39,450,7\n")
    cfg = load_config("eye", overrides=["model.image_height=20", "model.image_width=20"])
    ingest("folder", root, str(tmp_path / "out"), cfg=cfg, labels_csv=csv, workers=1)
    data = load_numpy(str(tmp_path / "out"))
    np.testing.assert_allclose(data["pupil_xy"], [[60.5 / 4 - 0.5, 10.5 / 2 - 0.5]])
    np.testing.assert_allclose(data["tip_uvd"], [[0.5 / 4 - 0.5, 39.5 / 2 - 0.5, 450]])
    np.testing.assert_allclose(data["score"], [[7]])
    y, x = np.unravel_index(np.argmax(data["image"][0, ..., 0]), (20, 20))
    assert abs(x - data["pupil_xy"][0, 0]) <= 1 and abs(y - data["pupil_xy"][0, 1]) <= 1

    csv.write_text("id,pupil_xy_a,pupil_xy_b,pupil_xy_c\np,1,2,3\n")
    with pytest.raises(IngestError, match="label 'pupil_xy' has 3 column\\(s\\); a pixel label needs a multiple of 2"):
        ingest("folder", root, str(tmp_path / "bad"), cfg=cfg, labels_csv=csv, workers=1)


# --- command line and SRC errors ----------------------------------------------------------------------------


def test_cli_ingest_prints_the_summary(tmp_path, capsys):
    kaggle_h5(tmp_path / "gaze.h5", 3, "group")
    out = str(tmp_path / "out")
    assert cli.main(["ingest", "kaggle-h5", str(tmp_path / "gaze.h5"), "--out", out, "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 rows written" in text and "1 quarantined" in text and "missing label: 1" in text
    assert cli.main(["ingest", "kaggle-h5", str(tmp_path / "gaze.h5"), "--out", out]) == 1
    assert "already holds a dataset" in capsys.readouterr().err
    assert cli.main(["ingest", "kaggle-h5", str(tmp_path / "gaze.h5"), "--out", out, "--overwrite"]) == 0


def test_missing_or_empty_src_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match="no such file or folder"):
        ingest("unityeyes", tmp_path / "missing", str(tmp_path / "o1"))
    with pytest.raises(IngestError, match="empty"):
        ingest("mpiigaze", tmp_path / "empty", str(tmp_path / "o2"))
    with pytest.raises(IngestError, match="no MPIIGaze files"):
        ingest("mpiigaze", tmp_path / "other", str(tmp_path / "o3"))
    assert cli.main(["ingest", "folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o4")]) == 1
    assert "missing: no such file or folder" in capsys.readouterr().err
