"""Losses against an analytic teacher ``v(x, t) = -w x`` (w = 1), whose trajectories are ``x(t) = x0 e^{-t}``
and whose average velocity from the start is ``u(t) = x0 f(t)`` with ``f(t) = (e^{-t} - 1) / t``."""

import math

import pytest
import torch
from torch import nn

from oftsr.flow import interpolate
from oftsr.losses import distill_cached, distill_online, sample_distill_times, teacher_loss

DT, TM = 0.05, 0.01


def f(t):
    return (torch.exp(-t) - 1.0) / t


class AnalyticTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x, t):
        return -self.w * x


class ScaledAverageStudent(nn.Module):
    """``v_phi(x0, t) = a x0 f(t)``: the teacher's exact average velocity when ``a = 1``."""

    def __init__(self, a=1.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x * f(t.to(x.dtype)).view(-1, 1, 1, 1)


def expected_terms(x0, t, a):
    """Closed-form per-sample terms and d(term)/da for the analytic pair (midpoint teacher step)."""
    s = torch.clamp(t + DT, max=0.99)
    d = s - t
    col = lambda z: z.view(-1, 1, 1, 1)  # noqa: E731
    vt, vs, vb = a * x0 * col(f(t)), a * x0 * col(f(s)), a * x0 * f(torch.tensor(TM, dtype=x0.dtype))
    xt = x0 + col(t) * vt
    vbar = -xt * col(1 - d / 2)  # RK2 on a linear field, any r
    target = vt + col(d / s) * (vbar - vt)
    m = lambda z: z.flatten(1).mean(1)  # noqa: E731
    terms = {
        "distil": m((vs - target) ** 2),
        "align": (1 - t) ** 2 * m((vt - vbar) ** 2),
        "bound": m((vb + x0) ** 2),
    }
    grads = {  # gradients only through vs, vt and the boundary call respectively
        "distil": m(2 * (vs - target) * x0 * col(f(s))).sum(),
        "align": ((1 - t) ** 2 * m(2 * (vt - vbar) * x0 * col(f(t)))).sum(),
        "bound": m(2 * (vb + x0) * x0 * f(torch.tensor(TM, dtype=x0.dtype))).sum(),
    }
    return terms, grads


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.7, 0.99], dtype=torch.float64)
    return x0, t


def test_exact_average_velocity_student_gets_the_closed_form_terms(batch):
    x0, t = batch
    out = distill_online(ScaledAverageStudent(1.0), AnalyticTeacher(), x0, t, dt=DT)
    exp, _ = expected_terms(x0, t, 1.0)
    for k in ("distil", "align", "bound"):
        assert out[k].shape == (4,)
        assert torch.allclose(out[k], exp[k], rtol=1e-9, atol=1e-15), k
    # the student lies on the teacher's trajectory: only the third-order midpoint error is left
    d = torch.clamp(t + DT, max=0.99) - t
    assert (out["distil"] <= (x0.square().flatten(1).mean(1) * (d**3 / 6) ** 2 / (t + d) ** 2) * 1.01).all()
    assert (out["align"][:3] > 1e-4).all() and (out["bound"] > 1e-6).all()
    assert torch.allclose(out["total"], out["distil"] + 0.1 * out["bound"] + 0.01 * out["align"])


def test_a_perturbed_student_scores_worse(batch):
    x0, t = batch
    exact = distill_online(ScaledAverageStudent(1.0), AnalyticTeacher(), x0, t)
    off = distill_online(ScaledAverageStudent(1.2), AnalyticTeacher(), x0, t)
    assert off["distil"].mean() > 100 * exact["distil"].mean()
    assert off["total"].mean() > exact["total"].mean()


def test_gradients_flow_only_through_the_stated_terms_and_never_to_the_teacher(batch):
    x0, t = batch
    a = 1.3
    _, exp_grads = expected_terms(x0, t, a)
    for name in ("distil", "align", "bound"):
        student, teacher = ScaledAverageStudent(a), AnalyticTeacher()
        out = distill_online(student, teacher, x0, t, dt=DT)
        out[name].sum().backward()
        assert torch.allclose(student.a.grad, exp_grads[name], rtol=1e-9), name
        assert teacher.w.grad is None


def test_s_is_clipped_at_t_max_and_times_are_validated():
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = distill_online(ScaledAverageStudent(1.0), AnalyticTeacher(), x0, torch.tensor([0.99, 0.99]))
    assert torch.allclose(out["distil"], torch.zeros(2, dtype=torch.float64))  # s = t: target is vt itself
    with pytest.raises(ValueError, match=r"\[0.01, 0.99\]"):
        distill_online(ScaledAverageStudent(), AnalyticTeacher(), x0, torch.tensor([0.0, 0.5]))


def test_cached_loss_is_zero_for_the_exact_student_and_uses_stored_targets(batch):
    x0, t = batch
    col = lambda z: z.view(-1, 1, 1, 1)  # noqa: E731
    u_bar = x0 * col(f(t))
    state = x0 + col(t) * u_bar
    v_bar, v_bound = -state, -x0
    out = distill_cached(ScaledAverageStudent(1.0), x0, t, u_bar, v_bar, v_bound)
    assert torch.allclose(out["distil"], torch.zeros(4, dtype=torch.float64), atol=1e-20)
    assert torch.allclose(out["align"], (1 - t) ** 2 * (u_bar - v_bar).square().flatten(1).mean(1))
    assert torch.allclose(out["bound"], (x0 * f(torch.tensor(TM, dtype=x0.dtype)) + x0).square().flatten(1).mean(1))
    worse = distill_cached(ScaledAverageStudent(0.8), x0, t, u_bar, v_bar, v_bound)
    assert worse["distil"].mean() > 1e-4


def test_teacher_loss_is_l1_of_the_velocity_error_per_sample():
    x0, x1 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    t = torch.tensor([0.2, 0.8])
    perfect = lambda x, tt: x1 - x0  # noqa: E731
    assert torch.equal(teacher_loss(perfect, x0, x1, t), torch.zeros(2))
    seen = []

    def zero(x, tt):
        seen.append(x)
        return torch.zeros_like(x)

    assert torch.allclose(teacher_loss(zero, x0, x1, t), torch.ones(2))
    assert torch.allclose(seen[0], interpolate(x0, x1, t))
    assert torch.allclose(teacher_loss(lambda x, tt: 3 * (x1 - x0), x0, x1, t, kind="l2"), torch.full((2,), 4.0))


def test_distill_times_are_uniform_in_range():
    t = sample_distill_times(10000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.01 and t.max() <= 0.99 and abs(t.mean().item() - 0.5) < 0.01
    assert math.isclose(t.var().item(), 0.98**2 / 12, rel_tol=0.05)
