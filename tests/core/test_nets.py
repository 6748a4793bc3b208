import time

import pytest
import torch

from oftsr.flow import conditioned
from oftsr.nets import build_unet, count_parameters, load_weights, save_weights, widen_input_conv
from oftsr.nets.blocks import attention_legacy, attention_sdpa
from tests.helpers import perturbed_unet


@pytest.mark.parametrize(("preset", "expected", "rel"), [("ffhq", 93.57e6, 0.002), ("imagenet", 552.8e6, 0.005)])
def test_large_presets_have_the_published_parameter_counts_and_build_fast_on_meta(preset, expected, rel):
    start = time.perf_counter()
    net = build_unet(preset, device="meta")
    assert time.perf_counter() - start < 10
    assert abs(count_parameters(net) - expected) / expected < rel
    assert next(net.parameters()).device.type == "meta"


def test_tiny_preset_is_small_and_takes_six_channels():
    net = build_unet("tiny")
    assert count_parameters(net) < 2e6
    assert net.input_blocks[0][0].in_channels == 6
    assert net.downsample_factor == 4


def perturbed_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return perturbed_unet(0.05, **kw)


def test_tiny_forward_and_backward():
    net = build_unet("tiny")
    x = torch.randn(2, 6, 32, 32)
    out = net(x, torch.tensor([10.0, 500.0]))
    assert out.shape == (2, 6, 32, 32)
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution
    net = perturbed_tiny()
    v = conditioned(net, torch.randn(2, 3, 32, 32))(torch.randn(2, 3, 32, 32), torch.rand(2))
    v.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_input_size_must_be_a_multiple_of_the_downsampling():
    with pytest.raises(ValueError, match="multiple of 4"):
        build_unet("tiny")(torch.randn(1, 6, 30, 32), torch.zeros(1))


def test_sdpa_attention_equals_the_legacy_einsum():
    qkv = torch.randn(2, 3 * 64, 49)
    assert torch.allclose(attention_sdpa(qkv, 2), attention_legacy(qkv, 2), atol=1e-5)
    legacy = perturbed_tiny(3).eval()
    sdpa = build_unet("tiny", attention="sdpa").eval()
    sdpa.load_state_dict(legacy.state_dict())
    x, t = torch.randn(2, 6, 32, 32), torch.rand(2) * 999
    with torch.no_grad():
        assert torch.allclose(sdpa(x, t), legacy(x, t), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"use_scale_shift_norm": False}, {"resblock_updown": False}])
def test_fused_norm_and_silu_equal_the_module_chain(kw):
    import copy

    from oftsr.nets.blocks import GroupNormSiLU, fuse_norm_act

    plain = perturbed_tiny(4, **kw).eval()
    fused = fuse_norm_act(copy.deepcopy(plain))
    assert any(isinstance(m, GroupNormSiLU) for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    x, t = torch.randn(2, 6, 32, 32), torch.rand(2) * 999
    with torch.no_grad():
        reference = plain(x, t)
        assert torch.allclose(fused(x, t), reference, atol=1e-5)
        # bf16 autocast: one rounding instead of three, so at least as close to fp32 as the module chain
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err_plain = (plain(x, t).float() - reference).abs().mean()
            err_fused = (fused(x, t).float() - reference).abs().mean()
    assert err_fused <= 1.1 * err_plain, (err_fused, err_plain)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_from_local_files(tmp_path, suffix):
    net = perturbed_tiny(1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"ema": {f"module.{k}": v for k, v in net.state_dict().items()}, "step": 3}, path)
    else:
        save_weights(net, path)
    other = load_weights(build_unet("tiny"), path)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_pretrained_three_channel_weights_widen_to_start_exactly_as_pretrained(tmp_path):
    pre = perturbed_tiny(2, in_channels=3).eval()
    save_weights(pre, tmp_path / "adm.safetensors")
    net = load_weights(build_unet("tiny"), tmp_path / "adm.safetensors").eval()
    x, cond, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.rand(2) * 999
    with torch.no_grad():
        assert torch.allclose(net(torch.cat([x, cond], 1), t), pre(x, t), atol=1e-6)
    assert widen_input_conv({"a": torch.zeros(1)}, 6) == {"a": torch.zeros(1)}


def test_bad_weight_files_are_refused_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_weights(build_unet("tiny"), tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        load_weights(build_unet("tiny"), bad)
    other = tmp_path / "other.safetensors"
    save_weights(build_unet("tiny", model_channels=64), other)
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(build_unet("tiny"), other)


class Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_objects_are_not_loaded(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Evil()}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt"):
        load_weights(build_unet("tiny"), evil)


def test_unknown_overrides_and_presets_are_refused():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("huge")
    with pytest.raises(ValueError, match="channels_mult"):
        build_unet("tiny", channels_mult=(1,))
    with pytest.raises(ValueError, match="model_channels"):
        build_unet("tiny", model_channels=40)
