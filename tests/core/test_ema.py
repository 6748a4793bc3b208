import pytest
import torch
from torch import nn

from oftsr.ema import EMA, half_life_from_decay


def test_decay_is_a_half_life_in_images_independent_of_batch_size():
    for batch in (8, 32):
        model = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(model.weight)
        ema = EMA(model, half_life_images=256, warmup=False)
        nn.init.ones_(model.weight)
        for _ in range(256 // batch):
            ema.update(model, batch)
        assert ema.module.weight.item() == pytest.approx(0.5, abs=1e-6)


def test_warmup_caps_the_decay_early():
    model = nn.Linear(1, 1)
    ema = EMA(model, half_life_images=1e9)
    assert ema.decay(32) == pytest.approx(0.1)
    ema.num_updates = 90
    assert ema.decay(32) == pytest.approx(91 / 100)


def test_state_round_trip_and_paper_equivalence():
    model = nn.Linear(2, 2)
    ema = EMA(model, 100)
    ema.update(model, 10)
    other = EMA(nn.Linear(2, 2), 100)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.module.weight, ema.module.weight)
    assert half_life_from_decay(0.9999, 32) == pytest.approx(221_803, rel=1e-3)
    with pytest.raises(ValueError, match="half-life"):
        EMA(model, 0)
