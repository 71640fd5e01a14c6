"""The two-domain simulator: determinism, label meaning, a real domain gap, S3 output via Ray tasks."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from simgan_dist import cli
from simgan_dist.data import render, simulate, storage
from simgan_dist.data.schema import load_numpy, read_manifest


def pixel_noise(images: np.ndarray) -> float:
    """Median |Laplacian|: the median ignores the few edge pixels and measures noise and texture."""
    x = images[..., 0].astype(np.float32)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.median(np.abs(lap)))


def darkest_spot(images: np.ndarray) -> np.ndarray:
    """(x, y) of the darkest 3x3 neighbourhood of each image (robust to sensor noise)."""
    x = images[..., 0].astype(np.float32)
    box = sum(x[:, dy:dy + 33, dx:dx + 53] for dy in range(3) for dx in range(3))
    flat = box.reshape(len(x), -1).argmin(1)
    return np.stack([flat % 53 + 1, flat // 53 + 1], 1).astype(np.float32)


def test_rows_depend_only_on_seed_split_and_index():
    a = simulate.render_rows("eye", "synthetic", 7, 0, 600)
    b = simulate.render_rows("eye", "synthetic", 7, 250, 600)  # starts mid-block
    np.testing.assert_array_equal(a["image"][250:], b["image"])
    np.testing.assert_array_equal(a["gaze"][250:], b["gaze"])
    assert a["id"][250] == b["id"][0] == "synthetic-7-000000250"
    other_seed = simulate.render_rows("eye", "synthetic", 8, 0, 600)
    assert not np.array_equal(a["image"], other_seed["image"])
    real, real_test = (simulate.render_rows("eye", s, 7, 0, 100) for s in ("real", "real_test"))
    assert not np.array_equal(real["image"], real_test["image"])
    assert set(real) == {"id", "image", "source"}  # unlabeled
    assert {"gaze", "pupil_xy", "head_pose"} <= set(real_test)


def test_eye_labels_mean_what_they_say():
    images, labels = render.render_eyes(np.random.default_rng(0), 2000, "synthetic")
    assert images.shape == (2000, 35, 55, 1) and images.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(labels["gaze"], axis=1), 1.0, rtol=1e-5)
    assert (labels["gaze"][:, 2] < 0).all()  # every eye looks towards the camera
    # Looking right (x > 0) puts the pupil right of the eye's centre; looking up puts it higher.
    assert np.corrcoef(labels["gaze"][:, 0], labels["pupil_xy"][:, 0])[0, 1] > 0.9
    assert np.corrcoef(labels["gaze"][:, 1], labels["pupil_xy"][:, 1])[0, 1] > 0.8
    # pupil_xy is where the dark pupil is: the darkest spot sits on it whenever the lids leave it visible.
    assert np.median(np.linalg.norm(darkest_spot(images) - labels["pupil_xy"], axis=1)) < 1.5


def test_real_domain_differs_in_appearance_and_gaze_prior():
    rng = np.random.default_rng(1)
    syn, syn_labels = render.render_eyes(rng, 2000, "synthetic")
    real, real_labels = render.render_eyes(rng, 2000, "real")
    assert pixel_noise(real) > 3 * pixel_noise(syn) + 1
    # Narrower, clumpier gaze: real yaw spread is well under the synthetic one.
    assert real_labels["gaze"][:, 0].std() < 0.6 * syn_labels["gaze"][:, 0].std()
    # Same geometry: under the real appearance the pupil is still where pupil_xy says.
    assert np.median(np.linalg.norm(darkest_spot(real) - real_labels["pupil_xy"], axis=1)) < 1.5


def test_hand_depth_maps():
    images, labels = render.render_hands(np.random.default_rng(0), 4, "synthetic")
    real, _ = render.render_hands(np.random.default_rng(0), 4, "real")
    assert images.shape == (4, 224, 224, 1) and images.dtype == np.uint16
    joints = labels["joints_uvd"]
    assert joints.shape == (4, 16, 3) and (joints[..., :2] > 0).all() and (joints[..., :2] < 224).all()
    assert (images > 0).all() and (real == 0).any()  # the real sensor loses pixels; the renderer does not
    wrist_u, wrist_v = joints[0, 0, :2].astype(int)
    palm = images[0, wrist_v - 5: wrist_v + 5, wrist_u - 5: wrist_u + 5]
    assert palm.min() < images[0].max()  # the hand is nearer than the wall behind it


def test_small_hand_crops_are_the_same_scene_through_a_shorter_lens():
    full, full_labels = render.render_hands(np.random.default_rng(5), 4, "synthetic")
    small, small_labels = render.render_hands(np.random.default_rng(5), 4, "synthetic", size=64)
    assert small.shape == (4, 64, 64, 1) and small.dtype == np.uint16
    np.testing.assert_allclose(small_labels["joints_uvd"][..., :2], full_labels["joints_uvd"][..., :2] * 64 / 224,
                               atol=1e-3)
    np.testing.assert_allclose(small_labels["joints_uvd"][..., 2], full_labels["joints_uvd"][..., 2])
    # the hand covers the same share of the frame
    share = [(img[..., 0] < img.max((1, 2, 3))[:, None, None] - 200).mean() for img in (full, small)]
    assert abs(share[0] - share[1]) < 0.02


def test_hand_depth_oracle_keeps_rows_and_adds_the_sensor_artifacts():
    synthetic = simulate.render_rows("hand", "synthetic", 3, 0, 32, hand_size=64)
    oracle = simulate.render_rows("hand", "synthetic", 3, 0, 32, ("kinect",), hand_size=64)
    np.testing.assert_array_equal(oracle["id"], synthetic["id"])
    np.testing.assert_array_equal(oracle["joints_uvd"], synthetic["joints_uvd"])
    np.testing.assert_array_equal(simulate.render_rows("hand", "synthetic", 3, 0, 32, (), hand_size=64)["image"],
                                  synthetic["image"])
    before, after = synthetic["image"][..., 0].astype(float), oracle["image"][..., 0].astype(float)
    hand = before < np.median(before.reshape(32, -1), axis=1)[:, None, None] - 100  # the wall fills most of it
    wall = ~hand
    lost = after == 0
    assert not (lost & wall).any()  # readings are lost on the hand only: its silhouette band and holes
    assert 0.2 < lost[hand].mean() < 0.8
    # the rest is the same surface under a few mm of noise
    kept = ~lost
    assert 1.0 < np.abs(after - before)[kept].mean() < 6.0


def test_simulate_is_independent_of_shard_size(tmp_path):
    a = simulate.simulate_dataset(str(tmp_path / "a"), 300, 120, 50, seed=3, rows_per_shard=1000)
    simulate.simulate_dataset(str(tmp_path / "b"), 300, 120, 50, seed=3, rows_per_shard=70, parallel=False)
    assert a == {"synthetic": 300, "real": 120, "real_test": 50}
    for split in a:
        x, y = load_numpy(str(tmp_path / "a" / split)), load_numpy(str(tmp_path / "b" / split))
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert len(read_manifest(str(tmp_path / "b" / "synthetic")).shards) == 5


@pytest.mark.slow
def test_simulate_to_s3_with_ray_tasks_and_read_back(ray_local, s3_bucket):
    out = storage.join(s3_bucket, "eyes")
    counts = simulate.simulate_dataset(out, 900, 300, 200, seed=5, rows_per_shard=250, parallel=True)
    assert counts == {"synthetic": 900, "real": 300, "real_test": 200}
    manifest = read_manifest(storage.join(out, "synthetic"))
    assert manifest.rows == 900 and [s.rows for s in manifest.shards] == [250, 250, 250, 150]
    assert manifest.extra["seed"] == 5 and manifest.kind == "synthetic"
    assert read_manifest(storage.join(out, "real")).label_fields == {}

    # Ordinary Parquet: plain pyarrow + pandas read it with exact counts.
    fs, base = storage.resolve(storage.join(out, "real_test"))
    frame = pq.read_table(f"{base}/part-00000.parquet", filesystem=fs).to_pandas()
    assert len(frame) == 200 and frame["id"].is_unique
    assert len(frame["gaze"][0]) == 3 and frame["source"][0] == "simulate:eye:real_test"
    total = sum(pq.read_metadata(f"{base}/../synthetic/{s.path}", filesystem=fs).num_rows
                for s in manifest.shards)
    assert total == 900

    # Parallel output equals the in-process render of the same rows.
    data = load_numpy(storage.join(out, "synthetic"), limit=300)
    expected = simulate.render_rows("eye", "synthetic", 5, 0, 300)
    np.testing.assert_array_equal(data["image"], expected["image"])


def test_cli_simulate_prints_a_summary(tmp_path, capsys):
    assert cli.main(["simulate", "--out", str(tmp_path), "--synthetic", "40", "--real", "30",
                     "--real-test", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/synthetic: 40 rows" in out and f"{tmp_path}/real_test: 20 rows" in out
    assert "simulated 90 eye images" in out and "images/s" in out


def test_cli_simulate_hand(tmp_path, capsys):
    assert cli.main(["simulate", "--kind", "hand", "--out", str(tmp_path), "--synthetic", "3", "--real", "2",
                     "--real-test", "2", "--preset", "hand"]) == 0
    data = load_numpy(str(tmp_path / "real_test"))
    assert data["image"].dtype == np.uint16 and data["joints_uvd"].shape == (2, 16, 3)
    assert cli.main(["simulate", "--kind", "hand", "--hand-size", "64", "--out", str(tmp_path / "small"),
                     "--synthetic", "3", "--real", "2", "--real-test", "2"]) == 0
    manifest = read_manifest(str(tmp_path / "small" / "synthetic"))
    assert manifest.layout.image_shape == (64, 64, 1) and manifest.layout.image_dtype == "uint16"
    with pytest.raises(ValueError, match="--hand-size must be within 32..224"):
        simulate.simulate_dataset(str(tmp_path / "tiny"), 1, 1, 1, kind="hand", hand_size=16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="synthetic: row count must be >= 0"):
        simulate.simulate_dataset("/tmp/unused", -1, 0, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        simulate.simulate_dataset("/tmp/unused", 1, 0, 0, kind="face")


def test_appearance_oracle_keeps_rows_and_switches_parts():
    synthetic = simulate.render_rows("eye", "synthetic", 3, 100, 400)
    full = simulate.render_rows("eye", "synthetic", 3, 100, 400, render.APPEARANCE_PARTS)
    # Same rows: ids and every label; only the appearance differs.
    np.testing.assert_array_equal(full["id"], synthetic["id"])
    for key in ("gaze", "pupil_xy", "head_pose"):
        np.testing.assert_array_equal(full[key], synthetic[key])
    np.testing.assert_array_equal(simulate.render_rows("eye", "synthetic", 3, 100, 400, ())["image"],
                                  synthetic["image"])
    assert pixel_noise(full["image"]) > pixel_noise(synthetic["image"]) + 1
    deterministic = simulate.render_rows("eye", "synthetic", 3, 100, 400, render.DETERMINISTIC_PARTS)
    assert pixel_noise(deterministic["image"]) < pixel_noise(full["image"]) - 1  # no sensor noise, no texture
    # Glints are the only part that brightens the pupil: switching them off darkens it there.
    no_glints = simulate.render_rows("eye", "synthetic", 3, 100, 400, ("light", "blur", "camera"))
    x, y = np.rint(synthetic["pupil_xy"]).astype(int).T
    rows = np.arange(len(x))
    patch = lambda img: sum(img[rows, np.clip(y + dy, 0, 34), np.clip(x + dx, 0, 54), 0].astype(float)  # noqa: E731
                            for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert (patch(deterministic["image"]) - patch(no_glints["image"])).mean() > 50
    with pytest.raises(ValueError, match="unknown appearance parts"):
        simulate.render_rows("eye", "synthetic", 3, 0, 10, ("texture", "sparkle"))
