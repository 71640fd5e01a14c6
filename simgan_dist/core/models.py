"""The paper's networks: refiner R, local patch discriminator D, and the gaze estimator.

Pure PyTorch. Shapes follow Shrivastava et al. 2017 (§3.1, §3.2, appendix):

- Refiner: fully convolutional ResNet without striding or pooling, so output size equals
  input size; tanh keeps the output in the [-1, 1] range of the normalised input.
- Discriminator: a local classifier whose output is a map of 2-class logits, one per
  receptive-field patch. Valid (unpadded) convolutions as in the paper give:

  ======  =========  =============
  preset  input      D output map
  ======  =========  =============
  eye     35 x 55    4 x 9   (36 patches)
  hand    224 x 224  5 x 5   (25 patches)
  ======  =========  =============

  `Discriminator.output_size` computes it; tests pin both.
- GazeNet: the paper's "FC9600" is the flattened conv output (192 x 5 x 10 = 9600 for a
  35x55 input), followed by FC 1000 and FC 3.
"""

from __future__ import annotations

import torch
from torch import nn

from simgan_dist.config import ModelConfig


def same_conv(channels_in: int, channels_out: int, kernel: int, padding_mode: str) -> nn.Conv2d:
    """A convolution whose output has its input's size; `padding_mode` fills what lies beyond the edge."""
    return nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2, padding_mode=padding_mode)


class ResnetBlock(nn.Module):
    """Two same-size convolutions with a skip connection (the paper's Fig. 3)."""

    def __init__(self, channels: int, kernel: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = same_conv(channels, channels, kernel, padding_mode)
        self.conv2 = same_conv(channels, channels, kernel, padding_mode)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        return self.act(x + self.conv2(y))


class Refiner(nn.Module):
    """Input conv → N ResNet blocks → 1x1 conv to the image channels → tanh.

    Zero padding (the paper's) shows R black beyond every edge, and R learns to paint a frame a
    few pixels in that D then keys on; "reflect" continues the image instead (issue 23).
    """

    def __init__(self, channels_in: int = 1, features: int = 64, blocks: int = 4, kernel: int = 3,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.stem = nn.Sequential(same_conv(channels_in, features, kernel, padding_mode), nn.ReLU())
        self.blocks = nn.Sequential(*(ResnetBlock(features, kernel, padding_mode) for _ in range(blocks)))
        self.head = nn.Conv2d(features, channels_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.blocks(self.stem(x))))


def _width(base: int, scale: float) -> int:
    return max(2, round(base * scale))


class Discriminator(nn.Module):
    """Local adversarial discriminator: returns N×2×h×w logits (class 0 real, 1 refined)."""

    def __init__(self, channels_in: int = 1, architecture: str = "eye", width: float = 1.0):
        super().__init__()
        c96, c64, c32 = _width(96, width), _width(64, width), _width(32, width)
        relu = nn.ReLU
        if architecture == "eye":
            layers = [
                nn.Conv2d(channels_in, c96, 3, stride=2), relu(),
                nn.Conv2d(c96, c64, 3, stride=2), relu(),
                nn.MaxPool2d(3, stride=1),
                nn.Conv2d(c64, c32, 3, stride=1), relu(),
                nn.Conv2d(c32, c32, 1), relu(),
                nn.Conv2d(c32, 2, 1),
            ]
        elif architecture == "hand":
            layers = [
                nn.Conv2d(channels_in, c96, 7, stride=4), relu(),
                nn.Conv2d(c96, c64, 5, stride=2), relu(),
                nn.MaxPool2d(3, stride=2),
                nn.Conv2d(c64, c32, 3, stride=2), relu(),
                nn.Conv2d(c32, c32, 1), relu(),
                nn.Conv2d(c32, 2, 1),
            ]
        else:
            raise ValueError(f"unknown discriminator architecture {architecture!r} (eye or hand)")
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        probe = next(self.parameters())
        shape = self.net(torch.zeros(1, self.net[0].in_channels, height, width, dtype=probe.dtype,
                                     device=probe.device)).shape
        return int(shape[-2]), int(shape[-1])


class GazeNet(nn.Module):
    """The paper's gaze estimator (§3.1.3) on 35x55 gray: predicts a 3-D gaze vector.

    conv3x3 32, conv3x3 32, conv3x3 64, maxpool3x3 s2, conv3x3 80, conv3x3 192,
    maxpool2x2 s2, flatten (9600 for 35x55), FC 1000, FC 3.
    """

    def __init__(self, channels_in: int = 1, height: int = 35, width: int = 55):
        super().__init__()
        relu = nn.ReLU
        self.features = nn.Sequential(
            nn.Conv2d(channels_in, 32, 3), relu(),
            nn.Conv2d(32, 32, 3), relu(),
            nn.Conv2d(32, 64, 3), relu(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 80, 3), relu(),
            nn.Conv2d(80, 192, 3), relu(),
            nn.MaxPool2d(2, stride=2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels_in, height, width)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 1000), relu(),
            nn.Linear(1000, 3),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 1,000 activations the gaze vector is read from."""
        return self.head[:-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[-1](self.embed(x))


class SmallGazeNet(nn.Module):
    """A small, fast gaze CNN for CPU evaluations (about 30x cheaper than GazeNet per image).

    Each image is standardised to zero mean and unit variance first (global brightness and
    contrast carry no gaze), then conv3x3 16, pool, conv3x3 32, pool, conv3x3 64, adaptive
    pool to 2x3, FC 64, FC 3. Its synthetic-to-real gap is larger than GazeNet's, and so are the gains it
    measures: both rank the appearance oracle above synthetic, but the demo's refined eyes gain under it and
    not under GazeNet (`bench/quality.py`, bench/RESULTS.md issue 23 7.).
    """

    def __init__(self, channels_in: int = 1, height: int = 35, width: int = 55):
        super().__init__()
        relu = nn.ReLU
        self.net = nn.Sequential(
            nn.Conv2d(channels_in, 16, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), relu(), nn.AdaptiveAvgPool2d((2, 3)),
            nn.Flatten(), nn.Linear(64 * 6, 64), relu(), nn.Linear(64, 3),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 64 activations the gaze vector is read from (the objective's realism space for eyes)."""
        mean = x.mean((1, 2, 3), keepdim=True)
        std = x.std((1, 2, 3), keepdim=True)
        return self.net[:-1]((x - mean) / (std + 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[-1](self.embed(x))


GAZE_MODELS = {"gazenet": GazeNet, "small": SmallGazeNet}


class SmallPoseNet(nn.Module):
    """A small hand-pose CNN for CPU evaluations: depth map → each joint's (u, v), scaled to [-1, 1].

    conv3x3 16, pool, conv3x3 32, pool, conv3x3 64, pool, conv3x3 64, adaptive pool to 4x4 (where
    things are is the answer, so more of the layout survives than in the gaze CNN), FC 256, FC `outputs`.
    """

    def __init__(self, channels_in: int = 1, height: int = 64, width: int = 64, outputs: int = 32):
        super().__init__()
        relu = nn.ReLU
        self.net = nn.Sequential(
            nn.Conv2d(channels_in, 16, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), relu(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), relu(), nn.AdaptiveAvgPool2d((4, 4)),
            nn.Flatten(), nn.Linear(64 * 16, 256), relu(), nn.Linear(256, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_refiner(cfg: ModelConfig) -> Refiner:
    return Refiner(cfg.image_channels, cfg.refiner_channels, cfg.refiner_blocks, cfg.refiner_kernel,
                   cfg.refiner_padding)


def build_discriminator(cfg: ModelConfig) -> Discriminator:
    return Discriminator(cfg.image_channels, cfg.disc_stack or cfg.architecture, cfg.disc_width)
