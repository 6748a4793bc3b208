import math

import pytest
import torch

from oftsr.flow import conditioned, noise_from_seed, noisy_start
from tests.helpers import RecordingNet


def test_noisy_start_has_the_stated_mean_and_std():
    x_lr = torch.full((16, 3, 64, 64), 0.5)
    x0 = noisy_start(x_lr, 0.2, torch.Generator().manual_seed(0))
    assert abs(x0.mean().item() - math.sqrt(1 - 0.04) * 0.5) < 2e-3
    assert abs(x0.std().item() - 0.2) < 2e-3


def test_noisy_start_without_noise_is_the_condition():
    x_lr = torch.rand(2, 3, 8, 8)
    assert torch.equal(noisy_start(x_lr, 0.0), x_lr)
    with pytest.raises(ValueError, match="sigma_p"):
        noisy_start(x_lr, 1.5)


def test_noise_from_seed_is_reproducible_and_per_sample():
    a = noise_from_seed((3, 8, 8), 7)
    assert torch.equal(a, noise_from_seed((3, 8, 8), 7))
    assert not torch.equal(a, noise_from_seed((3, 8, 8), 8))
    assert torch.equal(a, torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7)))
    batch = noise_from_seed((3, 8, 8), [8, 7])
    assert batch.shape == (2, 3, 8, 8) and torch.equal(batch[1], a)
    assert noise_from_seed((2,), 1, dtype=torch.float16).dtype == torch.float16


def test_noisy_start_uses_given_noise():
    x_lr = torch.zeros(1, 3, 4, 4)
    eps = noise_from_seed((1, 3, 4, 4), 0)
    assert torch.allclose(noisy_start(x_lr, 0.5, noise=eps), 0.5 * eps)


def test_conditioned_tiles_the_condition_for_stacked_batches():
    net = RecordingNet()
    x_lr = torch.randn(2, 3, 4, 4)
    conditioned(net, x_lr)(torch.randn(6, 3, 4, 4), torch.rand(6))
    inp, _ = net.calls[0]
    assert torch.equal(inp[4:, 3:], x_lr)
    with pytest.raises(ValueError, match="multiple of the condition batch"):
        conditioned(net, x_lr)(torch.randn(3, 3, 4, 4), 0.5)
