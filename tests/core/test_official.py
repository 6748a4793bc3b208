"""Official OFTSR checkpoints: the equivalence of our network with the official one, proven from the official
configuration alone, and the reading of their files (:mod:`oftsr.nets.official`).

The reference below is written from the official code's construction rules (guided-diffusion's ``UNetModel`` as
the official model factory builds it: ``learn_sigma``, 64-channel heads, scale-shift norm, residual up/down
blocks, the 6-channel input convolution of ``change_input_conv``): it lists the parameters under the official key
names, in the order in which the official modules register them (the order of the EMA's ``shadow_params``), and
runs the forward pass as plain functions of those tensors. Nothing of our :class:`oftsr.nets.UNet` is used in it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oftsr.nets import UNet, preset_config
from oftsr.nets.official import (
    OFFICIAL_NETWORKS,
    method_from_checkpoint_name,
    official_state_dict,
    read_official_checkpoint,
    unet_config_from_official,
)

# ---------------------------------------------------------------- reference, from the official configuration


def _settings(network: dict) -> dict:
    size = network["img_size"]
    return {
        "ch": network["num_channels"],
        "mult": [int(m) for m in network["channel_mult"].split(",")],
        "nrb": network["num_res_blocks"],
        "attn_ds": {size // int(r) for r in network["attention_resolutions"].split(",")},
        "cin": 2 * network["in_channels"],  # change_input_conv with use_cond
        "cout": 2 * network["out_channels"],  # learn_sigma
    }


def official_parameters(network: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``[(official key, shape), ...]`` in the official modules' registration order."""
    s = _settings(network)
    ch, emb = s["ch"], 4 * s["ch"]
    out: list[tuple[str, tuple[int, ...]]] = []

    def conv(prefix, cin, cout, k=3):
        out.extend([(f"{prefix}.weight", (cout, cin, k, k)), (f"{prefix}.bias", (cout,))])

    def vec(prefix, c):
        out.extend([(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))])

    def resblock(prefix, cin, cout):
        vec(f"{prefix}.in_layers.0", cin)
        conv(f"{prefix}.in_layers.2", cin, cout)
        out.extend([(f"{prefix}.emb_layers.1.weight", (2 * cout, emb)), (f"{prefix}.emb_layers.1.bias", (2 * cout,))])
        vec(f"{prefix}.out_layers.0", cout)
        conv(f"{prefix}.out_layers.3", cout, cout)
        if cin != cout:
            conv(f"{prefix}.skip_connection", cin, cout, 1)

    def attention(prefix, c):
        vec(f"{prefix}.norm", c)
        out.extend([(f"{prefix}.qkv.weight", (3 * c, c, 1)), (f"{prefix}.qkv.bias", (3 * c,))])
        out.extend([(f"{prefix}.proj_out.weight", (c, c, 1)), (f"{prefix}.proj_out.bias", (c,))])

    out.extend([("time_embed.0.weight", (emb, ch)), ("time_embed.0.bias", (emb,))])
    out.extend([("time_embed.2.weight", (emb, emb)), ("time_embed.2.bias", (emb,))])
    conv("input_blocks.0.0", s["cin"], ch)
    chans, cur, ds, i = [ch], ch, 1, 1
    for level, m in enumerate(s["mult"]):
        for _ in range(s["nrb"]):
            resblock(f"input_blocks.{i}.0", cur, m * ch)
            cur = m * ch
            if ds in s["attn_ds"]:
                attention(f"input_blocks.{i}.1", cur)
            chans.append(cur)
            i += 1
        if level != len(s["mult"]) - 1:
            resblock(f"input_blocks.{i}.0", cur, cur)
            chans.append(cur)
            ds, i = ds * 2, i + 1
    resblock("middle_block.0", cur, cur)
    attention("middle_block.1", cur)
    resblock("middle_block.2", cur, cur)
    i = 0
    for level, m in list(enumerate(s["mult"]))[::-1]:
        for j in range(s["nrb"] + 1):
            resblock(f"output_blocks.{i}.0", cur + chans.pop(), m * ch)
            cur, k = m * ch, 1
            if ds in s["attn_ds"]:
                attention(f"output_blocks.{i}.1", cur)
                k = 2
            if level and j == s["nrb"]:
                resblock(f"output_blocks.{i}.{k}", cur, cur)
                ds //= 2
            i += 1
    vec("out.0", cur)
    conv("out.2", ch, s["cout"])
    return out


def official_forward(p: dict[str, torch.Tensor], network: dict, x: torch.Tensor, timesteps: torch.Tensor):
    """The official ``UNetModel.forward`` (no input skip, no labels) as functions of the state dict ``p``."""
    s = _settings(network)

    def gn(h, prefix):
        return F.group_norm(h.float(), 32, p[f"{prefix}.weight"], p[f"{prefix}.bias"]).type(h.dtype)

    def conv(h, prefix, padding=1):
        return F.conv2d(h, p[f"{prefix}.weight"], p[f"{prefix}.bias"], padding=padding)

    def resblock(h, e, prefix, updown=None):
        a = F.silu(gn(h, f"{prefix}.in_layers.0"))
        if updown == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif updown == "up":
            a, h = (F.interpolate(v, scale_factor=2.0, mode="nearest") for v in (a, h))
        a = conv(a, f"{prefix}.in_layers.2")
        scale, shift = F.linear(F.silu(e), p[f"{prefix}.emb_layers.1.weight"], p[f"{prefix}.emb_layers.1.bias"])[
            :, :, None, None
        ].chunk(2, dim=1)
        a = gn(a, f"{prefix}.out_layers.0") * (1 + scale) + shift
        a = conv(F.silu(a), f"{prefix}.out_layers.3")
        skip = conv(h, f"{prefix}.skip_connection", 0) if f"{prefix}.skip_connection.weight" in p else h
        return skip + a

    def attention(h, prefix):
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(flat, f"{prefix}.norm"), p[f"{prefix}.qkv.weight"], p[f"{prefix}.qkv.bias"])
        heads = c // 64
        width = c // heads
        q, k, v = qkv.reshape(b * heads, 3 * width, -1).split(width, dim=1)
        scale = 1 / math.sqrt(math.sqrt(width))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        a = F.conv1d(a, p[f"{prefix}.proj_out.weight"], p[f"{prefix}.proj_out.bias"])
        return (flat + a).reshape(b, c, hh, ww)

    half = s["ch"] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    e = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    e = F.linear(
        F.silu(F.linear(e, p["time_embed.0.weight"], p["time_embed.0.bias"])),
        p["time_embed.2.weight"],
        p["time_embed.2.bias"],
    )
    h = conv(x, "input_blocks.0.0")
    hs, ds, i = [h], 1, 1
    for level, _ in enumerate(s["mult"]):
        for _ in range(s["nrb"]):
            h = resblock(h, e, f"input_blocks.{i}.0")
            if ds in s["attn_ds"]:
                h = attention(h, f"input_blocks.{i}.1")
            hs.append(h)
            i += 1
        if level != len(s["mult"]) - 1:
            h = resblock(h, e, f"input_blocks.{i}.0", "down")
            hs.append(h)
            ds, i = ds * 2, i + 1
    h = resblock(h, e, "middle_block.0")
    h = attention(h, "middle_block.1")
    h = resblock(h, e, "middle_block.2")
    i = 0
    for level, _ in list(enumerate(s["mult"]))[::-1]:
        for j in range(s["nrb"] + 1):
            h = resblock(torch.cat([h, hs.pop()], dim=1), e, f"output_blocks.{i}.0")
            k = 1
            if ds in s["attn_ds"]:
                h = attention(h, f"output_blocks.{i}.1")
                k = 2
            if level and j == s["nrb"]:
                h = resblock(h, e, f"output_blocks.{i}.{k}", "up")
                ds //= 2
            i += 1
    return conv(F.silu(gn(h, "out.0")), "out.2")


#: A reduced-size stand-in of the official configuration: every kind of block (two residual blocks per level,
#: attention at two levels with one and two heads, a 1x1 skip), small enough for a CPU test.
STAND_IN = {
    **OFFICIAL_NETWORKS["imagenet"],
    "img_size": 32,
    "num_channels": 64,
    "channel_mult": "1, 2, 2",
    "attention_resolutions": "16,8",
}


def random_official_weights(network: dict, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(k, 0.1 * torch.randn(shape, generator=g)) for k, shape in official_parameters(network)]


def save_official(path, weights, *, ema_only: bool = True) -> None:
    """A file as the official ``save_checkpoint`` writes it (the released files: ``ema_only``)."""
    ema = {"decay": 0.9999, "num_updates": 1234, "shadow_params": [v for _, v in weights]}
    obj = {"ema": ema, "step": 20_000}
    if not ema_only:  # the resume file: the DDP-wrapped model's state dict and the optimizer's too
        obj["model"] = {f"module.{k}": v + 1.0 for k, v in weights}
        obj["optimizer"] = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(weights)))}]}
    torch.save(obj, path)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("task", sorted(OFFICIAL_NETWORKS))
def test_the_official_networks_have_our_presets_names_shapes_and_parameter_order(task):
    cfg = unet_config_from_official(OFFICIAL_NETWORKS[task])
    assert cfg == preset_config("imagenet" if task == "imagenet" else "ffhq")
    with torch.device("meta"):
        ours = [(k, tuple(v.shape)) for k, v in UNet(cfg).named_parameters()]
    assert ours == official_parameters(OFFICIAL_NETWORKS[task])


def test_an_imported_network_computes_what_the_official_forward_computes(tmp_path):
    weights = random_official_weights(STAND_IN)
    save_official(tmp_path / "ckpt.pth", weights)
    net = UNet(unet_config_from_official(STAND_IN)).eval()
    net.load_state_dict(official_state_dict(read_official_checkpoint(tmp_path / "ckpt.pth"), net))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 32, 32, generator=g)
    t = torch.tensor([0.3, 0.9]) * 999
    with torch.no_grad():
        ours = net(x, t)
        theirs = official_forward(dict(weights), STAND_IN, x, t)
    assert ours.shape == (2, 6, 32, 32)
    assert theirs.abs().mean() > 0.05  # random weights: a non-trivial output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the check can fail: two neighbours of the same shape swapped in the EMA list (a norm's weight and bias) still
    # load, and the output is no longer the official one
    names = [k for k, _ in weights]
    i = names.index("middle_block.1.norm.weight")
    swapped = list(weights)
    swapped[i], swapped[i + 1] = (names[i], weights[i + 1][1]), (names[i + 1], weights[i][1])
    save_official(tmp_path / "swapped.pth", swapped)
    net.load_state_dict(official_state_dict(read_official_checkpoint(tmp_path / "swapped.pth"), net))
    with torch.no_grad():
        assert (net(x, t) - theirs).abs().max() > 1e-2


def test_the_raw_weights_of_a_resume_file_are_read_without_their_wrapper_prefixes(tmp_path):
    weights = random_official_weights(STAND_IN)
    save_official(tmp_path / "meta.pth", weights, ema_only=False)
    net = UNet(unet_config_from_official(STAND_IN))
    ckpt = read_official_checkpoint(tmp_path / "meta.pth")
    raw = official_state_dict(ckpt, net, raw=True)
    ema = official_state_dict(ckpt, net)
    key = "middle_block.1.qkv.weight"
    torch.testing.assert_close(raw[key], dict(weights)[key] + 1.0)
    torch.testing.assert_close(ema[key], dict(weights)[key])
    # compiled and wrapped: module._orig_mod.
    ckpt["model"] = {k.replace("module.", "module._orig_mod.", 1): v for k, v in ckpt["model"].items()}
    assert official_state_dict(ckpt, net, raw=True).keys() == raw.keys()


def test_files_that_do_not_fit_are_refused_naming_what_is_wrong(tmp_path):
    net = UNet(unet_config_from_official(STAND_IN))
    weights = random_official_weights(STAND_IN)
    n = len(weights)

    save_official(tmp_path / "short.pth", weights[:-1])
    with pytest.raises(ValueError, match=f"'ema' holds {n - 1} tensors, the network has {n} parameters"):
        official_state_dict(read_official_checkpoint(tmp_path / "short.pth"), net, where="short.pth")

    wrong = list(weights)
    wrong[5] = (wrong[5][0], torch.zeros(3, 3))
    save_official(tmp_path / "shape.pth", wrong)
    name = list(dict(net.named_parameters()))[5]
    with pytest.raises(ValueError, match=rf"EMA tensor 5 \({name}\) has shape \(3, 3\)"):
        official_state_dict(read_official_checkpoint(tmp_path / "shape.pth"), net)

    # the weights of a narrower network: the first tensor that differs is named
    big = UNet(unet_config_from_official({**STAND_IN, "num_channels": 96}))
    save_official(tmp_path / "good.pth", weights)
    with pytest.raises(ValueError, match=r"EMA tensor 0 \(time_embed.0.weight\) has shape \(256, 64\)"):
        official_state_dict(read_official_checkpoint(tmp_path / "good.pth"), big)

    torch.save({"model": {}, "step": 1}, tmp_path / "noema.pth")
    with pytest.raises(ValueError, match="no 'ema' entry with a 'shadow_params' list"):
        official_state_dict(read_official_checkpoint(tmp_path / "noema.pth"), net)

    save_official(tmp_path / "ema_only.pth", weights)
    with pytest.raises(ValueError, match=r"no 'model' state dict .* import without --raw"):
        official_state_dict(read_official_checkpoint(tmp_path / "ema_only.pth"), net, raw=True)

    save_official(tmp_path / "meta.pth", weights, ema_only=False)
    ckpt = read_official_checkpoint(tmp_path / "meta.pth")
    ckpt["model"]["module.extra.weight"] = torch.zeros(1)
    del ckpt["model"]["module.out.2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['out.2.bias'\] and unexpected keys \['extra.weight'\]"):
        official_state_dict(ckpt, net, raw=True)


class _NotAllowed:
    """Anything but tensors and plain containers: the weights-only unpickler refuses it."""


def test_a_pickle_that_weights_only_refuses_and_a_non_torch_file_are_refused_naming_the_file(tmp_path):
    torch.save({"ema": _NotAllowed(), "step": 1}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil.pth: cannot be read as a weights-only checkpoint"):
        read_official_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk.pth: cannot be read as a weights-only checkpoint"):
        read_official_checkpoint(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not the official checkpoint dict"):
        read_official_checkpoint(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        read_official_checkpoint(tmp_path / "missing.pth")


#: The released files' names, as the official README gives them, and what each says.
RELEASED = {
    "sr_bicubic-sf4-guided_unet-sigma0.1-bs32-loss_l1-lr0.0001-FFHQ-checkpoint_10.pth": (
        "teacher",
        "ffhq_x4",
        0.1,
        0.0,
    ),
    "sr_bicubic-sf4-guided_unet-sigma0.1-bs32-loss_l1-lr1e-05-distil-v_boot-solver_rk2_0.5-dt0.05-w_distil_1.0-"
    "w_bound_0.1-w_align_0.01-FFHQ_DIS-checkpoint_2.pth": ("student", "ffhq_x4", 0.1, 0.0),
    "sr_avp-sf4-sigmay_0.05-guided_unet-sigma0.5-bs128-loss_l1-lr0.0001-FFHQ-checkpoint_23.pth": (
        "teacher",
        "ffhq_x4_noisy",
        0.5,
        0.05,
    ),
    "sr_avp-sf4-sigmay_0.05-guided_unet-sigma0.5-bs32-loss_l1-lr2e-05-distil-v_boot-solver_rk2_0.5-dt0.05-"
    "w_distil_1.0-w_bound_0.1-w_align_0.01-FFHQ_DIS-checkpoint_24.pth": ("student", "ffhq_x4_noisy", 0.5, 0.05),
    "sr_bicubic-sf4-guided_unet-sigma0.2-bs128-loss_l1-lr1e-05-DIV2K-checkpoint_4.pth": (
        "teacher",
        "div2k_x4",
        0.2,
        0.0,
    ),
    "sr_bicubic-sf4-guided_unet-sigma0.2-bs32-loss_l1-lr1e-05-distil-v_boot-solver_rk2_0.5-dt0.05-w_distil_1.0-"
    "w_bound_0.1-w_align_0.01-DIV2K_DIS-checkpoint_5.pth": ("student", "div2k_x4", 0.2, 0.0),
    "sr_bicubic-sf4-guided_unet-sigma0.2-bs32-loss_l1-lr1e-04-ImageNet-checkpoint_10.pth": (
        "teacher",
        "imagenet_x4",
        0.2,
        0.0,
    ),
    "sr_bicubic-sf4-guided_unet-sigma0.2-bs8-loss_l1-lr1e-04-distil-v_boot-solver_rk2_0.5-dt0.05-w_distil_1.0-"
    "w_bound_0.1-w_align_0.01-ImageNet_DIS-checkpoint_10.pth": ("student", "imagenet_x4", 0.2, 0.0),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_released_file_names_say_kind_task_and_method(name):
    kind, recipe, sigma_p, sigma_y = RELEASED[name]
    said = method_from_checkpoint_name(name)
    assert (said["kind"], said["recipe"], said["sigma_p"], said["sigma_y"], said["sf"]) == (
        kind,
        recipe,
        sigma_p,
        sigma_y,
        4,
    )
    assert said["degradation"] == ("avgpool" if "sr_avp" in name else "bicubic")
    assert method_from_checkpoint_name("my_teacher.pth") == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_input_skip", True),
        ("use_group_norm", False),
        ("use_attention", False),
        ("use_cond", False),
        ("model_arch", "diffuser"),
        ("num_classes", 1000),
        ("channel_mult", "0.5, 1, 1, 2, 2, 4, 4"),
    ],
)
def test_official_switches_our_network_does_not_have_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        unet_config_from_official({**OFFICIAL_NETWORKS["ffhq"], field: value})
