"""Samplers: plain functions over a denoiser `model(x_t, t, **cond)` and its GaussianDiffusion.

    ddpm_sample          ancestral sampling on any subset of the timesteps (Ho et al. 2020; IDDPM §4 respacing)
    ddim_sample          DDIM with eta (Song et al. 2021, eq. 12)
    dpm_solver_sample    DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022, algorithm 2)
    ddim_invert          deterministic x_0 -> x_T, the reverse of ddim_sample with eta = 0

They share one signature: a step count, a timestep spacing (see respace.py; None: the diffusion's own,
`GaussianDiffusion.spacing`), a `torch.Generator` or one per
sample, a progress `callback(info)` called after every step with {"i", "steps", "t", "x", "x0"}, and the same
treatment of the predicted x_0: `threshold=None | "static" | "dynamic"` (static clipping to [-1, 1], or
Imagen's dynamic thresholding at `percentile`). Every sampler ends on the clean sample (ᾱ = 1 after its last
timestep). A new sampler is one more function of this shape.

`inpaint=(known, mask)` replaces the known region (mask 0; mask 1 = repaint) after every step by the known
image diffused to the current noise level, so the known region of the result equals `known` exactly.

`prune(i, x0)`, called after step i with the step's x_0 prediction, may return the rows (indices into the batch
as it is then) to go on with; the others stop there and the sampler returns only the rows kept to the end. Each
kept row ends as it would have without pruning (exactly, up to float rounding, for the deterministic samplers;
for the others too when every row has its own generator): the reranking uses it to drop candidates early.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.respace import respace_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++")
THRESHOLDS = (None, "static", "dynamic")
# Default step counts: the fewest at which each sampler reproduces the mean and std of the closed-form
# Gaussian test problem (tests/test_diffusion.py) within 3%. DDIM at 50 steps shrinks that data's std by
# about 4%, so its default is 100; DPM-Solver++ at 20 steps is more accurate than DDIM at 50.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 100, "dpm++": 20}

Model = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
Prune = Callable[[int, Tensor], Tensor | None]  # (step, x0) -> the rows to go on with, or None for all
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


# -- shared pieces ------------------------------------------------------------------------------------


def randn(shape, *, generator: Generators, device, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved: the same seed gives the same
    noise on every device when the generator is a CPU one.

    A sequence of k generators draws the batch in k equal blocks of rows, block i from generator i: a sample
    made with its own generator then gets the same noise whatever batch it is made in.
    """
    if isinstance(generator, Sequence):
        rows, k = shape[0], len(generator)
        if k == 0 or rows % k:
            raise ValueError(f"{k} generators cannot split a batch of {rows} rows into equal blocks")
        return torch.cat([randn((rows // k, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def threshold_x0(x0: Tensor, threshold, percentile: float = 0.995) -> Tensor:
    """Static clipping to [-1, 1], or dynamic thresholding (Saharia et al. 2022, §2.3): s = the
    `percentile` of |x_0| per sample, at least 1; clip to [-s, s] and divide by s. A callable is applied as it
    is (the residual upsampler clips x_0 so that x_0 + its base image stays in [-1, 1])."""
    if threshold is None:
        return x0
    if callable(threshold):
        return threshold(x0)
    if threshold == "static":
        return x0.clamp(-1, 1)
    if threshold == "dynamic":
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), percentile, dim=1).clamp(min=1)
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s
    raise ValueError(f"unknown threshold {threshold!r}; valid: {list(THRESHOLDS)}")


def denoise(
    model: Model,
    diffusion: GaussianDiffusion,
    x: Tensor,
    t: int,
    cond: dict[str, Any] | None,
    threshold: str | None = None,
    percentile: float = 0.995,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One network evaluation at timestep t: (x0, eps, variance values or None).

    eps is recomputed from the thresholded x0, so that the update stays consistent with it.
    """
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = model(x, t_batch, **(cond or {})).to(x.dtype)
    prediction, var_values = diffusion.split_output(out, x)
    x0 = diffusion.predict_x0(x, t_batch, prediction)
    if threshold is not None:
        x0 = threshold_x0(x0, threshold, percentile)
    if diffusion.prediction == "eps" and threshold is None:
        eps = prediction
    else:
        eps = diffusion.eps_from_x0(x, t_batch, x0)
    return x0, eps, var_values


def _check_common(diffusion: GaussianDiffusion, shape, x_T: Tensor | None, threshold) -> None:
    if not callable(threshold) and threshold not in THRESHOLDS:
        raise ValueError(f"unknown threshold {threshold!r}; valid: {list(THRESHOLDS)}")
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the sample shape is {tuple(shape)}")


def _start(shape, x_T, generator, device, dtype) -> Tensor:
    if x_T is not None:
        return x_T.to(device=device or x_T.device, dtype=dtype)
    return randn(shape, generator=generator, device=device or "cpu", dtype=dtype)


def _alpha_bars(diffusion: GaussianDiffusion, timesteps: list[int]) -> list[float]:
    return [float(diffusion.alphas_cumprod[t]) for t in timesteps] + [1.0]


def _replace_known(x: Tensor, inpaint, alpha_bar: float, generator) -> Tensor:
    """Keep mask-1 pixels of x; set mask-0 pixels to the known image diffused to ᾱ (exact when ᾱ = 1)."""
    if inpaint is None:
        return x
    known, mask = inpaint
    if alpha_bar >= 1.0:
        noised = known
    else:
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noised = math.sqrt(alpha_bar) * known + math.sqrt(1 - alpha_bar) * noise
    return mask * x + (1 - mask) * noised


def _report(callback, i, steps, t, x, x0):
    if callback is not None:
        callback({"i": i, "steps": steps, "t": t, "x": x, "x0": x0})


def _select(keep: Tensor, x: Tensor, cond, inpaint, generator, *state):
    """The sampling state restricted to rows `keep` of the current batch: x, cond (every tensor in it is per
    row), inpaint's per-row tensors, one generator per row, and any per-row `state` (None stays None)."""
    rows = x.shape[0]
    keep = torch.as_tensor(keep, dtype=torch.long, device=x.device)

    def rows_of(v):
        return v[keep] if isinstance(v, Tensor) and v.ndim and v.shape[0] == rows else v

    if isinstance(generator, Sequence) and len(generator) != 1:
        if len(generator) != rows:
            raise ValueError(f"pruning needs one generator per row or one for the batch, got {len(generator)}")
        generator = [generator[i] for i in keep.tolist()]
    cond = None if cond is None else {k: rows_of(v) for k, v in cond.items()}
    inpaint = None if inpaint is None else tuple(rows_of(v) for v in inpaint)
    return (x[keep], cond, inpaint, generator, *(None if v is None else v[keep] for v in state))


# -- samplers -----------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    *,
    steps: int = DEFAULT_STEPS["ddim"],
    eta: float = 0.0,
    cond: dict[str, Any] | None = None,
    generator: Generators = None,
    x_T: Tensor | None = None,
    spacing: str | None = None,
    threshold: str | None = None,
    percentile: float = 0.995,
    inpaint: tuple[Tensor, Tensor] | None = None,
    callback: Callback | None = None,
    prune: Prune | None = None,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1-ᾱ_prev-σ²)·eps + σ·z,
    σ = eta·sqrt((1-ᾱ_prev)/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_prev). eta = 0 is deterministic; eta = 1 is DDPM-like.

    Args:
        model: the denoiser, model(x_t, t, **cond).
        diffusion: its GaussianDiffusion.
        shape: the sample shape (B, ...).
        steps: number of model evaluations.
        x_T: the starting noise; drawn from `generator` if None.

    Returns:
        x_0 samples of `shape`.
    """
    _check_common(diffusion, shape, x_T, threshold)
    timesteps = respace_timesteps(diffusion.num_timesteps, steps, spacing or diffusion.spacing)
    alpha_bars = _alpha_bars(diffusion, timesteps)
    x = _start(shape, x_T, generator, device, dtype)
    for i, t in enumerate(timesteps):
        x0, eps, _ = denoise(model, diffusion, x, t, cond, threshold, percentile)
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = _replace_known(x, inpaint, a_prev, generator)
        _report(callback, i, steps, t, x, x0)
        if prune is not None and (keep := prune(i, x0)) is not None:
            x, cond, inpaint, generator = _select(keep, x, cond, inpaint, generator)
    return x


@torch.no_grad()
def ddpm_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    *,
    steps: int = DEFAULT_STEPS["ddpm"],
    cond: dict[str, Any] | None = None,
    generator: Generators = None,
    x_T: Tensor | None = None,
    spacing: str | None = None,
    threshold: str | None = None,
    percentile: float = 0.995,
    variance: str = "small",
    inpaint: tuple[Tensor, Tensor] | None = None,
    callback: Callback | None = None,
    prune: Prune | None = None,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Ancestral sampling from p(x_prev | x_t) on a subset of the timesteps (IDDPM §4: respacing).

    Between visited steps t > s the process has β' = 1 - ᾱ_t/ᾱ_s; the posterior q(x_s | x_t, x0) has mean
    (Ho et al. eq. 7) and variance β̃ = β'(1-ᾱ_s)/(1-ᾱ_t). The variance is the network's learned one
    (IDDPM eq. 15, on the respaced β') when it has one, else β̃ (`variance="small"`) or β' ("large").
    """
    _check_common(diffusion, shape, x_T, threshold)
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; valid: ['small', 'large']")
    timesteps = respace_timesteps(diffusion.num_timesteps, steps, spacing or diffusion.spacing)
    alpha_bars = _alpha_bars(diffusion, timesteps)
    x = _start(shape, x_T, generator, device, dtype)
    for i, t in enumerate(timesteps):
        x0, _, var_values = denoise(model, diffusion, x, t, cond, threshold, percentile)
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        beta = 1 - a / a_prev
        coef_x0 = math.sqrt(a_prev) * beta / (1 - a)
        coef_xt = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        mean = coef_x0 * x0 + coef_xt * x
        if i == len(timesteps) - 1:  # the last step lands on ᾱ = 1: no noise
            x = mean
        else:
            log_var = _ddpm_log_variance(beta, a, a_prev, var_values, variance, x, diffusion.clamp_variance)
            noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + torch.exp(0.5 * log_var) * noise
        x = _replace_known(x, inpaint, a_prev, generator)
        _report(callback, i, steps, t, x, x0)
        if prune is not None and (keep := prune(i, x0)) is not None:
            x, cond, inpaint, generator = _select(keep, x, cond, inpaint, generator)
    return x


def _ddpm_log_variance(beta, a, a_prev, var_values, variance, x, clamp: bool = True) -> Tensor | float:
    small = beta * (1 - a_prev) / (1 - a)
    if var_values is None:
        return torch.tensor(math.log(small if variance == "small" else beta), dtype=x.dtype, device=x.device)
    frac = (var_values.float() + 1) / 2
    frac = frac.clamp(0, 1) if clamp else frac
    return (frac * math.log(beta) + (1 - frac) * math.log(small)).to(x.dtype)


@torch.no_grad()
def dpm_solver_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    *,
    steps: int = DEFAULT_STEPS["dpm++"],
    cond: dict[str, Any] | None = None,
    generator: Generators = None,
    x_T: Tensor | None = None,
    spacing: str | None = None,
    threshold: str | None = None,
    percentile: float = 0.995,
    inpaint: tuple[Tensor, Tensor] | None = None,
    callback: Callback | None = None,
    prune: Prune | None = None,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2), data-prediction multistep.

    With α = sqrt(ᾱ), σ = sqrt(1-ᾱ), λ = log(α/σ) and h = λ_t - λ_s, a first-order step is
        x_t = (σ_t/σ_s)·x_s - α_t·(e^-h - 1)·D_0,
    and the second-order step adds -½·α_t·(e^-h - 1)·D_1 with D_1 = (D_0 - D_prev)·h/h_prev (midpoint form).
    The first step and the last (the jump to the clean sample, σ = 0) are first order, the usual
    "lower order final" that keeps few-step sampling stable. Deterministic; `generator` only draws x_T.
    """
    _check_common(diffusion, shape, x_T, threshold)
    timesteps = respace_timesteps(diffusion.num_timesteps, steps, spacing or diffusion.spacing)
    alpha_bars = _alpha_bars(diffusion, timesteps)
    x = _start(shape, x_T, generator, device, dtype)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        x0, _, _ = denoise(model, diffusion, x, t, cond, threshold, percentile)
        a_s, a_t = alpha_bars[i], alpha_bars[i + 1]
        if a_t >= 1.0:  # final step to σ = 0: x_t = D_0 exactly
            x = x0
        else:
            alpha_t, sigma_s, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_s), math.sqrt(1 - a_t)
            h = _log_snr_half(a_t) - _log_snr_half(a_s)
            phi = math.expm1(-h)  # e^-h - 1
            d = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)
            x = (sigma_t / sigma_s) * x - alpha_t * phi * d
            x0_prev, h_prev = x0, h
        x = _replace_known(x, inpaint, a_t, generator)
        _report(callback, i, steps, t, x, x0)
        if prune is not None and (keep := prune(i, x0)) is not None:
            x, cond, inpaint, generator, x0_prev = _select(keep, x, cond, inpaint, generator, x0_prev)
    return x


def _log_snr_half(alpha_bar: float) -> float:
    """λ = log(α/σ) = ½·log(ᾱ/(1-ᾱ))."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def ddim_invert(
    model: Model,
    diffusion: GaussianDiffusion,
    x_0: Tensor,
    *,
    steps: int = 50,
    cond: dict[str, Any] | None = None,
    spacing: str | None = None,
    refine: int = 0,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM inversion x_0 -> x_T: the reverse of `ddim_sample(eta=0)` on the same timesteps.

    Each step s -> t (ᾱ_s > ᾱ_t) needs eps at the unknown x_t; it is approximated by eps(x_s, t) (Song et
    al. 2021, §4.3; Mokady et al. 2022), then, with `refine` > 0, improved by fixed-point iterations
    eps <- eps(x_t, t). On the closed-form Gaussian test problem (data std 0.2-0.6) inverting and sampling
    back with 50 steps reconstructs x_0 within 0.15 (max abs error) with refine=0 and within 0.03 with
    refine=3; with 250 steps and refine=3, within 0.006.

    Returns:
        x_T with the shape of x_0; `ddim_sample(..., x_T=x_T)` with the same steps reconstructs x_0.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    timesteps = respace_timesteps(diffusion.num_timesteps, steps, spacing or diffusion.spacing)[::-1]
    alpha_bars = [1.0] + [float(diffusion.alphas_cumprod[t]) for t in timesteps]
    x = x_0
    for i, t in enumerate(timesteps):
        a_s, a_t = alpha_bars[i], alpha_bars[i + 1]
        x_t = x
        for _ in range(refine + 1):
            x0, eps, _ = denoise(model, diffusion, x_t, t, cond)
            # the x_0 consistent with (x_s, eps) at level s, then x_t on the same DDIM path
            x0_s = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
            x_t = math.sqrt(a_t) * x0_s + math.sqrt(1 - a_t) * eps
        x = x_t
        _report(callback, i, steps, t, x, x0)
    return x


def sample(
    name: str,
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    *,
    steps: int | None = None,
    **kwargs,
) -> Tensor:
    """Dispatch to a sampler by name ("ddpm", "ddim", "dpm++"); steps defaults to DEFAULT_STEPS[name]."""
    fns = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm++": dpm_solver_sample}
    if name not in fns:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {list(fns)}")
    return fns[name](model, diffusion, shape, steps=steps or DEFAULT_STEPS[name], **kwargs)
