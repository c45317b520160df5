"""Flow-matching math against cases whose answer is known in closed form."""

import pytest
import torch

from flgcore import flow
from flgcore.models import Cond, probe_inputs, tiny_model, velocity, velocity_cfg

M, A = 1.5, 0.5  # data x0 ~ N(M, A^2): the probability-flow ODE is affine and solvable exactly


def gaussian_velocity(x, s):
    """Exact marginal velocity E[eps - x0 | x_s = x] for Gaussian data."""
    s = s.reshape(-1, *([1] * (x.dim() - 1))).double()
    var = (1 - s) ** 2 * A ** 2 + s ** 2
    return -M + (s - (1 - s) * A ** 2) / var * (x - (1 - s) * M)


def test_noising_and_estimates_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 4, 4, generator=g), torch.randn(4, 3, 2, 4, 4, generator=g)
    s = torch.rand(4, generator=g)
    xs = flow.add_noise(x0, eps, s)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(xs, s, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(xs, s, v), eps)


def test_euler_converges_at_first_order():
    x1 = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = M + A * x1  # the flow maps noise z to M + A z
    errs = [(flow.euler_sample(gaussian_velocity, x1, flow.euler_sigmas(n)) - exact).abs().max().item()
            for n in (8, 16, 32, 64)]
    ratios = [errs[i] / errs[i + 1] for i in range(3)]
    assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)


def test_shift_fixes_endpoints_and_is_monotone():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for k in (0.5, 1.0, 3.0, 5.0):
        out = flow.shift_sigma(s, k)
        assert out[0] == 0 and out[-1] == 1
        assert torch.all(out[1:] > out[:-1])
    torch.testing.assert_close(flow.shift_sigma(s, 1.0), s)
    with pytest.raises(ValueError):
        flow.shift_sigma(s, 0.0)


def test_euler_sigmas_grid():
    sig = flow.euler_sigmas(50, shift=3.0)
    assert len(sig) == 51 and sig[0] == 1 and sig[-1] == 0


def test_guidance_scale_one_is_the_conditional_model():
    m = tiny_model("wan-i2v")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 8, 8, generator=g)
    s = torch.tensor([0.3, 0.9])
    cond = Cond(text=torch.randn(2, 4, 16, generator=g), image=torch.randn(2, 4, 2, 8, 8, generator=g))
    null = cond.with_text(Cond(text=torch.zeros(2, 4, 16)))
    with torch.no_grad():
        v_c = velocity(m, x, s, cond)
        v_n = velocity(m, x, s, null)
        torch.testing.assert_close(velocity_cfg(m, x, s, cond, null, 1.0), v_c)
        torch.testing.assert_close(velocity_cfg(m, x, s, cond, null, 4.0), v_n + 4.0 * (v_c - v_n),
                                   rtol=1e-5, atol=1e-5)
    vc = lambda x, s: x * 2
    assert flow.guided(vc, lambda x, s: x, 1.0) is vc


def test_fewstep_sampler_with_exact_x0_predictor_returns_data():
    # a "student" that always predicts the same x0 must return it, whatever the re-noising
    target = torch.randn(3, 2, 4, 4)
    v_fn = lambda x, s: (x - target) / s.reshape(-1, 1, 1, 1)  # x0_hat = x - s v = target
    out = flow.fewstep_sample(v_fn, torch.randn(3, 2, 4, 4), [1.0, 0.75, 0.5, 0.25],
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target)


def test_nfe():
    assert flow.nfe(50, 5.0) == 100 and flow.nfe(4, 1.0) == 4


def test_x0_predicting_model_is_converted_to_velocity():
    m = tiny_model("wan-i2v")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 2, 8, 8, generator=g)
    s = torch.tensor([0.2, 0.7])
    cond = Cond(text=torch.randn(2, 4, 16, generator=g), image=torch.randn(2, 4, 2, 8, 8, generator=g))
    with torch.no_grad():
        raw = velocity(m, x, s, cond)  # default: the raw output is v
        m.flg_prediction = "x0"        # the same network read as an x0 predictor
        v = velocity(m, x, s, cond)
    torch.testing.assert_close(flow.x0_from_velocity(x, s, v), raw, rtol=1e-5, atol=1e-5)


def test_training_sigmas_are_never_zero(monkeypatch):
    from flgcore.flow import sample_sigmas
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real_rand(*a, **k)))  # the 1-in-2^24 draw
    s = sample_sigmas(4, 3.0, torch.Generator().manual_seed(0))
    assert (s > 0).all() and (s < 1e-6).all()
    model = tiny_model("wan-ti2v")  # frame 0 divides by s: (x - c) / s
    x, _, cond = probe_inputs(model, batch=4)
    cond.image = x.clone()
    x_s = flow.add_noise(x, torch.randn_like(x), s)
    assert torch.isfinite(velocity(model, x_s, s, cond)).all()
