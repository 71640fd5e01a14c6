"""A toy two-domain problem: bright clean synthetic discs vs darker, noisy real ones."""

import numpy as np


def toy_images(n: int, seed: int, real: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:35, 0:55]
    cy = rng.uniform(12, 23, size=(n, 1, 1))
    cx = rng.uniform(15, 40, size=(n, 1, 1))
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 36
    background, foreground = (90.0, 20.0) if real else (200.0, 60.0)
    img = np.where(disc, foreground, background)
    if real:
        img = img + rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[..., None]
