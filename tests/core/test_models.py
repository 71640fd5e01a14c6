import pytest
import torch

from simgan_dist.config import load_config
from simgan_dist.core.models import Discriminator, GazeNet, Refiner, build_discriminator, build_refiner


@pytest.mark.parametrize("preset, size", [("eye", (4, 9)), ("hand", (5, 5))])
def test_discriminator_output_map(preset, size):
    cfg = load_config(preset).model
    disc = build_discriminator(cfg)
    assert disc.output_size(cfg.image_height, cfg.image_width) == size
    logits = disc(torch.randn(2, 1, cfg.image_height, cfg.image_width))
    assert logits.shape == (2, 2, *size)


@pytest.mark.parametrize("preset", ["eye", "tiny"])
def test_refiner_preserves_shape_and_range(preset):
    cfg = load_config(preset).model
    refiner = build_refiner(cfg)
    x = torch.rand(3, 1, 35, 55) * 2 - 1
    y = refiner(x)
    assert y.shape == x.shape
    assert y.abs().max() <= 1


def test_hand_refiner_preserves_shape():
    refiner = build_refiner(load_config("hand").model)
    assert refiner(torch.zeros(1, 1, 224, 224)).shape == (1, 1, 224, 224)
    assert refiner.stem[0].kernel_size == (7, 7)
    assert len(refiner.blocks) == 10


def test_refiner_has_no_striding_or_pooling():
    refiner = build_refiner(load_config("eye").model)
    for m in refiner.modules():
        assert not isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))
        if isinstance(m, torch.nn.Conv2d):
            assert m.stride == (1, 1)


def test_discriminator_is_not_linear():
    """D(a + b) != D(a) + D(b) - D(0): a public port forgot the non-linearities."""
    torch.manual_seed(0)
    disc = Discriminator()
    a, b = torch.randn(2, 1, 1, 35, 55)
    zero = torch.zeros_like(a)
    gap = disc(a + b) - (disc(a) + disc(b) - disc(zero))
    assert gap.abs().max() > 1e-3
    assert sum(isinstance(m, torch.nn.ReLU) for m in disc.modules()) == 4


def test_gazenet_shapes():
    net = GazeNet()
    assert net.head[1].in_features == 9600  # the paper's "FC9600": 192 x 5 x 10
    assert net(torch.zeros(4, 1, 35, 55)).shape == (4, 3)


def test_bf16_and_channels_last():
    refiner = Refiner(features=8, blocks=1).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    disc = Discriminator(width=0.25).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(4, 1, 35, 55, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = refiner(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert disc(y).shape == (4, 2, 4, 9)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate"])
def test_a_refiner_that_continues_the_image_paints_no_frame(padding_mode):
    """On a flat image every pixel sees the same neighbourhood, so any output difference between the
    border and the centre is the padding's: zero padding shows R black beyond the edge (a frame)."""
    torch.manual_seed(0)
    flat = torch.full((1, 1, 35, 55), 0.3)
    continued = Refiner(1, 8, 2, padding_mode=padding_mode)
    zeros = Refiner(1, 8, 2, padding_mode="zeros")
    zeros.load_state_dict(continued.state_dict())  # same weights: only the padding differs
    assert torch.allclose(continued(flat), continued(flat)[0, 0, 17, 27], atol=1e-6)
    framed = zeros(flat)[0, 0]
    assert (framed[0] - framed[17, 27]).abs().max() > 1e-3


def test_refiner_padding_comes_from_the_config_and_is_checked():
    from simgan_dist.config import ConfigError

    assert build_refiner(load_config("eye").model).stem[0].padding_mode == "reflect"
    refiner = build_refiner(load_config("eye", overrides=["model.refiner_padding=zeros"]).model)
    assert all(m.padding_mode == "zeros" for m in refiner.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ConfigError, match="model.refiner_padding: 'mirror' is not one of"):
        load_config("eye", overrides=["model.refiner_padding=mirror"])
