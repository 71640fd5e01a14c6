"""The label-free objective: scores, the held-out real split, scored checkpoints (no Ray)."""

import json

import numpy as np
import pytest

from simgan_dist import evaluate
from simgan_dist.config import load_config
from simgan_dist.data import splits
from simgan_dist.data.schema import load_numpy
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.errors import ConfigError
from simgan_dist.metrics import drift, objective, realism
from simgan_dist.train.local import train_local


@pytest.fixture(scope="module")
def eyes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eyes")
    simulate_dataset(str(folder), synthetic=160, real=160, real_test=0, seed=5, rows_per_shard=80, parallel=False)
    return folder


def test_evaluate_uses_the_metrics_modules_not_a_copy():
    from simgan_dist.metrics import preservation

    assert preservation.detect_pupil is drift.detect_pupil
    assert preservation.pupil_shift is drift.pupil_shift
    assert preservation.silhouette_shift is drift.silhouette_shift
    assert evaluate.realism_score is realism.realism_score


def test_identity_scores_one_and_a_shifted_refiner_pays_for_drift(eyes):
    synthetic = load_numpy(str(eyes / "synthetic"), columns=["image"])["image"]
    real = load_numpy(str(eyes / "real"), columns=["image"])["image"]
    same = objective.label_free_scores(synthetic, synthetic, real)
    assert same["drift"] == 0 and abs(same["objective"] - 1.0) < 1e-9
    shifted = np.roll(synthetic, 4, axis=2)  # every pupil 4 px to the right
    moved = objective.label_free_scores(synthetic, shifted, real)
    assert moved["drift"] > 3.0
    tolerance = drift.drift_tolerance_px(synthetic.shape[2])
    ratio = moved["realism"] / moved["realism_synthetic"]
    assert moved["objective"] == pytest.approx(ratio + (moved["drift"] - tolerance) / tolerance)
    assert moved["objective"] > same["objective"] + 1.0
    # drift within the tolerance costs nothing: the detector itself moves ~0.85 px on real-looking eyes
    assert objective.combine(0.05, 0.1, 1.0, 55) == pytest.approx(0.5)
    assert objective.combine(0.05, 0.1, 3.0, 55) == pytest.approx(1.5)
    hands = np.full((4, 64, 64, 1), 900, np.uint16)
    hands[:, 20:40, 10:30] = 500
    assert drift.label_drift(hands, np.roll(hands, 5, axis=2), kind="hand") == pytest.approx(5.0)
    # refined depth comes back with its background as 0 (no reading): the silhouette stays the hand
    refined = np.where(hands < 900, hands, 0).astype(np.uint16)
    assert drift.label_drift(hands, refined, kind="hand") == pytest.approx(0.0)


def test_validation_split_is_deterministic_and_excluded_from_training():
    ids = np.array([f"real-{i:06d}" for i in range(4000)], dtype=object)
    mask = splits.validation_mask(ids, 0.1)
    assert 300 < mask.sum() < 500
    np.testing.assert_array_equal(mask[::-1], splits.validation_mask(ids[::-1], 0.1))  # order-free
    batch = {"id": ids, "image": np.arange(4000)}
    kept = splits.drop_validation_rows(batch, 0.1)
    assert set(kept) == {"image"} and len(kept["image"]) == (~mask).sum()
    with pytest.raises(ConfigError, match="real_val_fraction"):
        load_config("tiny", overrides=["data.real_val_fraction=1.5"])
    with pytest.raises(ConfigError, match="tune.lr"):
        load_config("tiny", overrides=["tune.lr={min: 1e-3, max: 1e-4}"])


def test_local_training_keeps_best_checkpoints_without_reading_real_test(eyes, tmp_path):
    from simgan_dist.refine import choose_checkpoint

    cfg = load_config("tiny", overrides=[
        f"data.synthetic={eyes / 'synthetic'}", f"data.real={eyes / 'real'}",
        f"data.real_test={tmp_path / 'does-not-exist'}", "data.real_val_fraction=0.2",
        "train.eval_every=4", "train.eval_samples=64", "train.keep_best=2", "train.pretrain_refiner_steps=4",
        "train.pretrain_disc_steps=2", "train.iterations=6", "train.checkpoint_every=6"])
    run = train_local(cfg, tmp_path / "run", progress=False)
    best = sorted((tmp_path / "run" / "best").iterdir())
    assert len(best) == 2
    scores = [json.loads((d / objective.SCORES_FILE).read_text()) for d in best]
    records = [json.loads(x) for x in (run.folder / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "objective" in r]
    assert [r["step"] for r in evaluated] == [4, 8, 12]
    assert sorted(s["objective"] for s in scores) == sorted(r["objective"] for r in evaluated)[:2]
    chosen = json.loads(open(f"{choose_checkpoint(str(run.folder), cfg)}/{objective.SCORES_FILE}").read())
    kept = [json.loads((d / objective.SCORES_FILE).read_text()) for d in best]
    kept += [json.loads((run.checkpoint / objective.SCORES_FILE).read_text())] if (
        run.checkpoint / objective.SCORES_FILE).exists() else []
    lowest = min(kept, key=lambda k: k["objective"])
    bound = lowest["objective"] + lowest["objective_se"]  # objective.choose's rule
    assert chosen["step"] == max(k["step"] for k in kept if k["objective"] <= bound)
    assert choose_checkpoint(str(run.checkpoint), cfg) == str(run.checkpoint)  # an explicit folder is used as is


def test_scores_describe_the_weights_the_checkpoint_holds_with_an_ema(eyes, tmp_path):
    """With an EMA, a best checkpoint's scores are those of its refiner.pt (the EMA refine loads), not of raw R."""
    from simgan_dist.train.checkpoint import load_refiner

    cfg = load_config("tiny", overrides=[
        f"data.synthetic={eyes / 'synthetic'}", f"data.real={eyes / 'real'}", "data.real_val_fraction=0.2",
        "train.eval_every=4", "train.eval_samples=64", "train.keep_best=3", "train.pretrain_refiner_steps=4",
        "train.pretrain_disc_steps=2", "train.iterations=6", "train.ema_decay=0.9"])
    run = train_local(cfg, tmp_path / "run", progress=False)
    evaluator = objective.Evaluator.from_config(cfg)
    for folder in sorted((run.folder / "best").iterdir()):
        saved = json.loads((folder / objective.SCORES_FILE).read_text())
        refiner, _ = load_refiner(str(folder))
        if saved["step"] > 4:  # after pretraining the EMA and raw R differ
            assert evaluator(refiner)["objective"] == pytest.approx(saved["objective"], rel=1e-6)


@pytest.mark.parametrize("layout", ["manifest", "legacy"])
def test_real_validation_split_reads_exactly_the_datasets_good_rows(tmp_path, layout):
    """The held-out split works on the `_manifest.json` layout (quarantine under `_quarantine/`) and on
    the old one: validation rows are the good rows a plain reader sees whose id falls in the split,
    and the real training images are exactly the others."""
    import shutil

    import pandas as pd

    from simgan_dist.data.schema import LEGACY_MANIFEST_NAME, MANIFEST_NAME
    from simgan_dist.train.local import _load_images

    simulate_dataset(str(tmp_path / "eyes"), synthetic=8, real=120, real_test=0, seed=7, rows_per_shard=50,
                     parallel=False)
    simulate_dataset(str(tmp_path / "other"), synthetic=0, real=30, real_test=0, seed=8, rows_per_shard=50,
                     parallel=False)
    real = tmp_path / "eyes" / "real"
    (real / "_quarantine").mkdir()  # rows that are not the dataset's: every reader must skip them
    shutil.copy(tmp_path / "other" / "real" / "part-00000.parquet", real / "_quarantine" / "quarantine.parquet")
    plain_ids = pd.read_parquet(real)["id"].to_numpy()
    if layout == "legacy":
        (real / MANIFEST_NAME).rename(real / LEGACY_MANIFEST_NAME)
    cfg = load_config("tiny", overrides=[f"data.real={real}", "data.real_val_fraction=0.25", "train.eval_every=1"])

    rows = load_numpy(str(real), columns=["id", "image"])
    assert sorted(rows["id"]) == sorted(plain_ids) and len(plain_ids) == 120
    held = splits.validation_mask(rows["id"], 0.25)
    assert 10 < held.sum() < 50
    np.testing.assert_array_equal(splits.load_real_val(cfg, 1000), rows["image"][held])
    np.testing.assert_array_equal(splits.load_real_val(cfg, 5), rows["image"][held][:5])
    np.testing.assert_array_equal(_load_images(str(real), "real", cfg), rows["image"][~held])


def test_gaze_feature_space_scores_a_perfect_appearance_transfer_as_more_real(eyes):
    """The oracle: the same synthetic eyes re-rendered with the simulator's real appearance (labels unchanged)."""
    import torch

    from simgan_dist.data.render import APPEARANCE_PARTS
    from simgan_dist.data.simulate import render_rows

    synthetic = load_numpy(str(eyes / "synthetic"), columns=["image", "gaze"])
    real = load_numpy(str(eyes / "real"), columns=["image"])["image"]
    transferred = render_rows("eye", "synthetic", 5, 0, len(synthetic["image"]), appearance=APPEARANCE_PARTS)["image"]
    before = torch.random.get_rng_state()
    space = realism.GazeFeatures(synthetic["image"], synthetic["gaze"], seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # a training run's RNG streams are untouched
    reference = realism.RealismReference(real, features=space)
    assert reference.score(transferred) < 0.5 * reference.score(synthetic["image"])
    again = realism.GazeFeatures(synthetic["image"], synthetic["gaze"], seed=0)
    assert realism.RealismReference(real, features=again).score(transferred) == pytest.approx(
        reference.score(transferred), rel=1e-6)  # the same space in every process for a seed


def test_eye_runs_are_scored_in_the_gaze_feature_space(eyes):
    cfg = load_config("tiny", overrides=[f"data.synthetic={eyes / 'synthetic'}", f"data.real={eyes / 'real'}",
                                         "train.eval_every=10", "train.eval_samples=32"])
    evaluator = objective.Evaluator.from_config(cfg)
    assert isinstance(evaluator.reference.features_of, realism.GazeFeatures)
    assert len(evaluator.synthetic) == 32


def test_a_scores_standard_error_matches_the_spread_of_the_score_over_fresh_samples():
    """The jackknife error of the realism score against a known answer: the spread of the score itself over
    independent candidate sets drawn from one distribution, the reference held fixed (as in training)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    reference = realism.RealismReference(torch.randn(400, 8, generator=generator), features=lambda x: x)
    draws = [reference.score_and_error(torch.randn(200, 8, generator=generator) + 0.3) for _ in range(40)]
    spread = float(np.std([score for score, _ in draws], ddof=1))
    typical_error = float(np.mean([error for _, error in draws]))
    assert 0.6 * spread < typical_error < 1.6 * spread
    assert all(score > 0 for score, _ in draws)  # shifted by 0.3 per dimension: clearly not the reference


def test_the_realism_space_is_fitted_once_per_dataset_and_seed(eyes, tmp_path, monkeypatch):
    """A sweep's trials and a run's restarts read the fitted network back instead of fitting it again."""
    import torch

    monkeypatch.setenv("SIMGAN_DIST_CACHE", str(tmp_path))
    cfg = load_config("tiny", overrides=[f"data.synthetic={eyes / 'synthetic'}", f"data.real={eyes / 'real'}",
                                         "train.eval_every=10", "train.eval_samples=32"])
    first = objective.Evaluator.from_config(cfg)
    assert len(list((tmp_path / "realism").glob("*.pt"))) == 1

    def no_fitting(*args, **kwargs):
        raise AssertionError("the realism network was fitted again")

    with monkeypatch.context() as patched:
        patched.setattr(realism, "fit_estimator", no_fitting)
        again = objective.Evaluator.from_config(cfg)
    assert torch.equal(first.reference.features, again.reference.features)
    assert again.realism_synthetic == first.realism_synthetic
    cfg.train.seed = 1  # another seed, another space
    objective.Evaluator.from_config(cfg)
    assert len(list((tmp_path / "realism").glob("*.pt"))) == 2


def test_the_choice_takes_the_latest_checkpoint_within_the_lowest_ones_standard_error():
    """Differences inside the score's own noise do not decide: the later checkpoint wins them (the gain grows
    with training, bench/RESULTS.md issue 23); a clearly lower objective still does; old scores count as exact."""
    found = [(0.50, 500, "a"), (0.55, 900, "b"), (0.58, 1300, "c"), (0.70, 1310, "d")]
    assert objective.choose(found, [0.09, 0.08, 0.08, 0.08]) == 2  # 0.58 <= 0.50 + 0.09: step 1300
    assert objective.choose(found, [0.06, 0.08, 0.08, 0.08]) == 1  # 0.58 > 0.56: step 900
    assert objective.choose(found, [0.0] * 4) == 0  # no errors recorded: the lowest
