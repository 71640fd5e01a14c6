"""Evaluation: hand-checked metrics, the pupil detector, the realism score, and the full report."""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgan_dist.cli import build_parser
from simgan_dist.config import load_config
from simgan_dist.data.render import DETERMINISTIC_PARTS
from simgan_dist.data.schema import MANIFEST_NAME, Layout, load_numpy, read_manifest
from simgan_dist.data.simulate import render_rows, simulate_dataset
from simgan_dist.data.writer import DatasetWriter, encode_shard
from simgan_dist.errors import UserError
from simgan_dist.evaluate import cli_evaluate, paired_improvement, run_variants, summarize_runs
from simgan_dist.metrics.drift import detect_pupil, pupil_shift
from simgan_dist.metrics.estimators import angular_error_deg, validation_split
from simgan_dist.metrics.realism import realism_score

# --- angular error ---------------------------------------------------------------------------


def test_angular_error_hand_computed_cases():
    x, y, z = np.eye(3)
    pred = np.array([x, x, x, [np.cos(np.radians(30)), np.sin(np.radians(30)), 0], [1, 1, 0], z])
    target = np.array([x, y, -x, x, x, [0, 0, 5.0]])
    expected = [0.0, 90.0, 180.0, 30.0, 45.0, 0.0]
    np.testing.assert_allclose(angular_error_deg(pred, target), expected, atol=1e-6)


def test_angular_error_ignores_length_and_survives_rounding():
    v = np.array([[0.3, -0.2, -0.9]])
    # Unnormalised copies are 0°; a dot product a hair above 1 must not give NaN.
    np.testing.assert_allclose(angular_error_deg(v * 7.5, v), [0.0], atol=1e-5)
    np.testing.assert_allclose(angular_error_deg(np.array([[1.0, 1e-9, 0]]), np.array([[1.0, 0, 0]])), [0.0],
                               atol=1e-5)
    with pytest.raises(ValueError, match="N×3"):
        angular_error_deg(np.zeros((2, 2)), np.zeros((2, 2)))


# --- pupil detector --------------------------------------------------------------------------


def draw_eye(px: float, py: float, h: int = 35, w: int = 55) -> np.ndarray:
    """A gray eye: bright sclera, mid iris, dark anti-aliased pupil centred at (px, py)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(xx - px, yy - py)
    img = np.full((h, w), 200.0)
    img -= 120.0 * np.clip(5.5 - r + 0.5, 0, 1)  # iris
    img -= 65.0 * np.clip(2.2 - r + 0.5, 0, 1)  # pupil
    return np.rint(img).astype(np.uint8)[None, ..., None]


@pytest.mark.parametrize("px,py", [(27.0, 17.0), (20.3, 15.6), (33.7, 19.25)])
def test_detector_finds_a_drawn_pupil_within_half_a_pixel(px, py):
    found = detect_pupil(draw_eye(px, py))[0]
    assert np.hypot(found[0] - px, found[1] - py) < 0.5


def test_shift_of_a_shifted_image_equals_the_shift():
    base = draw_eye(26.4, 17.2)
    rolled = np.roll(base, (2, -3), axis=(1, 2))  # 2 px down, 3 px left
    np.testing.assert_allclose(pupil_shift(base, rolled)[0], [-3.0, 2.0], atol=1e-4)
    np.testing.assert_allclose(pupil_shift(base, base)[0], [0.0, 0.0], atol=1e-6)
    subpixel = draw_eye(27.0, 17.2)
    assert abs(pupil_shift(base, subpixel)[0, 0] - 0.6) < 0.2


def test_detector_agrees_with_simulator_labels_on_visible_pupils():
    rows = render_rows("eye", "synthetic", 0, 0, 512)
    error = np.linalg.norm(detect_pupil(rows["image"]) - rows["pupil_xy"], axis=1)
    # Some pupils hide under a lid; where the pupil shows, the detector is subpixel.
    assert np.median(error) < 0.3 and (error < 1.5).mean() > 0.8


# --- realism ---------------------------------------------------------------------------------


def test_realism_near_zero_for_one_distribution_and_larger_for_another():
    synthetic_a = render_rows("eye", "synthetic", 1, 0, 300)["image"]
    synthetic_b = render_rows("eye", "synthetic", 2, 0, 300)["image"]
    real = render_rows("eye", "real", 3, 0, 300)["image"]
    same = realism_score(synthetic_a, synthetic_b, seed=0)
    different = realism_score(synthetic_a, real, seed=0)
    assert abs(same) < 0.01 and different > 10 * max(abs(same), 1e-3)
    assert realism_score(synthetic_a, real, seed=0) == different  # deterministic for a seed
    # brighter images are farther from the same reference
    brighter = np.clip(synthetic_b.astype(int) + 25, 0, 255).astype(np.uint8)
    assert realism_score(brighter, synthetic_a) > realism_score(synthetic_b, synthetic_a) + 0.05


# --- full evaluation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """simulate → a stand-in "refined" set (noise added, rows shuffled, same ids) → a labeled "real"."""
    root = tmp_path_factory.mktemp("eval")
    simulate_dataset(str(root), 128, 32, 64, seed=0, parallel=False)
    syn = load_numpy(str(root / "synthetic"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(syn["id"]))
    noisy = np.clip(syn["image"] + rng.normal(0, 6, syn["image"].shape), 0, 255).astype(np.uint8)
    layout = read_manifest(str(root / "synthetic")).layout
    with DatasetWriter(str(root / "refined"), layout, kind="refined", source="test") as writer:
        writer.write({"id": syn["id"][order], "image": noisy[order],
                      **{k: syn[k][order] for k in layout.label_fields}})
    # NaN gaze in one real_test row, as a file other tools wrote (our writers refuse it)
    shutil.copytree(root / "real_test", root / "real_test_nan")
    manifest = json.loads((root / "real_test_nan" / MANIFEST_NAME).read_text())
    shard = manifest["shards"][0]
    table = pq.read_table(root / "real_test_nan" / shard["path"])
    gaze = table.column("gaze").combine_chunks()
    values = gaze.flatten().to_numpy(zero_copy_only=False).copy()
    values[4] = np.nan
    table = table.set_column(table.schema.get_field_index("gaze"), table.schema.field("gaze"),
                             pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 3))
    data, shard["sha256"] = encode_shard(table)
    shard["bytes"] = len(data)
    (root / "real_test_nan" / shard["path"]).write_bytes(data)
    (root / "real_test_nan" / MANIFEST_NAME).write_text(json.dumps(manifest))
    unlabeled = Layout(layout.image_shape)
    with DatasetWriter(str(root / "refined_other_ids"), unlabeled, kind="refined", source="test") as writer:
        writer.write({"id": np.array([f"x{i}" for i in range(len(noisy))], dtype=object), "image": noisy})
    # labeled real training images for the ceiling row: other rows than real_test's (never its own test set)
    with DatasetWriter(str(root / "real_labeled"), read_manifest(str(root / "real_test")).layout, kind="real",
                       source="test") as writer:
        writer.write(render_rows("eye", "real_test", 1, 0, 64))
    run = root / "run"
    run.mkdir()
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "refiner/loss": 1 / s, "disc/loss": 0.7, "disc/acc_real": 0.5}) + "\n"
        for s in range(10, 60, 10)))
    return root


def preservation_mean(metrics):
    return metrics["label_preservation"]["shift_px"]["mean"]


def _args(root, out, *extra):
    return build_parser().parse_args([
        "evaluate", "--synthetic", str(root / "synthetic"), "--refined", str(root / "refined"),
        "--real-test", str(root / "real_test"), "--out", str(out), "--preset", "tiny",
        "--set", "evaluate.gaze_epochs=1", "--set", "evaluate.gaze_batch_size=32",
        "--set", "evaluate.realism_samples=64", "--set", "evaluate.seeds=[0, 1]", *extra])


@pytest.mark.slow
def test_report_has_every_section(datasets, tmp_path, ray_local, mlflow_server, capsys):
    """Also: tracked, the evaluation is an MLflow run with the headline numbers, the report and its datasets."""
    from mlflow import MlflowClient

    from simgan_dist.data.schema import manifest_sha256

    args = _args(datasets, tmp_path / "report", "--run", str(datasets / "run"), "--real",
                 str(datasets / "real_labeled"), "--set", f"tracking.mlflow_uri={mlflow_server.uri}")
    assert cli_evaluate(args) == 0
    out = tmp_path / "report"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"gaze", "label_preservation", "realism", "artifacts", "headline", "inputs", "samples"} <= set(metrics)
    assert set(metrics["gaze"]["variants"]) == {"synthetic", "refined", "real"}
    for variant in metrics["gaze"]["variants"].values():
        assert 0 <= variant["mean_deg"] <= 180 and 0 <= variant["within_7deg"] <= 1
        assert variant["train_rows"] in (115, 58) and variant["test_rows"] == 64  # 10% held out
        assert variant["seeds"] == [0, 1] and len(variant["per_seed"]) == 2 and variant["mean_deg_std"] >= 0
    headline = metrics["headline"]
    assert headline["gaze_seeds"] == 2 and headline["relative_improvement_std"] >= 0
    assert headline["relative_improvement"] == pytest.approx(np.mean(metrics["gaze"]["relative_improvement_per_seed"]))
    assert headline["pupil_shift_px"] == preservation_mean(metrics) and headline["pupil_shift_px_std"] >= 0
    preservation = metrics["label_preservation"]
    assert preservation["labels"] == "pupil_xy" and preservation["pairs"] == 128
    # noise only: the pupil stays put (rows were shuffled, so this also checks the id matching)
    assert preservation["shift_px"]["mean"] < 0.5
    assert metrics["realism"]["refined_vs_real"] != metrics["realism"]["synthetic_vs_real"]
    page = (out / "report.html").read_text()
    for section in ('id="gaze"', 'id="label-preservation"', 'id="realism"', 'id="artifacts"', 'id="samples"',
                    'id="training"'):
        assert section in page
    # error CDF, gaze loss, pupil histogram, ring profile, spectrum, 3 training panels
    assert page.count("<svg") >= 7
    assert set(metrics["artifacts"]["border"]) == {"synthetic", "refined", "real"}
    assert headline["frame_score_refined"] == metrics["artifacts"]["border"]["refined"]["frame_score"]
    assert "Real (ceiling)" in page and "refiner/loss" in page
    for png in ("samples.png", "difference.png"):
        assert png in page and Image.open(out / png).size[0] > 55 * 8
    assert not list(out.glob(".*tmp"))
    printed = capsys.readouterr().out
    assert "report: " in printed and str(out / "report.html") in printed and "pupil shift" in printed
    assert "artifacts vs real: frame score refined" in printed

    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("simgan-evaluate").experiment_id],
                               filter_string=f"tags.`simgan.dataset.refined` = '{datasets / 'refined'}'")
    assert run.data.metrics["gaze_error_refined_deg"] == pytest.approx(headline["gaze_error_refined_deg"])
    assert run.data.tags["simgan.dataset.real.manifest_sha256"] == manifest_sha256(str(datasets / "real_labeled"))
    assert "report/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}


def test_in_process_variants_without_ray_stop_early_on_their_own_validation_part():
    rows = render_rows("eye", "synthetic", 0, 0, 60)
    test = render_rows("eye", "real_test", 0, 0, 16)
    cfg = load_config("tiny", overrides=["evaluate.gaze_epochs=6", "evaluate.gaze_batch_size=16",
                                         "evaluate.gaze_patience=1", "evaluate.gaze_lr=0.05"]).evaluate
    results = run_variants({"a": (rows["image"], rows["gaze"])}, test["image"], test["gaze"], cfg,
                                seeds=[0, 1], use_ray=False, progress=False)
    assert [r["seed"] for r in results["a"]] == [0, 1]
    for r in results["a"]:
        assert r["errors"].shape == (16,) and math.isfinite(r["mean_deg"])
        assert r["train_rows"] == 54 and r["val_rows"] == 6
        assert len(r["loss_curve"]) == len(r["val_curve"]) == r["epochs_run"] <= 6
        # the epoch kept is the best on validation, and training ran `patience` epochs past it at most
        assert r["val_curve"][r["best_epoch"] - 1] == min(r["val_curve"])
        assert r["epochs_run"] == 6 or r["epochs_run"] == r["best_epoch"] + 1
    # a too-large lr diverges or plateaus: at least one seed stops before the last epoch
    assert any(r["epochs_run"] < 6 for r in results["a"])


def test_validation_split_is_seeded_disjoint_and_shared_by_variants():
    train, val = validation_split(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    np.testing.assert_array_equal(validation_split(100, 0.1, seed=3)[1], val)
    assert not np.array_equal(validation_split(100, 0.1, seed=4)[1], val)
    assert len(validation_split(100, 0.0, seed=3)[1]) == 0


def test_paired_improvement_is_per_seed():
    def run(seed, mean):
        return {"seed": seed, "mean_deg": mean, "median_deg": mean, "within_7deg": 0.5, "model": "small",
                "train_rows": 9, "val_rows": 1, "test_rows": 4, "seconds": 1.0, "loss_curve": [1.0],
                "errors": np.zeros(4)}
    synthetic = [run(0, 10.0), run(1, 20.0), run(2, 10.0)]
    refined = [run(0, 8.0), run(1, 15.0), run(2, 10.0)]
    paired = paired_improvement(synthetic, refined)
    np.testing.assert_allclose(paired["per_seed"], [0.2, 0.25, 0.0])
    assert paired["mean"] == pytest.approx(0.15) and paired["std"] == pytest.approx(np.std([0.2, 0.25, 0], ddof=1))
    summary = summarize_runs(refined)
    assert summary["mean_deg"] == pytest.approx(11.0) and summary["mean_deg_std"] == pytest.approx(np.std(
        [8.0, 15.0, 10.0], ddof=1))
    assert "errors" not in summary["per_seed"][0]


@pytest.mark.parametrize("change,message", [
    ({"--refined": "refined_other_ids"}, "does not hold the synthetic dataset's ids"),
    ({"--real-test": "real"}, "evaluate --real-test: .* is a real dataset; evaluate --real-test takes real_test"),
    ({"--real": "real_test"}, "evaluate --real: .* is a real_test dataset; the test set is never training"),
    ({"--real-test": "real_test_nan"}, r"real_test dataset .*real_test_nan': column 'gaze' holds NaN or infinity "
                                       r"in 1 row\(s\) \(e.g. id "),
    ({"--synthetic": "missing"}, "synthetic dataset .* cannot be read"),
])
def test_clear_errors(datasets, tmp_path, change, message):
    args = _args(datasets, tmp_path / "out")
    for flag, name in change.items():
        setattr(args, flag.lstrip("-").replace("-", "_"), str(datasets / name))
    with pytest.raises(UserError, match=message):
        cli_evaluate(args)
    assert not (tmp_path / "out" / "report.html").exists()


def test_instrument_sees_the_deterministic_oracle_clearly_better_than_synthetic():
    """The demo's evaluate settings (jobs/configs/tiny.yaml) must see a perfect deterministic refiner.

    The same synthetic rows re-rendered with light, glints, blur and camera response (no
    noise, no texture) train a clearly better estimator than the clean render; an
    instrument that cannot see this cannot judge a refiner either. One seed, fewer rows.
    """
    cfg = load_config("tiny", "jobs/configs/tiny.yaml", ["evaluate.seeds=[0]"]).evaluate
    synthetic = render_rows("eye", "synthetic", 0, 0, 1200)
    oracle = render_rows("eye", "synthetic", 0, 0, 1200, DETERMINISTIC_PARTS)
    test = render_rows("eye", "real_test", 0, 0, 300)
    runs = run_variants({"synthetic": (synthetic["image"], synthetic["gaze"]),
                              "oracle": (oracle["image"], synthetic["gaze"])}, test["image"], test["gaze"], cfg,
                             use_ray=False, progress=False)
    assert paired_improvement(runs["synthetic"], runs["oracle"])["mean"] > 0.25


# --- evaluate.max_train_rows: a paired subsample by id hash ------------------------------------


def _inputs(root, *overrides):
    from simgan_dist.evaluate_inputs import load_inputs

    cfg = load_config("tiny", overrides=list(overrides))
    return load_inputs(str(root / "synthetic"), str(root / "refined"), str(root / "real_test"),
                       str(root / "real_labeled"), cfg)


def test_max_train_rows_reads_only_the_same_hashed_ids_from_both_sides(datasets, monkeypatch):
    from simgan_dist.data import schema
    from simgan_dist.data.splits import hash_subsample

    decoded = []  # rows decoded per table that holds images
    decode = schema.decode_table
    monkeypatch.setattr(schema, "decode_table",
                        lambda table, layout: decoded.append(table.num_rows if "image" in table.column_names
                                                             else 0) or decode(table, layout))
    data = _inputs(datasets, "evaluate.max_train_rows=40")
    # 40 synthetic, 40 refined and 40 of 64 real rows, all 64 real_test rows: nothing else is decoded
    assert sum(decoded) == 40 + 40 + 64 + 40 and len(data.real) == 40
    assert (len(data.ids), data.corpus_pairs, data.corpus_real) == (40, 128, 64)
    syn = load_numpy(str(datasets / "synthetic"))
    ref = load_numpy(str(datasets / "refined"))
    # the ids of smallest hash, in the synthetic corpus's order
    np.testing.assert_array_equal(data.ids, syn["id"][hash_subsample(syn["id"], 40)])
    by_id = dict(zip(ref["id"], ref["image"], strict=True))
    np.testing.assert_array_equal(data.refined, np.stack([by_id[i] for i in data.ids]))  # paired
    np.testing.assert_array_equal(data.synthetic, syn["image"][np.isin(syn["id"], data.ids)])
    again = _inputs(datasets, "evaluate.max_train_rows=40")
    np.testing.assert_array_equal(again.ids, data.ids)
    np.testing.assert_array_equal(again.refined, data.refined)
    assert any("40 of 128 synthetic/refined pairs" in n for n in data.notes)


def test_a_corpus_within_max_train_rows_loads_as_before(datasets):
    everything = _inputs(datasets, "evaluate.max_train_rows=0")
    default = _inputs(datasets)  # 20,000 > 128 rows
    assert default.corpus_pairs == len(default.ids) == 128 and not any("max_train_rows" in n for n in default.notes)
    for name in ("ids", "synthetic", "refined", "labels", "real"):
        np.testing.assert_array_equal(getattr(default, name), getattr(everything, name))


def test_hash_subsample_is_sized_order_free_and_apart_from_the_validation_split():
    from simgan_dist.data.splits import hash_subsample, validation_mask

    ids = np.array([f"syn-{i:06d}" for i in range(5000)], dtype=object)
    pick = hash_subsample(ids, 500)
    assert len(pick) == 500 == len(set(pick)) and np.all(np.diff(pick) > 0)
    assert set(ids[::-1][hash_subsample(ids[::-1], 500)]) == set(ids[pick])  # order-free
    assert set(ids[hash_subsample(ids[:4000], 400)]) <= set(ids[hash_subsample(ids[:4000], 500)])  # nested
    np.testing.assert_array_equal(hash_subsample(ids, 6000), np.arange(5000))
    # not the ids `data.real` holds out for validation (those of smallest plain hash)
    assert validation_mask(ids[pick], 0.1).mean() < 0.2


def test_evaluate_report_says_how_many_rows_were_used(datasets, tmp_path):
    from simgan_dist.evaluate import evaluate

    cfg = load_config("tiny", overrides=["evaluate.max_train_rows=40", "evaluate.gaze_epochs=1",
                                         "evaluate.gaze_batch_size=32", "evaluate.realism_samples=32",
                                         "evaluate.seeds=[0]"])
    metrics = evaluate(str(datasets / "synthetic"), str(datasets / "refined"), str(datasets / "real_test"),
                       tmp_path / "report", real=str(datasets / "real_labeled"), cfg=cfg, use_ray=False,
                       progress=False)
    inputs = metrics["inputs"]
    assert (inputs["pairs"], inputs["corpus_pairs"], inputs["max_train_rows"]) == (40, 128, 40)
    assert (inputs["real_rows"], inputs["corpus_real_rows"]) == (40, 64)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["inputs"]["corpus_pairs"] == 128
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Estimators trained on 40 of 128 synthetic/refined pairs and 40 of 64 labeled real rows" in html
