"""Flow-matching math as pure tensor functions, in diffusers' Wan/HunyuanVideo convention.

    x_s = (1 - s) * x0 + s * eps,   s in [0, 1],   model timestep = 1000 * s,   v ~ eps - x0

The paper's Eq. 5 writes the target as x0 - x1; with its own Eq. 4 (x0 = x_t - t * v) that is a
sign slip, so we follow diffusers. Samplers take a `velocity(x, s) -> v` callable so that the same
code drives a diffusers transformer, a skip view of one, or an analytic field in the tests.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,...], s [B]) -> v [B,...]
TIMESTEP_SCALE = 1000.0  # diffusers' flow-matching models take t = 1000 * s


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample sigmas [B] (or a scalar) to broadcast against x [B, ...]."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.dim() > 0 else s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Forward process: x_s = (1 - s) x0 + s eps. x0, eps [B, ...]; s [B] in [0, 1]."""
    s = _bcast(s, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target d x_s / d s = eps - x0 (paper Eq. 1, diffusers sign)."""
    return eps - x0


def x0_from_velocity(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Tweedie / x0 estimate used in Eq. 4: x0_hat = x_s - s v."""
    return x_s - _bcast(s, x_s) * v


def eps_from_velocity(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Noise estimate: eps_hat = x_s + (1 - s) v."""
    return x_s + (1 - _bcast(s, x_s)) * v


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Timestep shift s' = k s / (1 + (k - 1) s); maps 0 -> 0, 1 -> 1, monotone for k > 0."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.as_tensor(s, dtype=torch.float64 if not torch.is_tensor(s) else s.dtype)
    return shift * s / (1 + (shift - 1) * s)


def euler_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The teacher's sampling grid: `steps + 1` shifted sigmas from 1 down to 0 (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def cfg_combine(v_cond: torch.Tensor, v_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_null + w (v_cond - v_null); w = 1 is the conditional model."""
    return v_null + scale * (v_cond - v_null)


def guided(velocity_cond: Velocity, velocity_null: Velocity | None, scale: float) -> Velocity:
    """Wrap a conditional / null velocity pair into one CFG velocity (scale 1 skips the null call)."""
    if scale == 1.0 or velocity_null is None:
        return velocity_cond
    return lambda x, s: cfg_combine(velocity_cond(x, s), velocity_null(x, s), scale)


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
                 progress: Callable | None = None) -> torch.Tensor:
    """Euler ODE solve from s = sigmas[0] (noise) to sigmas[-1]: x <- x + (s' - s) v(x, s).

    noise [B, ...]; sigmas decreasing, e.g. `euler_sigmas(50, shift)`. Returns x at sigmas[-1].
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    x = noise
    steps = range(len(sig) - 1)
    for k in (progress(steps) if progress else steps):
        s, s_next = float(sig[k]), float(sig[k + 1])
        v = velocity(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))
        x = x + (s_next - s) * v
    return x


def fewstep_sample(velocity: Velocity, noise: torch.Tensor, sigmas: Sequence[float],
                   generator: torch.Generator | None = None, draw=None) -> torch.Tensor:
    """Few-step sampler of a distilled student (DMD2-style multi-step generator).

    At each sigma s_k the student predicts x0_hat = x - s_k v; if a next sigma s_{k+1} > 0 follows,
    x is re-noised with fresh noise: x = (1 - s_{k+1}) x0_hat + s_{k+1} eps. `sigmas` lists the
    student's input sigmas, e.g. [1.0, 0.75, 0.5, 0.25]; the last prediction is returned.
    Not decorated with no_grad: Stage III backpropagates through the last step. `draw(shape)`, if given,
    makes the re-noising draws instead of `generator` (Stage III under ZeRO: a slice of global-batch draws).
    """
    x = noise
    x0 = noise
    for k, s in enumerate(sigmas):
        s_vec = torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)
        x0 = x0_from_velocity(x, s_vec, velocity(x, s_vec))
        if k + 1 < len(sigmas):
            eps = (draw(x.shape) if draw else torch.randn(x.shape, generator=generator)).to(x.device, x.dtype)  # CPU stream
            x = add_noise(x0, eps, torch.full_like(s_vec, float(sigmas[k + 1])))
    return x0


def nfe(steps: int, cfg_scale: float) -> int:
    """Function evaluations of a sampler: steps x 2 with CFG (cond + null), steps without."""
    return steps * (1 if cfg_scale == 1.0 else 2)


def sample_sigmas(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Training sigmas: uniform, pushed through the same shift the sampler uses.

    Never 0: torch.rand draws an exact 0 once in 2^24, and at s = 0 an x0-predicting model's velocity and a
    Wan 2.2 TI2V frame 0 (`models.velocity`) divide by zero; the NaN would stop the run, and its resume, which
    replays the same random stream, at the same step. Raising 0 to 2^-24, the smallest positive value
    torch.rand draws, changes nothing else."""
    return shift_sigma(torch.rand(n, generator=generator).clamp_min(2 ** -24), shift).float()
