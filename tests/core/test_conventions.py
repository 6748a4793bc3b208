import torch

from oftsr.conventions import TIME_SCALE, from_unit, image_to_uint8, to_unit, uint8_to_image
from oftsr.flow import conditioned, interpolate
from tests.helpers import RecordingNet


def test_time_zero_is_noisy_lr_and_time_one_is_hr():
    x0, x1 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, x1, 0.0), x0)
    assert torch.equal(interpolate(x0, x1, 1.0), x1)
    assert torch.allclose(interpolate(x0, x1, torch.tensor([0.25, 0.75])).mean((1, 2, 3)), torch.tensor([0.25, 0.75]))


def test_network_call_concatenates_condition_scales_time_and_keeps_three_channels():
    net = RecordingNet()
    x, x_lr = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    v = conditioned(net, x_lr)(x, torch.tensor([0.5, 1.0]))
    ((inp, t),) = net.calls
    assert TIME_SCALE == 999.0
    assert inp.shape == (2, 6, 4, 4) and torch.equal(inp[:, :3], x) and torch.equal(inp[:, 3:], x_lr)
    assert torch.allclose(t, torch.tensor([499.5, 999.0]))
    assert v.shape == (2, 3, 4, 4) and torch.equal(v[:, :, 0, 0], torch.tensor([[0.0, 1.0, 2.0]] * 2))


def test_ranges_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    img = uint8_to_image(u8)
    assert img.min() == -1.0 and img.max() == 1.0
    assert torch.equal(image_to_uint8(img), u8)
    assert torch.allclose(from_unit(to_unit(img)), img)
