"""The artifact instrument against known answers: a painted frame and a painted ripple."""

from __future__ import annotations

import numpy as np
import pytest

from simgan_dist.metrics.artifacts import SPECTRUM_BINS, artifact_metrics, border_stats, radial_power_spectrum


def smooth_noisy_images(count: int, seed: int) -> np.ndarray:
    """Real-like eyes for the instrument: a smooth gradient with a dark blob, and pixel noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:35, :55]
    images = []
    for _ in range(count):
        cy, cx = rng.uniform(12, 23), rng.uniform(18, 37)
        base = 120 + 0.6 * cols + 30 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 40)
        images.append(base + rng.normal(0, 4, base.shape))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None]


def test_a_painted_frame_scores_its_contrast_and_a_clean_image_scores_near_zero():
    clean = smooth_noisy_images(200, 0)
    framed = clean.astype(np.int16)
    framed[:, 2:-2, 2:-2] -= 12  # a dark 1 px frame two pixels in, as zero padding draws one
    framed[:, 3:-3, 3:-3] += 12
    framed = np.clip(framed, 0, 255).astype(np.uint8)
    clean_score, framed_score = border_stats(clean)["frame_score"], border_stats(framed)["frame_score"]
    assert clean_score < 1.0
    assert framed_score > 5 * clean_score and framed_score > 3.0
    assert border_stats(framed)["ring_mean"][2] < border_stats(framed)["ring_mean"][3] - 8


def test_a_ripple_shows_in_its_frequency_bin_and_in_the_distance():
    clean = smooth_noisy_images(200, 1)
    cols = np.arange(55)
    period_px = 4.0  # 0.25 cycles/px
    rippled = np.clip(clean + 6 * np.sin(2 * np.pi * cols / period_px)[None, None, :, None], 0, 255).astype(np.uint8)
    clean_spectrum, rippled_spectrum = radial_power_spectrum(clean), radial_power_spectrum(rippled)
    excess = np.log10(np.array(rippled_spectrum["power"]) / np.array(clean_spectrum["power"]))
    assert clean_spectrum["frequency"][int(np.argmax(excess))] == pytest.approx(0.25, abs=0.5 / SPECTRUM_BINS)
    metrics = artifact_metrics({"clean": smooth_noisy_images(200, 2), "rippled": rippled, "real": clean})
    distances = metrics["vs_real"]
    assert distances["rippled"]["spectrum_log_distance"] > 5 * distances["clean"]["spectrum_log_distance"]
    assert abs(distances["clean"]["frame_score_excess"]) < 0.5
    assert sum(metrics["spectrum"]["real"]["power"]) == pytest.approx(1.0)
