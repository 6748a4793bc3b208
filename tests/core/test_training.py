import torch

from oftsr.degrade import degrade
from oftsr.ema import EMA
from oftsr.nets import build_unet
from oftsr.training import OptimConfig, distill_step, lr_at, make_optimizer, teacher_step
from tests.helpers import perturbed_unet


def test_tiny_teacher_overfits_a_handful_of_crops():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # four smooth-ish crops (random low-frequency patterns), 32x32
    hr = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, size=32, mode="bicubic")
    hr = hr.clamp(-1, 1)
    _, x_lr = degrade(hr, 4)
    net = build_unet("tiny", image_size=32)
    cfg = OptimConfig(lr=2e-3, warmup_images=40)
    opt = make_optimizer(net.parameters(), cfg)
    ema = EMA(net, half_life_images=200)
    losses = []
    for step in range(250):
        out = teacher_step(net, opt, hr, x_lr, sigma_p=0.2, lr=lr_at(step * 4, cfg), generator=g)
        ema.update(net, 4)
        losses.append(float(out["loss"]))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


def test_distill_step_trains_the_student_and_leaves_the_teacher_untouched():
    torch.manual_seed(0)
    teacher = perturbed_unet(0.02, image_size=32)
    teacher.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_unet("tiny", image_size=32)
    student.load_state_dict(teacher.state_dict())
    student.requires_grad_(True)
    opt = make_optimizer(student.parameters(), OptimConfig(lr=1e-3, warmup_images=0))
    x_lr = degrade(torch.rand(2, 3, 32, 32) * 2 - 1, 4)[1]
    out = distill_step(student, teacher, opt, x_lr, sigma_p=0.2, lr=1e-3)
    assert set(out) == {"distil", "align", "bound", "total", "grad_norm"}
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_learning_rate_warms_up_linearly_in_images():
    cfg = OptimConfig(lr=1e-4, warmup_images=1000)
    assert lr_at(0, cfg) == 1e-4 / 1000
    assert abs(lr_at(499, cfg) - 5e-5) < 1e-12
    assert lr_at(5000, cfg) == 1e-4
