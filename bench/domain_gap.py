"""How big is the simulator's synthetic → real gap? A gaze regressor trained on each domain, tested on real.

    DS_ACCELERATOR=cpu .venv/bin/python bench/domain_gap.py [--train 20000] [--test 3000] [--epochs 4]

Rows of the table (mean angular error on labeled real-domain test images, in degrees):

* train synthetic          — what SimGAN starts from (the paper: 11.2° on MPIIGaze)
* train real (labeled)     — the ceiling a perfect refiner approaches
* train synthetic, test on the *same* test eyes rendered clean — the gap that is left
  when only the appearance is removed: if this is close to the real-trained row,
  the gap is appearance (which a refiner can fix), not geometry or labels.

The model is a small CNN (one epoch ≈ seconds on CPU); `--model ridge` uses ridge
regression on pixels instead (no torch needed, weaker).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from simgan_dist.data.render import (
    add_real_eye_appearance,
    render_eye_clean,
    render_eyes,
    sample_eye_params,
)
from simgan_dist.metrics.estimators import angular_error_deg


def features(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×1 → per-image standardised pixels (removes global brightness/contrast)."""
    x = images.reshape(len(images), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True) + 1e-3
    return x


def fit_ridge(images: np.ndarray, gaze: np.ndarray, alpha: float = 10.0):
    x = features(images)
    mu = x.mean(0)
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1], dtype=np.float32), xc.T @ gaze)
    return lambda imgs: (features(imgs) - mu) @ w + gaze.mean(0)


def fit_cnn(images: np.ndarray, gaze: np.ndarray, epochs: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 3)),
        nn.Flatten(), nn.Linear(64 * 6, 64), nn.ReLU(), nn.Linear(64, 3),
    )
    prep = lambda imgs: torch.from_numpy(features(imgs).reshape(len(imgs), 1, *imgs.shape[1:3]))  # noqa: E731
    x, y = prep(images), torch.from_numpy(gaze)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // 128):
            idx = order[i * 128:(i + 1) * 128]
            loss = ((net(x[idx]) - y[idx]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()

    def predict(imgs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([net(b) for b in prep(imgs).split(1024)]).numpy()

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--test", type=int, default=3000)
    parser.add_argument("--model", choices=("cnn", "ridge"), default="cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()

    syn_images, syn_labels = render_eyes(np.random.default_rng([args.seed, 1]), args.train, "synthetic")
    real_images, real_labels = render_eyes(np.random.default_rng([args.seed, 2]), args.train, "real")
    rng = np.random.default_rng([args.seed, 3])
    params = sample_eye_params(rng, args.test, "real")
    clean = render_eye_clean(params)
    test_real = np.clip(add_real_eye_appearance(clean, params, rng) + 0.5, 0, 255).astype(np.uint8)[..., None]
    test_clean = np.clip(clean + 0.5, 0, 255).astype(np.uint8)[..., None]
    test_gaze = params["gaze"]

    def fit(images, labels):
        if args.model == "ridge":
            return fit_ridge(images, labels["gaze"])
        return fit_cnn(images, labels["gaze"], args.epochs, args.seed)

    on_syn, on_real = fit(syn_images, syn_labels), fit(real_images, real_labels)
    rows = [
        ("train synthetic, test real", angular_error_deg(on_syn(test_real), test_gaze)),
        ("train real,      test real", angular_error_deg(on_real(test_real), test_gaze)),
        ("train synthetic, test same eyes rendered clean", angular_error_deg(on_syn(test_clean), test_gaze)),
    ]
    print(f"model={args.model} train={args.train} per domain, test={args.test} real-domain eyes, seed={args.seed}")
    print(f"{'':50s} {'mean °':>8s} {'median °':>9s} {'< 7°':>7s}")
    for name, err in rows:
        print(f"{name:50s} {err.mean():8.2f} {np.median(err):9.2f} {100 * (err < 7).mean():6.1f}%")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
