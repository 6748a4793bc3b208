"""Solvers against fields whose ODE solution is known in closed form."""

import math

import pytest
import torch

from oftsr.solvers import METHODS, solve

X0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
T0, T1 = 1e-3, 1.0


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)
        return self.fn(x, t)


def constant(x, t):
    return torch.full_like(x, 0.7)


def linear(x, t, a=-2.0):
    return a * x


def time_dependent(x, t):  # dx/dt = cos(2 pi t) x  ->  x(t) = x0 exp((sin 2 pi t - sin 2 pi t0) / 2 pi)
    return torch.cos(2 * math.pi * t).view(-1, 1).to(x.dtype) * x


def exact_linear(a=-2.0):
    return X0 * math.exp(a * (T1 - T0))


def exact_time_dependent():
    return X0 * math.exp((math.sin(2 * math.pi * T1) - math.sin(2 * math.pi * T0)) / (2 * math.pi))


@pytest.mark.parametrize("method", METHODS)
def test_constant_field_is_integrated_exactly(method):
    sol = solve(constant, X0, method=method, steps=7)
    assert torch.allclose(sol.x, X0 + 0.7 * (T1 - T0), atol=1e-12)


@pytest.mark.parametrize(
    ("method", "steps", "tol"),
    [("euler", 200, 1e-2), ("midpoint", 50, 2e-4), ("heun", 50, 2e-4), ("rk2", 50, 2e-4), ("rk45", None, 5e-5)],
)
@pytest.mark.parametrize(("field", "exact"), [(linear, exact_linear), (time_dependent, exact_time_dependent)])
def test_solvers_match_closed_form_solutions(method, steps, tol, field, exact):
    sol = solve(field, X0, method=method, steps=steps, r=0.75, rtol=1e-6, atol=1e-6)
    err = (sol.x - exact()).abs().max().item()
    assert err < tol, f"{method}: error {err}"


def test_second_order_methods_converge_at_second_order():
    errs = [(solve(linear, X0, method="midpoint", steps=n).x - exact_linear()).abs().max().item() for n in (10, 20)]
    assert 3.5 < errs[0] / errs[1] < 4.5


def test_nfe_is_counted_exactly():
    for method, steps, per_step in (("euler", 9, 1), ("midpoint", 9, 2), ("heun", 4, 2)):
        field = Counting(linear)
        assert solve(field, X0, method=method, steps=steps).nfe == field.calls == steps * per_step
    field = Counting(time_dependent)
    assert solve(field, X0, method="rk45").nfe == field.calls


def test_rk45_reaches_rtol_with_fewer_evaluations_than_euler():
    sol = solve(linear, X0, method="rk45", rtol=1e-3, atol=1e-3)
    err45 = (sol.x - exact_linear()).abs().max().item()
    assert err45 < 1e-3 * 2
    steps = 1
    while (solve(linear, X0, method="euler", steps=steps).x - exact_linear()).abs().max().item() > err45:
        steps *= 2
    assert sol.nfe < steps, (sol.nfe, steps)


def test_intermediates_on_a_time_grid():
    grid = [0.01, 0.05, 0.5, 0.99]
    for method in ("midpoint", "rk45"):
        sol = solve(
            linear, X0, method=method, steps=20, time_grid=grid, return_intermediates=True, rtol=1e-7, atol=1e-7
        )
        assert sol.states.shape == (4, 1, 3)
        assert torch.allclose(sol.times.double(), torch.tensor(grid, dtype=torch.float64))
        expected = torch.stack([X0 * math.exp(-2.0 * (t - 0.01)) for t in grid])
        tol = 1e-3 if method == "midpoint" else 1e-5
        assert torch.allclose(sol.states, expected, atol=tol), method
        if method == "midpoint":
            assert sol.nfe == 3 * 20 * 2


def test_equal_steps_intermediates_start_with_x0():
    sol = solve(linear, X0, method="euler", steps=4, return_intermediates=True)
    assert sol.states.shape == (5, 1, 3) and torch.equal(sol.states[0], X0) and torch.equal(sol.states[-1], sol.x)


def test_rk45_shares_one_step_size_and_each_sample_meets_tolerance():
    x0 = torch.tensor([[1.0], [100.0]], dtype=torch.float64)
    sol = solve(lambda x, t: -5.0 * x, x0, method="rk45", rtol=1e-4, atol=1e-6)
    exact = x0 * math.exp(-5.0 * (T1 - T0))
    rel = ((sol.x - exact).abs() / exact.abs()).max().item()
    assert rel < 1e-3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown solver"):
        solve(linear, X0, method="dopri8", steps=3)
    with pytest.raises(ValueError, match="steps"):
        solve(linear, X0, method="euler")
    with pytest.raises(ValueError, match="strictly increasing"):
        solve(linear, X0, method="euler", time_grid=[0.5, 0.2])
    with pytest.raises(ValueError, match=r"r must lie in \(0, 1\]"):
        solve(linear, X0, method="rk2", steps=2, r=0.0)
